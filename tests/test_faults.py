"""Faults: the gateway's Redis stops and comes back while the gateway keeps running. Quotas
fail closed (503) while it is gone, keys without a quota keep being served, and everything
recovers without a restart."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient

from admin import embedded
from gateway.app import create_app as create_gateway_app
from gateway.secret import Secret
from gateway.settings import Settings
from tests.conftest import with_settings
from tests.fakes import FakeUpstream

QUOTA_KEY = "sk-proj-" + "R" * 40
WEATHER_KEY = "0123456789abcdef0123456789abcdef"
START_TIMEOUT_S = 10.0


class PrivateRedis:
    """A redis-server of this test's own, on a fixed port so that it can come back there."""

    def __init__(self, workdir: Path) -> None:
        self.port = embedded.free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                str(embedded._redis_bin()),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
            pytest.fail("the private redis-server did not start")
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_outage_fails_quotas_closed_and_recovers_without_a_restart(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
    private_redis: PrivateRedis,
) -> None:
    upstreams = {}
    for service, key, auth in (
        ("openai", QUOTA_KEY, "bearer"),
        ("openweather", WEATHER_KEY, "query:appid"),
    ):
        upstream = FakeUpstream(key, auth)
        server = await aiohttp_server(upstream.app())
        upstreams[service] = upstream
        resp = await admin_client.put(
            f"/services/{service}",
            headers=as_admin,
            json={"base_url": f"http://127.0.0.1:{server.port}"},
        )
        assert resp.status == 200
    keys = (
        {"key": QUOTA_KEY, "service": "openai", "metadata": {"quota": 1000}},
        {"key": WEATHER_KEY, "service": "openweather", "tier": "paid"},  # no quota
    )
    for key in keys:
        resp = await admin_client.post("/keys", headers=as_admin, json=key)
        assert resp.status == 201, await resp.text()
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "f", "services": ["openai", "openweather"]}
    )
    token = (await resp.json())["token"]
    auth = {"X-Wallet-Token": token}

    gateway: TestClient[Any, Any] = await aiohttp_client(
        create_gateway_app(with_settings(settings, redis_url=Secret(private_redis.url)))
    )
    assert (await gateway.get("/openai/v1/models", headers=auth)).status == 200
    assert (await gateway.get("/openweather/data/2.5/weather", headers=auth)).status == 200

    private_redis.stop()
    resp = await gateway.get("/openai/v1/models", headers=auth)
    assert resp.status == 503  # a quota that cannot be counted is not spent blindly
    assert (await resp.json())["error"]["code"] == "redis_unavailable"
    assert len(upstreams["openai"].seen) == 1
    # A key without a quota needs no Redis: still served.
    assert (await gateway.get("/openweather/data/2.5/weather", headers=auth)).status == 200

    private_redis.start()
    for _ in range(50):
        resp = await gateway.get("/openai/v1/models", headers=auth)
        if resp.status == 200:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"the gateway did not recover after Redis came back: {resp.status}")
    assert len(upstreams["openai"].seen) == 2
    health = await (await gateway.get("/monitoring/health")).json()
    assert health["checks"]["redis"] == "ok"


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_outage_rate_limits_fail_open_by_choice_and_budgets_closed(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
    private_redis: PrivateRedis,
    fail_open: bool,
) -> None:
    upstream = FakeUpstream(WEATHER_KEY, "query:appid")
    server = await aiohttp_server(upstream.app())
    resp = await admin_client.put(
        "/services/openweather",
        headers=as_admin,
        json={"base_url": f"http://127.0.0.1:{server.port}", "cost_model": {"per_call": "0.01"}},
    )
    assert resp.status == 200, await resp.text()
    resp = await admin_client.post(
        "/keys",
        headers=as_alice,
        json={"key": WEATHER_KEY, "service": "openweather", "tier": "paid"},
    )
    assert resp.status == 201, await resp.text()
    tokens = []
    for fields in ({}, {"budget": {"amount": "5", "period": "daily"}}):
        resp = await admin_client.post(
            "/tokens", headers=as_alice, json={"name": "f", "services": ["openweather"], **fields}
        )
        tokens.append((await resp.json())["token"])
    limited, budgeted = ({"X-Wallet-Token": token} for token in tokens)
    gateway: TestClient[Any, Any] = await aiohttp_client(
        create_gateway_app(
            with_settings(
                settings, redis_url=Secret(private_redis.url), rate_limits_fail_open=fail_open
            )
        )
    )
    path = "/openweather/data/2.5/weather"
    for auth in (limited, budgeted):
        resp = await gateway.get(path, headers=auth)
        assert resp.status == 200
        assert resp.headers["RateLimit-Limit"] == "600"  # alice's tier: free

    private_redis.stop()
    resp = await gateway.get(path, headers=limited)
    if fail_open:
        assert resp.status == 200  # served without counting
        assert "RateLimit-Limit" not in resp.headers
    else:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "redis_unavailable"
    resp = await gateway.get(path, headers=budgeted)  # a budget is never spent blindly
    assert resp.status == 503
    assert len(upstream.seen) == 2 + fail_open

    private_redis.start()
    for _ in range(50):
        resp = await gateway.get(path, headers=budgeted)
        if resp.status == 200:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"the gateway did not recover after Redis came back: {resp.status}")


async def test_quotas_may_be_configured_to_fail_open(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
    private_redis: PrivateRedis,
) -> None:
    upstream = FakeUpstream(QUOTA_KEY)
    server = await aiohttp_server(upstream.app())
    resp = await admin_client.put(
        "/services/openai", headers=as_admin, json={"base_url": f"http://127.0.0.1:{server.port}"}
    )
    assert resp.status == 200
    key = {"key": QUOTA_KEY, "service": "openai", "metadata": {"quota": 5, "maxConcurrency": 3}}
    resp = await admin_client.post("/keys", headers=as_admin, json=key)
    assert resp.status == 201, await resp.text()
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "f", "services": ["openai"]}
    )
    auth = {"X-Wallet-Token": (await resp.json())["token"]}
    open_settings = with_settings(
        settings, redis_url=Secret(private_redis.url), quotas_fail_open=True
    )
    gateway: TestClient[Any, Any] = await aiohttp_client(create_gateway_app(open_settings))
    assert (await gateway.get("/openai/v1/models", headers=auth)).status == 200
    private_redis.stop()
    for _ in range(8):  # more than the quota: nothing is counted while Redis is away
        assert (await gateway.get("/openai/v1/models", headers=auth)).status == 200
    assert len(upstream.seen) == 9
