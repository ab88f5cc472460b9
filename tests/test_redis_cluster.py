"""REDIS_CLUSTER against a real three-node Redis Cluster (tests/cluster.py): the hot path's
client routes each script to the node serving its keys and follows -MOVED and -ASK while a
slot migrates, and a hung node stalls only its own slots; the gateway and admin apps serve,
count quotas, hear invalidations and throttle logins through it, and answer 503 (not 500)
when no node of the cluster answers."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, make_mocked_request
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from admin.app import create_app as create_admin_app
from admin.console import keys as console_keys
from admin.embedded import free_port
from gateway import hotcluster, hotredis, invalidation, keys, rkeys
from gateway.app import create_app as create_gateway_app
from gateway.appkeys import POOL
from gateway.hotcluster import HotCluster, key_slot, node_address, reload_order
from gateway.hotredis import HotScript
from gateway.quota import REFUND, Limit, Quotas
from gateway.secret import Secret
from gateway.settings import Settings
from tests.cluster import LocalCluster, local_cluster
from tests.conftest import (
    ADMIN_PASSWORD,
    USER_PASSWORD,
    Servers,
    World,
    assert_error,
    login,
    with_settings,
)
from tests.consoletools import page, sign_in
from tests.fakes import FakeUpstream

OPENAI_KEY = "sk-proj-" + "C" * 40

Client = TestClient[Any, Any]


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="wallet-cluster-"))
    try:
        with local_cluster(root) as started:
            yield started
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def clean_cluster(cluster: LocalCluster) -> LocalCluster:
    cluster.flush()
    return cluster


@pytest.fixture
async def hot(clean_cluster: LocalCluster) -> AsyncIterator[HotCluster]:
    client = HotCluster(clean_cluster.url(1))  # any node will do: the others are found
    try:
        yield client
    finally:
        await client.close()


def services_on_every_node(cluster: LocalCluster) -> dict[int, str]:
    """A service slug per node, whose quota counters that node serves."""
    found: dict[int, str] = {}
    for i in range(200):
        slug = f"svc{i}"
        slot = key_slot(rkeys.quota_counter(slug, "k", "d1").encode())
        found.setdefault(cluster.owner(slot), slug)
        if len(found) == len(cluster.ports):
            return found
    raise AssertionError("no service name for some node")


async def test_key_slots_are_the_clusters(cluster: LocalCluster) -> None:
    keys = [
        rkeys.quota_counter("openai", "k1", "d20261126"),
        rkeys.rate_counter("user-1", None, "m1"),
        rkeys.console_session("abc"),
        "plain",
        "{}empty-tag",
        "{unclosed",
        "a{b}{c}",
        "é{ü}",
    ]
    plain = cluster.client(0)
    try:
        for key in keys:
            assert key_slot(key.encode()) == plain.execute_command("CLUSTER KEYSLOT", key), key
    finally:
        plain.close()


async def test_every_script_keeps_its_keys_in_one_slot() -> None:
    quota = {
        rkeys.quota_counter("openai", "k1", "d1"),
        rkeys.quota_counter("openai", "k2", "M1"),
        rkeys.in_flight("openai", "k1"),
        rkeys.rotation("openai"),
    }
    caller = {
        rkeys.rate_counter("u1", None, "m1"),
        rkeys.rate_counter("u1", "t1", "m1"),
        rkeys.spend_counter("u1", "token", "t1", "d1"),
        rkeys.spend_counter("u1", "user", "t1", "M1"),
    }
    login_keys = {rkeys.login_failures_user("alice"), rkeys.login_failures_addr("10.1.2.3")}
    for group in (quota, caller, login_keys):
        assert len({key_slot(k.encode()) for k in group}) == 1, group


async def test_reservations_are_exact_on_every_node(
    hot: HotCluster, clean_cluster: LocalCluster
) -> None:
    services = services_on_every_node(clean_cluster)
    quotas = Quotas(hot)
    limits = [Limit("k1", 30, "daily"), Limit("k2", 20, "daily")]

    async def burst(service: str) -> list[int | None]:
        results = await asyncio.gather(*(quotas.reserve(service, limits) for _ in range(200)))
        return [r.index for r in results]

    bursts = await asyncio.gather(*(burst(s) for s in services.values()))
    for indexes in bursts:  # 200 against 30 + 20 on each node: exactly 50 through
        assert indexes.count(0) == 30
        assert indexes.count(1) == 20
        assert indexes.count(None) == 150
    assert hot.redirects == 0  # every script went straight to the node serving its keys
    # Each service's counters are on its own node, and nowhere else.
    for node, service in services.items():
        reservation = await quotas.reserve(service, limits)
        assert reservation.index is None
        for other in range(len(clean_cluster.ports)):
            plain = clean_cluster.client(other)
            try:
                names = plain.keys(f"wallet:{{quota:{service}}}:*")
            finally:
                plain.close()
            assert bool(names) == (other == node), (service, other)


async def test_scripts_are_loaded_on_each_node_that_lacks_them(
    hot: HotCluster, clean_cluster: LocalCluster
) -> None:
    services = services_on_every_node(clean_cluster)
    quotas = Quotas(hot)
    for service in services.values():
        assert (await quotas.reserve(service, [Limit("k", 5, "daily")])).used == 1
    for index in range(len(clean_cluster.ports)):
        plain = clean_cluster.client(index)
        try:
            plain.script_flush()
        finally:
            plain.close()
    for service in services.values():  # NOSCRIPT on each node, then EVAL there
        assert (await quotas.reserve(service, [Limit("k", 5, "daily")])).used == 2


async def test_a_moved_slot_is_followed(hot: HotCluster, clean_cluster: LocalCluster) -> None:
    services = services_on_every_node(clean_cluster)
    source, service = next(iter(services.items()))
    target = (source + 1) % len(clean_cluster.ports)
    quotas = Quotas(hot)
    limits = [Limit("k1", 100, "daily")]
    first = await quotas.reserve(service, limits)
    assert first.used == 1
    assert first.counter is not None
    slot = key_slot(first.counter.encode())
    clean_cluster.move_slot(slot, source, target)
    try:
        # The client's map still says `source`, which now answers -MOVED.
        results = await asyncio.gather(*(quotas.reserve(service, limits) for _ in range(20)))
        assert sorted(r.used for r in results) == list(range(2, 22))
        assert hot.redirects >= 1
        redirects = hot.redirects
        assert (await quotas.reserve(service, limits)).used == 22
        assert hot.redirects == redirects  # the map was reloaded: straight to `target` now
        plain = clean_cluster.client(target)
        try:
            assert plain.get(first.counter) == b"22"
        finally:
            plain.close()
    finally:
        clean_cluster.move_slot(slot, target, source)
    assert (await quotas.reserve(service, limits)).used == 23  # and back again


async def test_ask_is_followed_while_a_slot_migrates(
    hot: HotCluster, clean_cluster: LocalCluster
) -> None:
    key = "wallet:{ask-test}:counter"
    slot = key_slot(key.encode())
    source = clean_cluster.owner(slot)
    target = (source + 1) % len(clean_cluster.ports)
    assert await hot.execute("INCR", key) == 1
    clean_cluster.begin_migration(slot, source, target)
    try:
        clean_cluster.migrate_keys(slot, source, target)
        # `source` still owns the slot but no longer has the key: it answers -ASK.
        assert await hot.execute("INCR", key) == 2
        assert hot.redirects == 1
        refund = HotScript(hot, REFUND)  # a script too, loaded on `target` under ASKING
        assert await refund(keys=[key], args=[]) == 1
        assert await hot.execute("GET", key) == b"1"
    finally:
        clean_cluster.finish_migration(slot, target)
    assert await hot.execute("INCR", key) == 2  # -MOVED now, once
    clean_cluster.move_slot(slot, target, source)


async def test_an_unreachable_cluster_is_a_connection_error() -> None:
    client = HotCluster(Secret(f"redis://:pw@127.0.0.1:{free_port()}/0"))
    try:
        results = await asyncio.gather(
            *(client.execute("GET", f"k{i}") for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(r, RedisConnectionError) for r in results), results
        assert not any("127.0.0.1" in str(r) or "pw" in str(r) for r in results)
    finally:
        await client.close()


async def test_a_standalone_redis_is_refused_plainly(servers: Servers) -> None:
    client = HotCluster(servers.redis_url)
    try:
        with pytest.raises(ResponseError, match="cluster support disabled"):
            await client.execute("GET", "k")
    finally:
        await client.close()
    with pytest.raises(ValueError, match="database 0"):
        HotCluster(Secret("redis://127.0.0.1:6379/3"))


def key_on(cluster: LocalCluster, node: int) -> str:
    """A key that node `node` serves."""
    for i in range(500):
        key = f"key{i}"
        if cluster.owner(key_slot(key.encode())) == node:
            return key
    raise AssertionError(f"no key for node {node}")


def launch(*commands: Any) -> list[asyncio.Future[Any]]:
    return [asyncio.ensure_future(c) for c in commands]  # noqa: TID251 - each awaited by the test


def test_a_redirect_without_a_host_is_to_the_node_that_replied() -> None:
    assert node_address(":7002", "10.0.0.9") == ("10.0.0.9", 7002)  # not REDIS_URL's host
    assert node_address("10.0.0.1:6379", "10.0.0.9") == ("10.0.0.1", 6379)
    assert node_address("[::1]:6380", "10.0.0.9") == ("::1", 6380)


def test_the_map_is_asked_of_each_node_once_and_of_failed_ones_last() -> None:
    serving = ["a", "a", None, "b", "c", "c"]  # slot order, as in the map
    assert reload_order(serving, "b", set()) == ["a", "b", "c"]  # REDIS_URL's node once
    assert reload_order(serving, "d", {"a"}) == ["b", "c", "d", "a"]
    assert reload_order([None, None], "seed", {"seed"}) == ["seed"]


async def test_a_hung_node_stalls_only_its_own_slots(
    hot: HotCluster, clean_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hotredis, "COMMAND_TIMEOUT_S", 0.5)
    hung, healthy = key_on(clean_cluster, 0), key_on(clean_cluster, 1)
    assert await hot.execute("GET", hung) is None  # the map loaded, both nodes connected
    assert await hot.execute("GET", healthy) is None
    with clean_cluster.hung(0):
        with pytest.raises(RedisTimeoutError):
            await hot.execute("GET", hung)
        started = time.monotonic()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*(hot.execute("GET", healthy) for _ in range(10)))
        assert results == [None] * 10
        assert time.monotonic() - started < 0.4  # no wait for a reload (was 2 timeouts: 1 s)
        # The map is loaded again behind them, from a node that answers: the hung one, which
        # failed a moment ago, is asked last.
        started = time.monotonic()
        async with asyncio.timeout(5):
            await hot.reload()
        assert time.monotonic() - started < 0.5 * hotcluster.SLOTS_TIMEOUT_S


async def test_a_hung_node_answers_the_slot_map_in_its_own_short_time(
    clean_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hotcluster, "SLOTS_TIMEOUT_S", 0.3)  # a command's stays at 5 s
    client = HotCluster(clean_cluster.url(0))
    try:
        with clean_cluster.hung(0):
            started = time.monotonic()
            with pytest.raises(RedisConnectionError, match="no node"):
                async with asyncio.timeout(3):
                    await client.execute("GET", "k")
            assert time.monotonic() - started < 1.5
    finally:
        await client.close()


async def test_a_cancelled_command_fails_no_other_during_a_reload(
    hot: HotCluster, clean_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hotredis, "COMMAND_TIMEOUT_S", 0.3)
    hung, healthy = key_on(clean_cluster, 0), key_on(clean_cluster, 1)
    assert await hot.execute("GET", hung) is None
    with clean_cluster.hung(0):
        with pytest.raises(RedisTimeoutError):
            await hot.execute("GET", hung)  # the map is stale now
        commands = launch(*(hot.execute("GET", healthy) for _ in range(20)))
        await asyncio.sleep(0.45)  # a reload may be under way (and asking the hung node)
        commands[1].cancel()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*commands, return_exceptions=True)
    assert [r for i, r in enumerate(results) if i != 1] == [None] * 19


async def test_a_command_cancelled_while_the_first_map_loads_leaves_it_to_the_others(
    clean_cluster: LocalCluster,
) -> None:
    client = HotCluster(clean_cluster.url(0))
    nodes = range(len(clean_cluster.ports))
    try:
        for index in nodes:
            clean_cluster.reset_stats(index)
        with clean_cluster.hung(0):  # the load waits for the node's answer
            (first,) = launch(client.execute("GET", "a"))
            await asyncio.sleep(0.05)
            others = launch(*(client.execute("GET", f"k{i}") for i in range(19)))
            await asyncio.sleep(0.05)
            first.cancel()
        async with asyncio.timeout(5):
            assert await asyncio.gather(*others) == [None] * 19
        assert first.cancelled()
        assert sum(clean_cluster.calls(index, "cluster") for index in nodes) == 1
    finally:
        await client.close()


async def test_commands_arriving_during_a_load_share_it(
    hot: HotCluster, clean_cluster: LocalCluster
) -> None:
    nodes = range(len(clean_cluster.ports))
    for index in nodes:
        clean_cluster.reset_stats(index)
    results = await asyncio.gather(*(hot.execute("GET", f"k{i}") for i in range(50)))
    assert results == [None] * 50
    # One CLUSTER SLOTS for all fifty (not a second one, to a node of the new map).
    assert sum(clean_cluster.calls(index, "cluster") for index in nodes) == 1


async def test_a_node_refusing_the_slot_map_is_passed_over(
    hot: HotCluster, clean_cluster: LocalCluster
) -> None:
    key = key_on(clean_cluster, 1)
    slot = key_slot(key.encode())
    assert await hot.execute("INCR", key) == 1
    clean_cluster.move_slot(slot, 1, 2)
    refusing = clean_cluster.client(0)  # node 0 serves the first slots: it is asked first
    try:
        refusing.execute_command("ACL SETUSER default -cluster")  # -NOPERM for CLUSTER SLOTS
        assert await hot.execute("INCR", key) == 2  # -MOVED: the map is stale
        assert await hot.execute("INCR", key) == 3  # the map is loaded again: from node 1
        await hot.reload()
        assert await hot.execute("INCR", key) == 4
    finally:
        refusing.execute_command("ACL SETUSER default +cluster")
        refusing.close()
        clean_cluster.move_slot(slot, 2, 1)


async def test_tryagain_is_waited_out_past_the_redirect_budget(
    hot: HotCluster, clean_cluster: LocalCluster
) -> None:
    first, second = "{tryagain}a", "{tryagain}b"
    slot = key_slot(first.encode())
    source = clean_cluster.owner(slot)
    target = (source + 1) % len(clean_cluster.ports)
    assert await hot.execute("SET", first, "1") == b"OK"
    assert await hot.execute("SET", second, "2") == b"OK"
    clean_cluster.begin_migration(slot, source, target)
    try:
        clean_cluster.migrate([first.encode()], source, target)  # the keys apart: -TRYAGAIN
        (both,) = launch(hot.execute("MGET", first, second))
        # Longer than MAX_REDIRECTS tries TRYAGAIN_DELAY_S apart, well within the budget.
        await asyncio.sleep(8 * hotcluster.TRYAGAIN_DELAY_S)
        clean_cluster.migrate([second.encode()], source, target)  # together again: -ASK
        async with asyncio.timeout(2):
            assert await both == [b"1", b"2"]
    finally:
        clean_cluster.finish_migration(slot, target)
        clean_cluster.move_slot(slot, target, source)


# The apps on the cluster.


@pytest.fixture
def cluster_settings(settings: Settings, clean_cluster: LocalCluster) -> Settings:
    return with_settings(settings, redis_url=clean_cluster.url(2), redis_cluster=True)


@pytest.fixture
async def apps(
    aiohttp_client: Any, cluster_settings: Settings, world: World
) -> tuple[Client, Client]:
    admin: Client = await aiohttp_client(create_admin_app(cluster_settings))
    gateway: Client = await aiohttp_client(create_gateway_app(cluster_settings))
    return admin, gateway


async def wire(
    admin: Client, aiohttp_server: Any, quota: int
) -> tuple[FakeUpstream, dict[str, Any], str]:
    """The openai service on a fake upstream; alice's key (with `quota`) and token. alice is
    on the free tier, whose rate limit is counted too (an admin has none)."""
    upstream = FakeUpstream(OPENAI_KEY)
    server = await aiohttp_server(upstream.app())
    jwt = await login(admin)
    resp = await admin.put(
        "/services/openai", headers=jwt, json={"base_url": f"http://127.0.0.1:{server.port}"}
    )
    assert resp.status == 200, await resp.text()
    alice = await login(admin, "alice", USER_PASSWORD)
    resp = await admin.post(
        "/keys",
        headers=alice,
        json={"key": OPENAI_KEY, "service": "openai", "metadata": {"quota": quota}},
    )
    assert resp.status == 201, await resp.text()
    key_id = (await resp.json())["id"]
    resp = await admin.post("/tokens", headers=alice, json={"name": "c", "services": ["openai"]})
    assert resp.status == 201, await resp.text()
    return upstream, await resp.json(), key_id


async def test_the_apps_count_quotas_and_drop_a_revoked_token_on_the_cluster(
    apps: tuple[Client, Client], aiohttp_server: Any
) -> None:
    admin, gateway = apps
    upstream, token, key_id = await wire(admin, aiohttp_server, quota=5)
    auth = {"X-Wallet-Token": token["token"]}
    remaining: list[int] = []

    async def call() -> int:
        resp = await gateway.get("/openai/v1/models", headers=auth)
        await resp.read()
        if "RateLimit-Remaining" in resp.headers:
            remaining.append(int(resp.headers["RateLimit-Remaining"]))
        return resp.status

    statuses = await asyncio.gather(*(call() for _ in range(12)))
    assert statuses.count(200) == 5 == len(upstream.seen)
    assert statuses.count(429) == 7
    # The client rate limit (the free tier's) counted all 12, by its own script and node (the
    # 200s say what was left: one count each).
    assert len(set(remaining)) == len(remaining) == 5
    assert set(remaining) <= set(range(600 - 12, 600))

    # The quota gauges read the counters back (one MGET per service, through the cluster).
    metrics = await (await gateway.get("/monitoring/metrics")).text()
    used = re.search(rf'wallet_key_quota_used{{[^}}]*key_id="{key_id}"}} (\S+)', metrics)
    assert used is not None
    assert float(used[1]) == 5.0
    health = await gateway.get("/monitoring/health")
    assert health.status == 200, await health.text()

    # A revoked token stops working at the gateway within a second (pub/sub on the cluster):
    # the gateway holds it in its cache, and checks it before any quota.
    resp = await admin.delete(f"/tokens/{token['id']}", headers=await login(admin))
    assert resp.status == 204
    revoked_at = time.monotonic()
    while await call() != 401:
        assert time.monotonic() - revoked_at < 1.0, "the gateway still accepts a revoked token"
        await asyncio.sleep(0.02)


async def test_logins_are_throttled_on_the_cluster(
    apps: tuple[Client, Client], clean_cluster: LocalCluster
) -> None:
    admin, _ = apps
    for _ in range(5):
        resp = await admin.post("/auth/login", json={"username": "alice", "password": "nope" * 3})
        await assert_error(resp, 401, "unauthenticated")
    resp = await admin.post("/auth/login", json={"username": "alice", "password": USER_PASSWORD})
    await assert_error(resp, 429, "too_many_requests")
    assert 1 <= int(resp.headers["Retry-After"]) <= 900
    await login(admin, "bob", USER_PASSWORD)  # another user is not locked out
    # Both failure counters (per user, per address) were counted on one node, by one script.
    failures = rkeys.login_failures_user("alice")
    plain = clean_cluster.client(clean_cluster.owner(key_slot(failures.encode())))
    try:
        assert plain.get(failures) == b"5"
    finally:
        plain.close()


async def test_console_sessions_live_on_the_cluster(apps: tuple[Client, Client]) -> None:
    admin, _ = apps
    await sign_in(admin, "admin", ADMIN_PASSWORD)  # the session is SET on the cluster
    await page(admin, "/ui/")  # read back with GETEX: 200, not a redirect to the login


async def test_the_listener_hears_a_publish_made_on_any_node(
    clean_cluster: LocalCluster,
) -> None:
    cluster = RedisCluster.from_url(clean_cluster.url(0).reveal())
    heard: list[tuple[str, str | None]] = []
    ready, all_heard = asyncio.Event(), asyncio.Event()

    def on_message(kind: str, target: str | None) -> None:
        heard.append((kind, target))
        if len(heard) == len(clean_cluster.ports) + 1:
            all_heard.set()

    listener = asyncio.ensure_future(  # noqa: TID251 - cancelled and awaited below
        invalidation.listen(cluster, on_message, lambda: None, ready)
    )
    try:
        async with asyncio.timeout(5):
            await ready.wait()
        for index in range(len(clean_cluster.ports)):
            plain = Redis.from_url(clean_cluster.url(index).reveal())
            try:
                await invalidation.publish(plain, "token", f"t{index}")
            finally:
                await plain.aclose()
        await invalidation.publish(cluster, "user", "u1")
        async with asyncio.timeout(5):
            await all_heard.wait()
        assert sorted(heard) == [("token", "t0"), ("token", "t1"), ("token", "t2"), ("user", "u1")]
        # After a failure the listener moves on to the next node.
        subscribers = [await invalidation._subscriber(cluster, n) for n in range(3)]
        try:
            ports = {s.connection_pool.connection_kwargs["port"] for s in subscribers}
            assert ports == set(clean_cluster.ports)
        finally:
            for subscriber in subscribers:
                await subscriber.aclose()
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await cluster.aclose()


async def test_publish_and_listen_outlive_an_unreachable_cluster(
    monkeypatch: pytest.MonkeyPatch, captured_logs: Any
) -> None:
    monkeypatch.setattr(invalidation, "RECONNECT_DELAY_S", 0.01)
    cluster = RedisCluster.from_url(f"redis://:pw@127.0.0.1:{free_port()}/0")
    try:
        await invalidation.publish(cluster, "token", "t1")  # best effort: no exception
        (listener,) = launch(invalidation.listen(cluster, lambda kind, target: None, lambda: None))
        try:
            deadline = time.monotonic() + 5
            while captured_logs.getvalue().count("invalidation_listener_reconnecting") < 3:
                assert not listener.done(), listener  # it tries again, and again
                assert time.monotonic() < deadline, "the listener did not try again"
                await asyncio.sleep(0.01)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
    finally:
        await cluster.aclose()
    logged = captured_logs.getvalue()
    assert "invalidation_not_published" in logged
    assert "RedisClusterException" in logged


async def test_the_apps_answer_503_when_no_node_of_the_cluster_answers(
    aiohttp_client: Any,
    cluster_settings: Settings,
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    captured_logs: Any,
) -> None:
    monkeypatch.setattr("gateway.app.LISTENER_READY_S", 0.1)  # it will not subscribe
    up: Client = await aiohttp_client(create_admin_app(cluster_settings))
    alice = await login(up, "alice", USER_PASSWORD)  # the same JWT secret: valid on `down` too
    gone = Secret(f"redis://:pw@127.0.0.1:{free_port()}/0")
    down_settings = with_settings(cluster_settings, redis_url=gone)
    down: Client = await aiohttp_client(create_admin_app(down_settings))
    gateway: Client = await aiohttp_client(create_gateway_app(down_settings))

    resp = await down.post("/auth/login", json={"username": "alice", "password": USER_PASSWORD})
    await assert_error(resp, 503, "redis_unavailable")
    # A change is committed, then announced as best it can be.
    resp = await down.post(
        "/keys",
        headers=alice,
        json={"key": OPENAI_KEY, "service": "openai", "metadata": {"quota": 5}},
    )
    assert resp.status == 201, await resp.text()
    key_id = (await resp.json())["id"]
    resp = await down.get("/analytics/overview", headers=alice)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["quota_state"] == "unavailable"
    assert down.app is not None
    async with down.app[POOL].acquire() as conn:
        record = await keys.get_key(conn, None, key_id)
    request = make_mocked_request("GET", f"/ui/keys/{key_id}", app=down.app)
    assert (await console_keys._quota(request, record))["reading"] is None  # the page shows

    health = await gateway.get("/monitoring/health")
    assert health.status == 503
    assert (await health.json())["checks"]["redis"] == "down (RedisClusterException)"
    metrics = await gateway.get("/monitoring/metrics")
    assert metrics.status == 200, await metrics.text()
    assert "wallet_key_quota_used{" not in await metrics.text()
    # The gateway's invalidation listener and the console's rest listener still run, trying
    # again and again.
    logged = captured_logs.getvalue()
    assert "invalidation_listener_reconnecting" in logged
    assert "background_task_failed" not in logged
