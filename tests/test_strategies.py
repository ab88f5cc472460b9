"""Key selection strategies (priority, round_robin, least_used, weighted) within a group of
keys of the same tier and priority, per-key concurrency caps (`metadata.maxConcurrency`) held
as leases in Redis, and the services' `strategy` / `cost_model` fields on the admin API."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from admin import embedded
from admin.cli import make_runner
from gateway import rkeys
from gateway.app import create_app as create_gateway_app
from gateway.hotredis import HotRedis
from gateway.quota import Limit, Quotas, window
from gateway.secret import Secret
from gateway.selection import UsableKey, arrange, concurrency_cap_of, weight_of
from gateway.settings import Settings
from gateway.tasks import TASKS
from tests.conftest import assert_error

SERVICE = "openai"
HOLD_TIMEOUT_S = 5.0  # how long the held upstream waits for the test before giving up


def secret(letter: str) -> str:
    return "sk-proj-" + letter * 40


# --- pure: arranging candidates ----------------------------------------------------------


def usable(
    key_id: str, tier: str = "paid", priority: int = 0, age_s: int = 0, weight: float = 1.0
) -> UsableKey:
    created = datetime(2026, 1, 1, tzinfo=UTC) - timedelta(seconds=age_s)
    return UsableKey(key_id, "owner", SERVICE, tier, priority, created, Secret("x"), weight=weight)


def test_groups_are_tier_then_priority_and_the_oldest_leads() -> None:
    keys = [
        usable("paid", "paid", 9, age_s=50),
        usable("young", "free", 5, age_s=1),
        usable("low", "free", 0, age_s=99),
        usable("old", "free", 5, age_s=10),
    ]
    plan = arrange(keys, "priority")
    assert [k.id for k in plan.keys] == ["old", "young", "low", "paid"]
    assert plan.groups == (0, 0, 1, 2)


def test_a_demoted_key_goes_last_and_a_pinned_key_first_alone() -> None:
    keys = [usable("a", "free", 5, 3), usable("b", "free", 5, 2), usable("c", "paid", 0, 1)]
    demoted = arrange(keys, "round_robin", lambda key_id: key_id == "a")
    assert [k.id for k in demoted.keys] == ["b", "c", "a"]
    assert demoted.groups == (0, 1, 2)
    pinned = arrange(keys, "round_robin", pinned="b")
    assert [k.id for k in pinned.keys] == ["b", "a", "c"]
    assert pinned.groups == (0, 1, 2)  # "a" no longer shares a group with the pinned key


def test_weighted_order_leads_in_proportion_to_weight() -> None:
    keys = [usable("heavy", weight=3, age_s=2), usable("light", weight=1, age_s=1)]
    keys.append(usable("lower", priority=-1, weight=100))
    rng = random.Random(20261126)
    leads = Counter(arrange(keys, "weighted", draw=rng.random).keys[0].id for _ in range(4000))
    assert set(leads) == {"heavy", "light"}  # never the lower group
    assert 2820 <= leads["heavy"] <= 3180  # 3000 expected, sd 27


def test_weight_and_cap_from_metadata() -> None:
    assert weight_of({}) == 1.0
    assert weight_of({"weight": 2.5}) == 2.5
    assert weight_of({"weight": 0}) == weight_of({"weight": True}) == 1.0
    assert concurrency_cap_of({"maxConcurrency": 3}) == 3
    assert concurrency_cap_of({}) is concurrency_cap_of({"maxConcurrency": 0}) is None


# --- the reservation script --------------------------------------------------------------


async def test_least_used_and_round_robin_stay_exact_under_concurrency(hot: HotRedis) -> None:
    quotas = Quotas(hot)
    for strategy in ("least_used", "round_robin"):
        service = f"svc-{strategy}"
        limits = [Limit("k1", 50, "daily"), Limit("k2", 50, "daily")]
        results = await asyncio.gather(
            *(quotas.reserve(service, limits, strategy=strategy) for _ in range(300))
        )
        picks = Counter(r.index for r in results)
        assert picks == {0: 50, 1: 50, None: 200}, strategy
        assert not any(r.busy for r in results)


async def test_a_cap_takes_leases_and_frees_them(hot: HotRedis, redis_client: Redis) -> None:
    quotas = Quotas(hot)
    limits = [Limit("k1", 3, "daily", max_concurrency=2)]
    first, second, third = [await quotas.reserve("svc", limits) for _ in range(3)]
    assert (first.index, second.index) == (0, 0)
    assert third.index is None
    assert third.busy
    assert third.retry_after_s == 1
    assert first.lease is not None
    assert second.lease is not None
    assert await redis_client.zcard(rkeys.in_flight("svc", "k1")) == 2
    await quotas.release([first.lease])
    again = await quotas.reserve("svc", limits)
    assert again.index == 0
    assert again.used == 3
    await quotas.release([second.lease])
    spent = await quotas.reserve("svc", limits)  # a free slot, but no quota left
    assert spent.index is None
    assert not spent.busy
    assert spent.retry_after_s >= 1


async def test_an_expired_lease_stops_counting(hot: HotRedis, redis_client: Redis) -> None:
    """A process that crashed never gives its slot back: the lease expires by Redis's clock."""
    quotas = Quotas(hot)
    limits = [Limit("k1", None, "daily", max_concurrency=1)]
    slots = rkeys.in_flight("svc", "k1")
    await redis_client.zadd(slots, {"crashed": 1})  # expired in 1970
    assert (await quotas.reserve("svc", limits)).index == 0
    assert await redis_client.zscore(slots, "crashed") is None
    await redis_client.delete(slots)
    await redis_client.zadd(slots, {"alive": 2**50})
    assert (await quotas.reserve("svc", limits)).busy


