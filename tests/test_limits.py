"""Client limits and costs: rate limits per token by the owner's tier (RateLimit-* headers,
exact across gateway processes), cost per request from a service's cost model (a price per
call, OpenAI token prices from `usage`, streamed answers included), and budgets per token
and per user that concurrency cannot overshoot."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from admin.cli import make_runner
from gateway import rkeys
from gateway.app import create_app as create_gateway_app
from gateway.limits import nano
from gateway.quota import window
from gateway.settings import Settings
from gateway.usage import USAGE
from tests.conftest import Servers, World, assert_error, with_settings
from tests.fakes import FakeUpstream
from tests.test_usage import rows

OPENAI_KEY = "sk-proj-" + "L" * 40
HELLO = [{"role": "user", "content": "hi"}]
TIERS = {"free": 5, "pro": 8, "admin": 0}
TOKEN_PRICES = {"gpt-4o-mini": {"input": "0.15", "output": "0.60"}}


@dataclass
class Setup:
    upstream: FakeUpstream
    token: str
    token_id: str


async def setup(
    admin: TestClient[Any, Any],
    as_admin: dict[str, str],
    owner: dict[str, str],
    aiohttp_server: Any,
    cost_model: dict[str, Any] | None = None,
    **token_fields: Any,
) -> Setup:
    """openai pointed at a fake upstream, a key of `owner`'s, and a token of theirs."""
    upstream = FakeUpstream(OPENAI_KEY)
    server = await aiohttp_server(upstream.app())
    resp = await admin.put(
        "/services/openai",
        headers=as_admin,
        json={"base_url": f"http://127.0.0.1:{server.port}", "cost_model": cost_model},
    )
    assert resp.status == 200, await resp.text()
    resp = await admin.post(
        "/keys", headers=owner, json={"key": OPENAI_KEY, "service": "openai", "tier": "paid"}
    )
    assert resp.status == 201, await resp.text()
    resp = await admin.post(
        "/tokens", headers=owner, json={"name": "app", "services": ["openai"], **token_fields}
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return Setup(upstream, body["token"], body["id"])


async def two_gateways(aiohttp_client: Any, settings: Settings) -> list[TestClient[Any, Any]]:
    """Two gateway apps, each with its own caches and Redis connection: two processes' worth."""
    return [await aiohttp_client(create_gateway_app(settings)) for _ in range(2)]


async def burst(
    gateways: list[TestClient[Any, Any]], token: str, n: int
) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
    async def call(i: int) -> tuple[int, dict[str, str], dict[str, Any]]:
        resp = await gateways[i % len(gateways)].get(
            "/openai/v1/models", headers={"X-Wallet-Token": token}
        )
        return resp.status, dict(resp.headers), await resp.json()

    return await asyncio.gather(*(call(i) for i in range(n)))


# Rate limits


async def test_a_tokens_rate_limit_is_exact_across_gateway_processes(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
) -> None:
    s = await setup(admin_client, as_admin, as_alice, aiohttp_server)
    gateways = await two_gateways(aiohttp_client, with_settings(settings, rate_limit_tiers=TIERS))
    results = await burst(gateways, s.token, 30)

    passed = [(h, b) for status, h, b in results if status == 200]
    refused = [(h, b) for status, h, b in results if status == 429]
    assert len(passed) == 5 == len(s.upstream.seen)  # alice is on the free tier: 5 a minute
    assert len(refused) == 25
    assert sorted(int(h["RateLimit-Remaining"]) for h, _ in passed) == [0, 1, 2, 3, 4]
    seconds_left = 60 - datetime.now(UTC).second
    for headers, body in refused:
        assert body["error"]["code"] == "rate_limited"
        assert headers["RateLimit-Limit"] == "5"
        assert headers["RateLimit-Remaining"] == "0"
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert abs(int(headers["Retry-After"]) - seconds_left) <= 2
    for headers, _ in passed:
        assert headers["RateLimit-Limit"] == "5"


async def test_the_tier_comes_from_the_user_and_a_token_may_override_it(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
    world: World,
) -> None:
    s = await setup(admin_client, as_admin, as_alice, aiohttp_server)
    resp = await admin_client.put(f"/users/{world.user_id}", headers=as_admin, json={"tier": "pro"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["tier"] == "pro"
    resp = await admin_client.post(
        "/tokens", headers=as_alice, json={"name": "second", "services": ["openai"]}
    )
    second = (await resp.json())["token"]
    gateways = await two_gateways(aiohttp_client, with_settings(settings, rate_limit_tiers=TIERS))
    results = await burst(gateways, s.token, 6) + await burst(gateways, second, 6)
    # the tier's 8 a minute count over all of alice's tokens: a second token buys nothing
    assert [status for status, _, _ in results].count(200) == 8

    # A USER may not raise their own token's limit; an ADMIN may set one.
    resp = await admin_client.put(
        f"/tokens/{s.token_id}", headers=as_alice, json={"rate_limit": 99}
    )
    await assert_error(resp, 403, "forbidden")
    resp = await admin_client.put(f"/tokens/{s.token_id}", headers=as_admin, json={"rate_limit": 0})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["rate_limit"] == 0  # 0: unlimited
    fresh = await two_gateways(aiohttp_client, with_settings(settings, rate_limit_tiers=TIERS))
    results = await burst(fresh, s.token, 12)
    assert [status for status, _, _ in results].count(200) == 12
    assert all("RateLimit-Limit" not in headers for _, headers, _ in results)


async def test_bad_tiers_and_limits_are_refused_by_name(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], world: World
) -> None:
    resp = await admin_client.put(
        f"/users/{world.user_id}", headers=as_admin, json={"tier": "platinum"}
    )
    error = await assert_error(resp, 422, "validation_error")
    assert error["field"] == "tier"
    for bad in (-1, "10", 1.5, True):
        resp = await admin_client.post(
            "/tokens",
            headers=as_admin,
            json={"name": "t", "services": ["openai"], "rate_limit": bad},
        )
        await assert_error(resp, 422, "validation_error")
    for bad_budget in (
        {"amount": "-1"},
        {"amount": "ten"},
        {"amount": "1", "period": "weekly"},
        {"amount": "NaN"},
        {"amount": "1", "extra": 1},
        "10",
    ):
        resp = await admin_client.post(
            "/tokens",
            headers=as_admin,
            json={"name": "t", "services": ["openai"], "budget": bad_budget},
        )
        await assert_error(resp, 422, "validation_error")


async def test_rate_limiting_can_be_switched_off(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
) -> None:
    s = await setup(admin_client, as_admin, as_alice, aiohttp_server)
    off = with_settings(settings, rate_limit_tiers={"free": 1}, enable_rate_limiting=False)
    results = await burst(await two_gateways(aiohttp_client, off), s.token, 6)
    assert [status for status, _, _ in results] == [200] * 6
    assert all("RateLimit-Limit" not in headers for _, headers, _ in results)


# Costs


async def test_a_price_per_call_is_recorded_and_counted(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    servers: Servers,
) -> None:
    s = await setup(
        admin_client, as_admin, as_admin, aiohttp_server, cost_model={"per_call": "0.0125"}
    )
    auth = {"X-Wallet-Token": s.token}
    for _ in range(3):
        assert (await gateway_client.get("/openai/v1/models", headers=auth)).status == 200
    s.upstream.key = "sk-proj-" + "X" * 40  # the upstream now refuses the key: no charge
    assert (await gateway_client.get("/openai/v1/models", headers=auth)).status == 401
    metrics = await (await gateway_client.get("/monitoring/metrics")).text()
    assert 'wallet_cost_total{app="gateway",service="openai"} 0.0375' in metrics
    await gateway_client.app[USAGE].flush()
    records = await rows(servers, "SELECT status, cost FROM usage_records ORDER BY id")
    assert [(r["status"], r["cost"]) for r in records] == [
        (200, Decimal("0.0125")),
        (200, Decimal("0.0125")),
        (200, Decimal("0.0125")),
        (401, Decimal(0)),
    ]
    hourly = await rows(servers, "SELECT sum(cost) AS cost FROM usage_hourly")
    assert hourly[0]["cost"] == Decimal("0.0375")


async def test_openai_token_prices_apply_to_plain_and_streamed_answers(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    servers: Servers,
) -> None:
    model = {"per_call": "0.001", "per_million_tokens": TOKEN_PRICES}
    s = await setup(admin_client, as_admin, as_admin, aiohttp_server, cost_model=model)
    base_url = f"http://127.0.0.1:{gateway_client.port}/openai/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=s.token, max_retries=0) as client:
        plain = await client.chat.completions.create(model="gpt-4o-mini-2024-07-18", messages=HELLO)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert plain.usage is not None
    assert plain.usage.prompt_tokens == 3
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2

    await gateway_client.app[USAGE].flush()
    records = await rows(servers, "SELECT cost FROM usage_records ORDER BY id")
    per_m = Decimal(1_000_000)
    # plain: 3 in, 1 out, priced by the longest matching model prefix; streamed: 3 in, 2 out
    assert [r["cost"] for r in records] == [
        Decimal("0.001") + (3 * Decimal("0.15") + 1 * Decimal("0.60")) / per_m,
        Decimal("0.001") + (3 * Decimal("0.15") + 2 * Decimal("0.60")) / per_m,
    ]


# Budgets


async def test_a_token_budget_is_exact_under_concurrency(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
) -> None:
    s = await setup(
        admin_client,
        as_admin,
        as_admin,
        aiohttp_server,
        cost_model={"per_call": "0.10"},
        budget={"amount": "1.00", "period": "daily"},
    )
    results = await burst(await two_gateways(aiohttp_client, settings), s.token, 60)
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10 == len(s.upstream.seen)
    now = datetime.now(UTC)
    to_midnight = 86_400 - (now.hour * 3600 + now.minute * 60 + now.second)
    for status, headers, body in results:
        if status != 200:
            assert status == 429
            assert body["error"]["code"] == "budget_exceeded"
            assert headers["x-should-retry"] == "false"
            assert abs(int(headers["Retry-After"]) - to_midnight) <= 2


async def test_a_user_budget_spans_their_tokens(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    aiohttp_server: Any,
    world: World,
) -> None:
    s = await setup(
        admin_client, as_admin, as_alice, aiohttp_server, cost_model={"per_call": "0.25"}
    )
    resp = await admin_client.put(
        f"/users/{world.user_id}",
        headers=as_admin,
        json={"budget": {"amount": 1, "period": "monthly"}},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["budget"] == {"amount": "1", "period": "monthly"}
    resp = await admin_client.post(
        "/tokens", headers=as_alice, json={"name": "second", "services": ["openai"]}
    )
    second = (await resp.json())["token"]
    tokens = [s.token, second] * 4
    statuses = []
    for token in tokens:
        resp = await gateway_client.get("/openai/v1/models", headers={"X-Wallet-Token": token})
        statuses.append(resp.status)
    assert statuses.count(200) == 4  # 4 x 0.25 across both tokens
    assert statuses[-1] == 429


async def test_a_hold_is_settled_to_the_real_cost(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    redis_client: Redis,
    world: World,
) -> None:
    """Token-priced calls hold 0.01 each while in flight and cost about 0.001: ten in a row
    fit a 0.05 budget only because each hold is corrected to the real cost afterwards."""
    prices = {"gpt-4o-mini": {"input": "100", "output": "400"}}  # 3 in, 1 out: 0.0007
    s = await setup(
        admin_client,
        as_admin,
        as_admin,
        aiohttp_server,
        cost_model={"per_million_tokens": prices, "hold": "0.01"},
        budget={"amount": "0.05", "period": "daily"},
    )
    auth = {"X-Wallet-Token": s.token}
    for _ in range(10):
        resp = await gateway_client.post(
            "/openai/v1/chat/completions", headers=auth, json={"model": "gpt-4o-mini"}
        )
        assert resp.status == 200, await resp.text()
        await resp.read()
        spent_key = rkeys.spend_counter(
            world.admin_id, "token", s.token_id, window("daily", datetime.now(UTC)).id
        )
        for _ in range(100):  # the settlement runs just after the answer
            if int(await redis_client.get(spent_key) or 0) % nano(Decimal("0.0007")) == 0:
                break
            await asyncio.sleep(0.01)
    assert int(await redis_client.get(spent_key) or 0) == 10 * nano(Decimal("0.0007"))


async def test_the_openai_sdk_raises_its_rate_limit_error_without_retrying_a_spent_budget(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    s = await setup(
        admin_client,
        as_admin,
        as_admin,
        aiohttp_server,
        cost_model={"per_call": "1"},
        budget={"amount": "1", "period": "monthly"},
    )
    base_url = f"http://127.0.0.1:{gateway_client.port}/openai/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=s.token, max_retries=2) as client:
        await client.models.list()
        with pytest.raises(openai.RateLimitError) as refused:
            await client.models.list()
    assert refused.value.code == "budget_exceeded"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(s.upstream.seen) == 1
    metrics = await (await gateway_client.get("/monitoring/metrics")).text()
    # the SDK did not retry: one refusal counted
    assert 'wallet_client_limited_total{app="gateway",service="openai"} 1' in metrics


async def test_a_token_priced_answer_without_usage_is_charged_its_hold(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    servers: Servers,
) -> None:
    """What an answer without `usage` cost cannot be known: it is charged the hold, never
    nothing (a budget could be drained for free) and never a crash; an error costs nothing."""
    model = {"per_million_tokens": TOKEN_PRICES, "hold": "0.05"}
    s = await setup(admin_client, as_admin, as_admin, aiohttp_server, cost_model=model)
    auth = {"X-Wallet-Token": s.token}
    assert (await gateway_client.get("/openai/v1/models", headers=auth)).status == 200
    resp = await gateway_client.get("/openai/v1/events", headers=auth)  # a stream, no usage
    assert resp.status == 200
    assert b"data: 2" in await resp.read()
    s.upstream.key = "sk-proj-" + "X" * 40  # now refused: an error costs nothing
    assert (await gateway_client.get("/openai/v1/models", headers=auth)).status == 401
    await gateway_client.app[USAGE].flush()
    records = await rows(servers, "SELECT status, cost FROM usage_records ORDER BY id")
    assert [(r["status"], r["cost"]) for r in records] == [
        (200, Decimal("0.05")),
        (200, Decimal("0.05")),
        (401, Decimal(0)),
    ]


async def test_a_client_that_hangs_up_mid_stream_is_charged_its_hold(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    settings: Settings,
    servers: Servers,
    redis_client: Redis,
    world: World,
) -> None:
    model = {"per_million_tokens": TOKEN_PRICES, "hold": "0.05"}
    s = await setup(
        admin_client,
        as_admin,
        as_admin,
        aiohttp_server,
        cost_model=model,
        budget={"amount": "1", "period": "daily"},
    )
    s.upstream.gate = asyncio.Event()  # the stream stops after its first event
    app = create_gateway_app(settings)
    runner = make_runner("gateway", app, shutdown_timeout=1)  # a hang-up cancels the handler
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as client:
            resp = await client.post(
                f"http://127.0.0.1:{port}/openai/v1/chat/completions",
                headers={"X-Wallet-Token": s.token},
                json={"model": "gpt-4o-mini", "stream": True},
            )
            assert resp.status == 200
            await resp.content.readline()  # the first event arrived: hang up
            resp.close()
        spent_key = rkeys.spend_counter(
            world.admin_id, "token", s.token_id, window("daily", datetime.now(UTC)).id
        )
        for _ in range(200):  # the handler is cancelled once the hang-up is noticed
            if app[USAGE].buffered:
                break
            await asyncio.sleep(0.01)
        assert app[USAGE].buffered == 1
        await app[USAGE].flush()
    finally:
        s.upstream.gate.set()
        await runner.cleanup()
    records = await rows(servers, "SELECT status, cost FROM usage_records")
    assert [(r["status"], r["cost"]) for r in records] == [(499, Decimal("0.05"))]
    assert int(await redis_client.get(spent_key) or 0) == nano(Decimal("0.05"))


async def test_a_request_refused_by_a_client_limit_gives_its_key_quota_back(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
    redis_client: Redis,
) -> None:
    """The client limits and the key's quota are checked in the same round trip; a request
    the rate limit refuses does not keep the key's quota it was charged meanwhile."""
    upstream = FakeUpstream(OPENAI_KEY)
    server = await aiohttp_server(upstream.app())
    resp = await admin_client.put(
        "/services/openai", headers=as_admin, json={"base_url": f"http://127.0.0.1:{server.port}"}
    )
    assert resp.status == 200
    key = {"key": OPENAI_KEY, "service": "openai", "tier": "free", "metadata": {"quota": 10}}
    resp = await admin_client.post("/keys", headers=as_alice, json=key)
    assert resp.status == 201, await resp.text()
    resp = await admin_client.post(
        "/tokens", headers=as_alice, json={"name": "t", "services": ["openai"]}
    )
    token = (await resp.json())["token"]
    gateway = await aiohttp_client(
        create_gateway_app(with_settings(settings, rate_limit_tiers={"free": 2}))
    )
    statuses = []
    for _ in range(6):
        resp = await gateway.get("/openai/v1/models", headers={"X-Wallet-Token": token})
        statuses.append(resp.status)
    assert statuses == [200, 200, 429, 429, 429, 429]
    counters = [k async for k in redis_client.scan_iter(match="wallet:{quota:openai}:*")]
    assert len(counters) == 1
    for _ in range(100):  # the refunds run just after the refusals
        if int(await redis_client.get(counters[0]) or 0) == 2:
            break
        await asyncio.sleep(0.01)
    assert int(await redis_client.get(counters[0]) or 0) == 2 == len(upstream.seen)
