"""Failover: an upstream 429 for one key rests it (on every gateway process) and the request
goes to the next key before any byte reaches the client, the body sent again."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.app import create_app as create_gateway_app
from gateway.appkeys import COOLDOWNS
from gateway.cooldown import DEFAULT_S, MAX_S, reset_after_s, retry_after_s
from gateway.settings import Settings

FREE_KEY = "sk-proj-" + "F" * 40
PAID_KEY = "sk-proj-" + "P" * 40


@dataclass
class Picky:
    """Answers 429 (Retry-After: 30) to the keys in `refuse`, 200 to the others."""

    refuse: set[str] = field(default_factory=lambda: {FREE_KEY})
    invalid: set[str] = field(default_factory=set)  # answered 401
    seen: list[tuple[str, bytes]] = field(default_factory=list)
    header_names: set[str] = field(default_factory=set)
    nearly_out: set[str] = field(default_factory=set)  # answered with remaining 0

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.seen.append((key, await request.read()))
        self.header_names |= {name.lower() for name in request.headers}
        if key in self.invalid:
            return web.json_response(
                {"error": {"message": "Incorrect API key", "code": "invalid_api_key"}},
                status=401,
            )
        if key in self.refuse:
            return web.json_response(
                {"error": {"message": "Rate limit reached", "type": "requests", "code": None}},
                status=429,
                headers={"Retry-After": "30"},
            )
        limits = (
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}
            if key in self.nearly_out
            else {"x-ratelimit-remaining-requests": "99"}
        )
        return web.json_response({"served_by": key[-4:]}, headers=limits)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@dataclass
class Setup:
    upstream: Picky
    token: str
    free_id: str
    paid_id: str


@pytest.fixture
async def setup(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], aiohttp_server: Any
) -> Setup:
    upstream = Picky()
    server = await aiohttp_server(upstream.app())
    resp = await admin_client.put(
        "/services/openai",
        headers=as_admin,
        json={"base_url": f"http://127.0.0.1:{server.port}"},
    )
    assert resp.status == 200
    ids = []
    for key, tier in ((FREE_KEY, "free"), (PAID_KEY, "paid")):
        resp = await admin_client.post(
            "/keys", headers=as_admin, json={"key": key, "service": "openai", "tier": tier}
        )
        assert resp.status == 201, await resp.text()
        ids.append((await resp.json())["id"])
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "f", "services": ["openai"]}
    )
    assert resp.status == 201
    return Setup(upstream, (await resp.json())["token"], ids[0], ids[1])


async def metric(client: TestClient[Any, Any], series: str) -> str | None:
    text = await (await client.get("/monitoring/metrics")).text()
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return value
    return None


async def test_a_refused_key_fails_over_with_the_body_and_then_rests(
    setup: Setup, gateway_client: TestClient[Any, Any]
) -> None:
    auth = {"X-Wallet-Token": setup.token}
    resp = await gateway_client.post("/openai/v1/chat/completions", headers=auth, json={"n": 1})
    assert resp.status == 200
    assert (await resp.json()) == {"served_by": PAID_KEY[-4:]}
    assert resp.headers["X-Wallet-Key-Id"] == setup.paid_id
    assert resp.headers["X-Wallet-Fallbacks"] == "1"
    # The free key was tried first, then the paid one, with the same body.
    assert setup.upstream.seen == [(FREE_KEY, b'{"n": 1}'), (PAID_KEY, b'{"n": 1}')]

    # The free key now rests: the next request goes straight to the paid one.
    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    assert resp.status == 200
    assert resp.headers["X-Wallet-Fallbacks"] == "0"
    assert [key for key, _ in setup.upstream.seen[2:]] == [PAID_KEY]
    labels = '{app="gateway",service="openai"}'
    assert await metric(gateway_client, f"wallet_fallbacks_total{labels}") == "1"
    # Cooldowns also say why (rate, quota, invalid): see gateway/signals.py.
    rested = 'wallet_cooldowns_total{app="gateway",reason="rate",service="openai"}'
    assert await metric(gateway_client, rested) == "1"


async def test_when_every_key_is_refused_the_last_429_is_relayed_then_the_wallet_answers(
    setup: Setup, gateway_client: TestClient[Any, Any]
) -> None:
    setup.upstream.refuse = {FREE_KEY, PAID_KEY}
    auth = {"X-Wallet-Token": setup.token}
    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    assert resp.status == 429
    assert (await resp.json())["error"]["message"] == "Rate limit reached"  # the upstream's
    assert resp.headers["X-Wallet-Fallbacks"] == "1"
    assert len(setup.upstream.seen) == 2

    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    assert resp.status == 429
    body = await resp.json()
    assert body["error"]["code"] == "keys_cooling_down"
    assert 1 <= int(resp.headers["Retry-After"]) <= 30
    assert resp.headers["x-should-retry"] == "false"
    assert len(setup.upstream.seen) == 2  # the upstream was left alone


async def test_a_streamed_body_is_not_sent_twice(
    setup: Setup, gateway_client: TestClient[Any, Any]
) -> None:
    async def chunks() -> Any:
        yield b'{"part": '
        yield b"1}"

    resp = await gateway_client.post(
        "/openai/v1/chat/completions", headers={"X-Wallet-Token": setup.token}, data=chunks()
    )
    assert resp.status == 429  # relayed: the body could not be replayed to another key
    assert resp.headers["X-Wallet-Fallbacks"] == "0"
    assert setup.upstream.seen == [(FREE_KEY, b'{"part": 1}')]


async def test_a_rest_reaches_the_other_gateway_processes(
    setup: Setup,
    gateway_client: TestClient[Any, Any],
    aiohttp_client: Any,
    settings: Settings,
) -> None:
    other: TestClient[Any, Any] = await aiohttp_client(create_gateway_app(settings))
    auth = {"X-Wallet-Token": setup.token}
    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    assert resp.headers["X-Wallet-Fallbacks"] == "1"
    for _ in range(20):  # the other process hears of the rest within a moment
        resp = await other.get("/openai/v1/models", headers=auth)
        assert resp.status == 200
        if resp.headers["X-Wallet-Fallbacks"] == "0":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the other gateway process kept trying the resting key")


async def test_a_gateway_started_after_a_rest_skips_the_resting_key(
    setup: Setup,
    gateway_client: TestClient[Any, Any],
    aiohttp_client: Any,
    settings: Settings,
) -> None:
    auth = {"X-Wallet-Token": setup.token}
    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    assert resp.headers["X-Wallet-Fallbacks"] == "1"  # the refused key now rests
    later: TestClient[Any, Any] = await aiohttp_client(create_gateway_app(settings))
    for _ in range(40):  # it reads the stored rests right after subscribing
        if later.app[COOLDOWNS].resting(setup.free_id) > 0:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("a gateway started after the rest does not know of it")
    # So its very first request goes straight to the other key.
    resp = await later.get("/openai/v1/models", headers=auth)
    assert resp.status == 200
    assert resp.headers["X-Wallet-Fallbacks"] == "0"


async def test_a_key_the_upstream_rejects_is_marked_invalid_until_an_admin_says_otherwise(
    setup: Setup,
    gateway_client: TestClient[Any, Any],
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
) -> None:
    setup.upstream.refuse = set()
    setup.upstream.invalid = {FREE_KEY}
    auth = {"X-Wallet-Token": setup.token}
    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    assert resp.status == 200
    assert resp.headers["X-Wallet-Key-Id"] == setup.paid_id
    assert resp.headers["X-Wallet-Fallbacks"] == "1"
    for _ in range(40):  # marked in the background
        key = await (await admin_client.get(f"/keys/{setup.free_id}", headers=as_admin)).json()
        if key["status"] == "invalid":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the rejected key was not marked invalid: {key}")
    audit = await (await admin_client.get("/audit", headers=as_admin)).json()
    marks = [r for r in audit["items"] if r["action"] == "key.invalid"]
    assert [(r["target_id"], r["details"]["upstream_status"]) for r in marks] == [
        (setup.free_id, 401)
    ]
    verdict = await (await admin_client.get("/audit/verify", headers=as_admin)).json()
    assert verdict["ok"] is True

    # An admin fixes the key upstream and sets it back to active: it is used again at once
    # (the change also ends its rest).
    setup.upstream.invalid = set()
    resp = await admin_client.put(
        f"/keys/{setup.free_id}", headers=as_admin, json={"status": "active"}
    )
    assert resp.status == 200
    for _ in range(40):
        resp = await gateway_client.get("/openai/v1/models", headers=auth)
        if resp.headers["X-Wallet-Key-Id"] == setup.free_id:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the reactivated key was not used again")


async def test_a_key_nearly_out_upstream_is_ranked_last_before_it_is_refused(
    setup: Setup, gateway_client: TestClient[Any, Any]
) -> None:
    setup.upstream.refuse = set()
    setup.upstream.nearly_out = {FREE_KEY}
    auth = {"X-Wallet-Token": setup.token}
    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    assert resp.headers["X-Wallet-Key-Id"] == setup.free_id  # said "0 left" on the way
    assert resp.headers["x-ratelimit-remaining-requests"] == "0"  # relayed to the client
    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    # The paid key serves next, without waiting for the free key's 429.
    assert resp.headers["X-Wallet-Key-Id"] == setup.paid_id
    assert resp.headers["X-Wallet-Fallbacks"] == "0"
    assert [key for key, _ in setup.upstream.seen] == [FREE_KEY, PAID_KEY]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("12", 12.0)],
)
def test_upstream_reset_durations(value: str, seconds: float) -> None:
    assert reset_after_s(value) == pytest.approx(seconds)


def test_unreadable_reset_durations() -> None:
    assert reset_after_s("soon") is None
    assert reset_after_s("") is None


def test_retry_after_is_read_like_the_sdks_do() -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert retry_after_s({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_s({"Retry-After": "12"}) == 12
    assert retry_after_s({"Retry-After": later}, now=now.timestamp()) == pytest.approx(90)
    assert retry_after_s({"Retry-After": "soon"}) == DEFAULT_S
    assert retry_after_s({"Retry-After": "-5"}) == DEFAULT_S
    assert retry_after_s({"Retry-After": "nan"}) == DEFAULT_S
    assert retry_after_s({}) == DEFAULT_S
    assert retry_after_s({"Retry-After": str(10**9)}) == MAX_S
    assert retry_after_s({"retry-after-ms": "inf"}) == MAX_S


async def test_a_session_keeps_its_key_while_it_is_usable(
    setup: Setup, gateway_client: TestClient[Any, Any]
) -> None:
    auth = {"X-Wallet-Token": setup.token}
    session = {**auth, "X-Wallet-Session": "conversation-1"}
    # The free key is refused once: the session moves to the paid key.
    resp = await gateway_client.get("/openai/v1/models", headers=session)
    assert resp.headers["X-Wallet-Key-Id"] == setup.paid_id
    setup.upstream.refuse = set()
    gateway_client.app[COOLDOWNS].lift(setup.free_id)  # the free key is back
    # Without a session the best key (free) serves again; the session stays on the paid one.
    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    assert resp.headers["X-Wallet-Key-Id"] == setup.free_id
    for _ in range(3):
        resp = await gateway_client.get("/openai/v1/models", headers=session)
        assert resp.headers["X-Wallet-Key-Id"] == setup.paid_id
    other = {**auth, "X-Wallet-Session": "conversation-2"}
    resp = await gateway_client.get("/openai/v1/models", headers=other)
    assert resp.headers["X-Wallet-Key-Id"] == setup.free_id
    # The session header is the wallet's: it never reaches the upstream.
    assert "x-wallet-session" not in setup.upstream.header_names
    assert "authorization" in setup.upstream.header_names
