"""REDIS_CLUSTER against a real three-node Redis Cluster (tests/cluster.py): the hot path's
client routes each script to the node serving its keys and follows -MOVED and -ASK while a
slot migrates; the gateway and admin apps serve, count quotas, hear invalidations and
throttle logins through it."""

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
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from admin.app import create_app as create_admin_app
from admin.embedded import free_port
from gateway import invalidation, rkeys
from gateway.app import create_app as create_gateway_app
from gateway.hotredis import HotCluster, HotScript, key_slot
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