async def test_without_redis_only_an_order_is_lost() -> None:
    """Redis unreachable: a rotation over keys with nothing to count or cap falls back to the
    local order; a quota or a cap fails closed."""
    nowhere = HotRedis(Secret(f"redis://127.0.0.1:{embedded.free_port()}/0"))
    quotas = Quotas(nowhere)
    try:
        free = [Limit("k1", None, "daily"), Limit("k2", None, "daily")]
        assert (await quotas.reserve("svc", free, strategy="round_robin")).index == 0
        for limited in (Limit("k1", 5, "daily"), Limit("k1", None, "daily", max_concurrency=1)):
            with pytest.raises(RedisConnectionError):
                await quotas.reserve("svc", [limited], strategy="round_robin")
    finally:
        await nowhere.close()


# --- through the gateway -----------------------------------------------------------------


@dataclass
class Held:
    """An upstream that accepts any key, records which one came, and holds each request until
    the test opens `gate` (bounded by HOLD_TIMEOUT_S), counting requests in flight per key."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: list[str] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    peak: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    refuse: set[str] = field(default_factory=set)  # answered 429

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.arrived.append(key)
        self.in_flight[key] += 1
        self.peak[key] = max(self.peak[key], self.in_flight[key])
        self.changed.set()
        try:
            if key in self.refuse:
                return web.json_response({"error": {"message": "slow down"}}, status=429)
            async with asyncio.timeout(HOLD_TIMEOUT_S):
                await self.gate.wait()
        finally:
            self.in_flight[key] -= 1
            self.changed.set()
        return web.json_response({"ok": True})

    async def until_arrived(self, count: int) -> None:
        async with asyncio.timeout(HOLD_TIMEOUT_S):
            while len(self.arrived) < count:
                self.changed.clear()
                await self.changed.wait()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@dataclass
class Setup:
    upstream: Held
    token: str
    keys: dict[str, str]  # letter -> key id


async def setup(
    admin: TestClient[Any, Any],
    jwt: dict[str, str],
    aiohttp_server: Any,
    strategy: str,
    keys: dict[str, dict[str, Any]],
    *,
    hold: bool = False,
) -> Setup:
    """`openai` pointed at a Held upstream (open unless `hold`) with `strategy`, and one key
    per letter (created in order, so the first is the oldest), before the gateway's first
    request (it loads the catalog and keys then)."""
    upstream = Held()
    if not hold:
        upstream.gate.set()
    server = await aiohttp_server(upstream.app())
    resp = await admin.put(
        f"/services/{SERVICE}",
        headers=jwt,
        json={"base_url": f"http://127.0.0.1:{server.port}", "strategy": strategy},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["strategy"] == strategy
    ids = {}
    for letter, fields in keys.items():
        body = {"key": secret(letter), "service": SERVICE, "name": letter, **fields}
        resp = await admin.post("/keys", headers=jwt, json=body)
        assert resp.status == 201, await resp.text()
        ids[letter] = (await resp.json())["id"]
    resp = await admin.post("/tokens", headers=jwt, json={"name": "s", "services": [SERVICE]})
    assert resp.status == 201
    return Setup(upstream, (await resp.json())["token"], ids)


async def served(gateway: TestClient[Any, Any], token: str, **headers: str) -> tuple[int, str]:
    resp = await gateway.get("/openai/v1/models", headers={"X-Wallet-Token": token, **headers})
    await resp.read()
    return resp.status, resp.headers.get("X-Wallet-Key-Id", "")


def letters(s: Setup, key_ids: list[str]) -> str:
    by_id = {key_id: letter for letter, key_id in s.keys.items()}
    return "".join(by_id.get(key_id, "?") for key_id in key_ids)


async def leases_released(app: web.Application) -> None:
    releases = [t for t in app[TASKS] if t.get_name() == "release-leases"]
    await asyncio.gather(*releases)


async def test_priority_without_quota_or_cap_skips_redis(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    redis_client: Redis,
) -> None:
    s = await setup(admin_client, as_admin, aiohttp_server, "priority", {"A": {}, "B": {}})
    for _ in range(3):
        assert await served(gateway_client, s.token) == (200, s.keys["A"])
    assert await redis_client.keys("wallet:{quota:openai}*") == []  # the script never ran
    resp = await admin_client.put(
        "/services/openai", headers=as_admin, json={"strategy": "round_robin"}
    )
    assert resp.status == 200
    async with asyncio.timeout(5):  # the gateway hears of the change over pub/sub
        while (await served(gateway_client, s.token))[1] != s.keys["B"]:
            pass
    assert await redis_client.exists(rkeys.rotation(SERVICE))


async def test_round_robin_takes_turns_within_the_top_group(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    top = {"tier": "free", "priority": 5}
    s = await setup(
        admin_client,
        as_admin,
        aiohttp_server,
        "round_robin",
        {
            "A": {**top, "metadata": {"quota": 3}},
            "B": {**top, "metadata": {"quota": 5}},
            "C": {"tier": "free", "priority": 0},
            "D": {"tier": "paid", "priority": 9},
        },
    )
    picks = [await served(gateway_client, s.token) for _ in range(10)]
    assert {status for status, _ in picks} == {200}
    # In turn while both are usable; B alone once A is spent; C only once B is spent too.
    assert letters(s, [key_id for _, key_id in picks]) == "ABABABBBCC"


async def test_a_session_sticks_to_its_key_under_round_robin(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    s = await setup(admin_client, as_admin, aiohttp_server, "round_robin", {"A": {}, "B": {}})
    session = {"X-Wallet-Session": "conversation-1"}
    sticky = [(await served(gateway_client, s.token, **session))[1] for _ in range(4)]
    assert len(set(sticky)) == 1
    others = [(await served(gateway_client, s.token))[1] for _ in range(4)]
    assert set(others) == set(s.keys.values())


async def test_least_used_picks_the_key_with_the_fewest_requests(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    redis_client: Redis,
) -> None:
    # Paid keys without a quota: least_used counts them all the same.
    s = await setup(
        admin_client,
        as_admin,
        aiohttp_server,
        "least_used",
        {"A": {}, "B": {}, "C": {"priority": -1}},
    )
    today = window("daily", datetime.now(UTC)).id
    await redis_client.incrby(rkeys.quota_counter(SERVICE, s.keys["A"], today), 3)
    picks = [(await served(gateway_client, s.token))[1] for _ in range(7)]
    # B catches up with A's 3, then the tie goes to the oldest and they alternate.
    assert letters(s, picks) == "BBBABAB"
    used = [await redis_client.get(rkeys.quota_counter(SERVICE, s.keys[k], today)) for k in "AB"]
    assert used == [b"5", b"5"]


async def test_weighted_shares_follow_the_weights(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    s = await setup(
        admin_client,
        as_admin,
        aiohttp_server,
        "weighted",
        {
            "A": {"metadata": {"weight": 3}},
            "B": {"metadata": {"weight": 1}},
            "C": {"priority": -1, "metadata": {"weight": 100}},
        },
    )
    picks: list[str] = []
    for _ in range(8):
        batch = await asyncio.gather(*(served(gateway_client, s.token) for _ in range(50)))
        picks += [key_id for _, key_id in batch]
    counts = Counter(letters(s, picks))
    assert counts["C"] == 0
    assert counts["A"] + counts["B"] == 400
    # Binomial(400, 3/4): mean 300, sd 8.7; an even split (200) is far outside.
    assert 250 <= counts["A"] <= 350, counts


async def held_calls(
    gateway: TestClient[Any, Any], s: Setup, count: int, reaching: int
) -> list[tuple[int, dict[str, str], dict[str, Any]]]:
    """`count` concurrent requests; once `reaching` of them are held at the upstream and the
    others answered, the upstream lets them all go. The answers, in order."""

    async def call() -> tuple[int, dict[str, str], dict[str, Any]]:
        resp = await gateway.get("/openai/v1/models", headers={"X-Wallet-Token": s.token})
        return resp.status, dict(resp.headers), await resp.json()

    async with asyncio.timeout(HOLD_TIMEOUT_S), asyncio.TaskGroup() as group:
        calls = [group.create_task(call()) for _ in range(count)]
        await s.upstream.until_arrived(reaching)
        while sum(c.done() for c in calls) < count - reaching:
            await asyncio.wait(
                [c for c in calls if not c.done()], return_when=asyncio.FIRST_COMPLETED
            )
        assert len(s.upstream.arrived) == reaching  # nothing more while they are held
        s.upstream.gate.set()
    return [c.result() for c in calls]


async def test_a_capped_key_never_has_more_in_flight_than_its_cap(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    redis_client: Redis,
) -> None:
    s = await setup(
        admin_client,
        as_admin,
        aiohttp_server,
        "priority",
        {"A": {"metadata": {"maxConcurrency": 2}}},
        hold=True,
    )
    results = await held_calls(gateway_client, s, 10, reaching=2)
    assert Counter(status for status, _, _ in results) == {200: 2, 429: 8}
    assert s.upstream.peak[secret("A")] == 2
    for status, headers, body in results:
        if status == 429:
            assert body["error"]["code"] == "keys_busy"
            assert headers["Retry-After"] == "1"
            assert headers["x-should-retry"] == "true"
    await leases_released(gateway_client.app)
    assert await redis_client.zcard(rkeys.in_flight(SERVICE, s.keys["A"])) == 0
    again = await asyncio.gather(*(served(gateway_client, s.token) for _ in range(2)))
    assert again == [(200, s.keys["A"])] * 2  # the slots came back


async def test_the_overflow_goes_to_the_next_key(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    s = await setup(
        admin_client,
        as_admin,
        aiohttp_server,
        "priority",
        {"A": {"tier": "free", "metadata": {"maxConcurrency": 2}}, "B": {"tier": "paid"}},
        hold=True,
    )
    results = await held_calls(gateway_client, s, 10, reaching=10)
    assert [status for status, _, _ in results] == [200] * 10
    assert s.upstream.peak == {secret("A"): 2, secret("B"): 8}
    assert Counter(letters(s, [h["X-Wallet-Key-Id"] for _, h, _ in results])) == {"A": 2, "B": 8}


async def test_a_refused_key_gives_its_slot_back_at_once(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    redis_client: Redis,
) -> None:
    s = await setup(
        admin_client,
        as_admin,
        aiohttp_server,
        "priority",
        {"A": {"tier": "free", "metadata": {"maxConcurrency": 1}}, "B": {"tier": "paid"}},
        hold=True,
    )
    s.upstream.refuse.add(secret("A"))
    slots = rkeys.in_flight(SERVICE, s.keys["A"])
    answer = asyncio.gather(served(gateway_client, s.token))
    await s.upstream.until_arrived(2)  # A refused, B holding the request
    await leases_released(gateway_client.app)
    assert await redis_client.zcard(slots) == 0  # while the request is still in flight
    s.upstream.gate.set()
    assert list(await answer) == [(200, s.keys["B"])]


@pytest.fixture
async def served_gateway(settings: Settings, world: Any) -> Any:
    """A gateway served as production serves it: a client hanging up cancels its handler."""
    app = create_gateway_app(settings)
    runner = make_runner("gateway", app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield app, runner.addresses[0][1]
    finally:
        async with asyncio.timeout(5):
            await runner.cleanup()


async def test_a_client_hanging_up_gives_the_slot_back(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    redis_client: Redis,
    served_gateway: tuple[web.Application, int],
) -> None:
    app, port = served_gateway
    s = await setup(
        admin_client,
        as_admin,
        aiohttp_server,
        "priority",
        {"A": {"metadata": {"maxConcurrency": 1}}},
        hold=True,
    )
    slots = rkeys.in_flight(SERVICE, s.keys["A"])
    url = f"http://127.0.0.1:{port}/openai/v1/models"
    async with aiohttp.ClientSession() as session:
        call = asyncio.gather(session.get(url, headers={"X-Wallet-Token": s.token}))
        await s.upstream.until_arrived(1)
        assert await redis_client.zcard(slots) == 1
        call.cancel()  # the client hangs up while the upstream holds the request
        async with asyncio.timeout(HOLD_TIMEOUT_S):
            while await redis_client.zcard(slots):
                await leases_released(app)
                await asyncio.sleep(0.01)
    s.upstream.gate.set()


# --- the admin API -----------------------------------------------------------------------


async def test_strategy_and_cost_model_are_set_shown_and_audited(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], as_alice: dict[str, str]
) -> None:
    resp = await admin_client.get("/services/openai", headers=as_alice)
    assert (await resp.json())["strategy"] == "priority"
    assert (await resp.json())["cost_model"] is None
    change = {"strategy": "weighted", "cost_model": {"per_call": 0.002, "hold": "0.01"}}
    resp = await admin_client.put("/services/openai", headers=as_admin, json=change)
    assert resp.status == 200, await resp.text()
    updated = await resp.json()
    assert updated["strategy"] == "weighted"
    assert updated["cost_model"] == {"per_call": "0.002", "hold": "0.01"}
    resp = await admin_client.get("/services/openai", headers=as_alice)
    assert await resp.json() == updated
    resp = await admin_client.put("/services/openai", headers=as_admin, json={"cost_model": None})
    assert (await resp.json())["cost_model"] is None
    assert (await resp.json())["strategy"] == "weighted"
    resp = await admin_client.get("/audit?limit=500", headers=as_admin)
    changed = [
        e["details"].get("changed")
        for e in (await resp.json())["items"]
        if e.get("action") == "service.update" and e.get("target_id") == "openai"
    ]
    assert ["cost_model", "strategy"] in changed
    assert ["cost_model"] in changed
    new = {
        "slug": "acme",
        "base_url": "https://api.acme.test",
        "auth": {"type": "bearer"},
        "strategy": "least_used",
        "cost_model": {"per_call": "1"},
    }
    resp = await admin_client.post("/services", headers=as_admin, json=new)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert (created["strategy"], created["cost_model"]) == ("least_used", {"per_call": "1"})


@pytest.mark.parametrize(
    ("body", "field_name"),
    [
        ({"strategy": "fastest"}, "strategy"),
        ({"strategy": None}, "strategy"),
        ({"strategy": 1}, "strategy"),
        ({"cost_model": "cheap"}, "cost_model"),
        ({"cost_model": {"per_call": "-1"}}, "cost_model.per_call"),
        ({"cost_model": {"per_call": "free"}}, "cost_model.per_call"),
        ({"cost_model": {"surprise": 1}}, "cost_model"),
    ],
)
async def test_bad_strategy_or_cost_model_is_refused(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], body: Any, field_name: str
) -> None:
    for method, path, payload in (
        ("PUT", "/services/openai", body),
        (
            "POST",
            "/services",
            {"slug": "acme", "base_url": "https://a.test", "auth": {"type": "bearer"}, **body},
        ),
    ):
        resp = await admin_client.request(method, path, headers=as_admin, json=payload)
        error = await assert_error(resp, 422, "validation_error")
        assert error["field"] == field_name
    resp = await admin_client.get("/services/openai", headers=as_admin)
    assert (await resp.json())["strategy"] == "priority"


@pytest.mark.parametrize(
    ("metadata", "field_name"),
    [
        ({"weight": 0}, "metadata.weight"),
        ({"weight": -2}, "metadata.weight"),
        ({"weight": "3"}, "metadata.weight"),
        ({"weight": True}, "metadata.weight"),
        ({"weight": float("nan")}, "metadata.weight"),
        ({"weight": 10**7}, "metadata.weight"),
        ({"maxConcurrency": 0}, "metadata.maxConcurrency"),
        ({"maxConcurrency": 1.5}, "metadata.maxConcurrency"),
        ({"maxConcurrency": "2"}, "metadata.maxConcurrency"),
        ({"maxConcurrency": True}, "metadata.maxConcurrency"),
    ],
)
async def test_bad_weight_or_cap_is_refused(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], metadata: Any, field_name: str
) -> None:
    body = {"key": secret("W"), "service": SERVICE, "metadata": metadata}
    resp = await admin_client.post("/keys", headers=as_admin, json=body)
    error = await assert_error(resp, 422, "validation_error")
    assert error["field"] == field_name


async def test_weight_and_cap_are_kept(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str]
) -> None:
    metadata = {"weight": 2.5, "maxConcurrency": 3}
    body = {"key": secret("W"), "service": SERVICE, "metadata": metadata}
    resp = await admin_client.post("/keys", headers=as_admin, json=body)
    assert resp.status == 201, await resp.text()
    assert (await resp.json())["metadata"] == metadata
