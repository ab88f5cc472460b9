"""Faults: the gateway's PostgreSQL stops and comes back while the gateway keeps running.

Known tokens and loaded keys keep being served from the caches (stale-while-error, bounded
by STALE_MAX_S); what cannot be checked without PostgreSQL (a token never seen, a service
whose keys were never loaded, a token dropped by an invalidation) gets 503
`database_unavailable`, never 401 or 500; usage records stay buffered and land when
PostgreSQL is back, with no restart of the gateway. The PostgreSQL here is a private
embedded one (never the user's `DATABASE_URL` server, which a test must not stop).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from admin import bootstrap, embedded
from admin.app import create_app as create_admin_app
from gateway import callers, catalog, db, invalidation, keypool, usage
from gateway.app import create_app as create_gateway_app
from gateway.callers import Callers
from gateway.catalog import Catalog
from gateway.errors import DatabaseUnavailable
from gateway.keypool import KeyPool
from gateway.secret import Secret
from gateway.settings import Settings
from gateway.usage import USAGE
from gateway.vault import Vault
from tests.conftest import ADMIN_PASSWORD, login, with_settings
from tests.fakes import FakeUpstream

OPENAI_KEY: Final = "sk-proj-" + "P" * 40
WEATHER_KEY: Final = "fedcba9876543210fedcba9876543210"
GATEWAY_RID: Final = "X-Wallet-Request-Id"
POLL_S: Final = 0.05
POLLS: Final = 400  # 20 s at most for what happens in the background
HANG_GUARD_S: Final = 10.0  # far above the patched lookup timeout, far below asyncpg's 60 s
BUFFERED: Final = re.compile(r'^wallet_usage_buffered\{app="gateway"\} (\d+)', re.MULTILINE)


class PrivatePostgres:
    """An embedded PostgreSQL server of this module's own, on a fixed port so that it comes
    back there after a stop (admin/embedded.py does the work, as root too)."""

    def __init__(self, data_dir: Path) -> None:
        self.server = embedded._Postgres(data_dir)
        self.port = embedded.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return  # running
        self.proc = self.server.start(self.port)
        self.server.wait_ready(self.proc, self.port)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open sessions are ended, as in a failover or a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(embedded.STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def url(self, database: str) -> Secret[str]:
        return self.server.url(self.port, database)


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    # Not under pytest's basetemp: a concurrent pytest session resets that to 0700, which
    # would lock out the PostgreSQL system user (see conftest).
    data_dir = Path(tempfile.mkdtemp(prefix="wallet-pg-outage-"))
    data_dir.chmod(0o701 if os.geteuid() == 0 else 0o700)
    server: PrivatePostgres | None = None
    try:
        server = PrivatePostgres(data_dir)
        server.server.prepare(lambda _message: None)
        server.start()
    except (embedded.EmbeddedError, OSError, subprocess.SubprocessError) as exc:
        if server is not None:
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        pytest.skip(f"an embedded PostgreSQL cannot be started here: {exc}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@dataclass(frozen=True)
class Stage:
    """A fresh wallet database on the private server, migrated and seeded like a first run,
    and the settings that point both apps at it (Redis: the session's)."""

    pg: PrivatePostgres
    settings: Settings

    async def fetchval(self, query: str) -> Any:
        assert self.settings.database_url is not None
        conn = await asyncpg.connect(self.settings.database_url.reveal())
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()


@pytest.fixture
async def stage(
    private_pg: PrivatePostgres, settings: Settings, redis_client: Redis
) -> AsyncIterator[Stage]:
    private_pg.start()  # back up if an earlier test left it down
    name = f"wallet_outage_{uuid.uuid4().hex[:12]}"
    ours = with_settings(
        settings, database_url=private_pg.url(name), admin_password=Secret(ADMIN_PASSWORD)
    )
    assert ours.database_url is not None
    await bootstrap.ensure_database(ours.database_url)
    await bootstrap.prepare(ours)  # migrate, seed the built-in services, the first admin
    yield Stage(private_pg, ours)
    private_pg.start()
    conn = await asyncpg.connect(private_pg.url("postgres").reveal())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def point(
    admin: TestClient[Any, Any], auth: dict[str, str], service: str, upstream_port: int
) -> None:
    resp = await admin.put(
        f"/services/{service}",
        headers=auth,
        json={"base_url": f"http://127.0.0.1:{upstream_port}"},
    )
    assert resp.status == 200, await resp.text()


async def new_token(admin: TestClient[Any, Any], auth: dict[str, str], name: str) -> dict[str, str]:
    resp = await admin.post(
        "/tokens", headers=auth, json={"name": name, "services": ["openai", "openweather"]}
    )
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return {"id": body["id"], "token": body["token"]}


async def assert_gateway_error(resp: ClientResponse, status: int, code: str) -> None:
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["request_id"] == resp.headers[GATEWAY_RID]


async def buffered_metric(gateway: TestClient[Any, Any]) -> int:
    text = await (await gateway.get("/monitoring/metrics")).text()
    found = BUFFERED.search(text)
    assert found is not None, text
    return int(found.group(1))


def events(logs: str, event: str, cache: str) -> int:
    lines = (json.loads(line) for line in logs.splitlines() if line.startswith("{"))
    return sum(1 for line in lines if line.get("event") == event and line.get("cache") == cache)


async def test_a_postgres_outage_keeps_known_tokens_served_and_buffers_usage(
    stage: Stage,
    redis_client: Redis,
    aiohttp_server: Any,
    aiohttp_client: Any,
    captured_logs: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every cache entry expires at once, so each request during the outage would go to
    # PostgreSQL if the caches did not stand in for it; the writer retries every 0.2 s.
    monkeypatch.setattr(callers, "TTL_S", 0.0)
    monkeypatch.setattr(callers, "NEGATIVE_TTL_S", 0.0)
    monkeypatch.setattr(callers, "OUTAGE_RETRY_S", 0.0)
    monkeypatch.setattr(keypool, "TTL_S", 0.05)
    monkeypatch.setattr(catalog, "REFRESH_S", 0.05)
    monkeypatch.setattr(usage, "RETRY_MAX_S", 0.2)

    admin: TestClient[Any, Any] = await aiohttp_client(create_admin_app(stage.settings))
    as_admin = await login(admin)
    openai, weather = FakeUpstream(OPENAI_KEY, "bearer"), FakeUpstream(WEATHER_KEY, "query:appid")
    await point(admin, as_admin, "openai", (await aiohttp_server(openai.app())).port)
    await point(admin, as_admin, "openweather", (await aiohttp_server(weather.app())).port)
    for key in (
        {"key": OPENAI_KEY, "service": "openai", "metadata": {"quota": 1000}},
        {"key": WEATHER_KEY, "service": "openweather", "tier": "paid"},
    ):
        resp = await admin.post("/keys", headers=as_admin, json=key)
        assert resp.status == 201, await resp.text()
    known, unseen, revoked, dropped = [
        await new_token(admin, as_admin, name) for name in ("known", "unseen", "revoked", "drop")
    ]

    def auth(token: dict[str, str]) -> dict[str, str]:
        return {"X-Wallet-Token": token["token"]}

    gateway: TestClient[Any, Any] = await aiohttp_client(create_gateway_app(stage.settings))
    for token in (known, revoked, dropped):
        assert (await gateway.get("/openai/v1/models", headers=auth(token))).status == 200
    resp = await admin.delete(f"/tokens/{revoked['id']}", headers=as_admin)
    assert resp.status == 204
    assert (await gateway.get("/openai/v1/models", headers=auth(revoked))).status == 401
    writer = gateway.app[USAGE]
    await writer.flush()
    written_before = await stage.fetchval("SELECT count(*) FROM usage_records")
    assert written_before == 4
    seen_before = len(openai.seen)

    stage.pg.stop()

    health = await gateway.get("/monitoring/health")
    assert health.status == 503
    body = await health.json()
    assert body["status"] == "degraded"
    assert body["checks"]["postgres"].startswith("down")
    # ...and proxying goes on: a known token is served from the cache with the real key.
    for _ in range(3):
        resp = await gateway.get("/openai/v1/models", headers=auth(known))
        assert resp.status == 200, await resp.text()
    assert len(openai.seen) == seen_before + 3
    assert openai.seen[-1].headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    # A token never seen cannot be checked: 503, not 401 (it may be valid) and not 500.
    resp = await gateway.get("/openai/v1/models", headers=auth(unseen))
    await assert_gateway_error(resp, 503, "database_unavailable")
    assert "Retry-After" in resp.headers
    # A refusal never turns into acceptance.
    resp = await gateway.get("/openai/v1/models", headers=auth(revoked))
    assert resp.status in (401, 503), await resp.text()
    # A service whose keys were never loaded: 503, quickly, and nothing reaches its upstream.
    resp = await gateway.get("/openweather/data/2.5/weather", headers=auth(known))
    await assert_gateway_error(resp, 503, "database_unavailable")
    assert weather.seen == []
    # A revocation announced over Redis while PostgreSQL is down still applies.
    await invalidation.publish(redis_client, "token", dropped["id"])
    for _ in range(POLLS):
        resp = await gateway.get("/openai/v1/models", headers=auth(dropped))
        if resp.status != 200:
            break
        await asyncio.sleep(POLL_S)
    await assert_gateway_error(resp, 503, "database_unavailable")
    served = len(openai.seen)
    resp = await gateway.get("/openai/v1/models", headers=auth(dropped))
    await assert_gateway_error(resp, 503, "database_unavailable")
    assert len(openai.seen) == served

    # Stale answers are bounded: past STALE_MAX_S each cache refuses to stand in.
    for module in (callers, keypool, catalog):
        monkeypatch.setattr(module, "STALE_MAX_S", 0.0)
        resp = await gateway.get("/openai/v1/models", headers=auth(known))
        await assert_gateway_error(resp, 503, "database_unavailable")
        monkeypatch.setattr(module, "STALE_MAX_S", db.STALE_MAX_S)
    assert (await gateway.get("/openai/v1/models", headers=auth(known))).status == 200
    assert len(openai.seen) == served + 1

    buffered = await buffered_metric(gateway)
    assert buffered > 0
    assert buffered == writer.buffered
    logs = captured_logs.getvalue()
    assert events(logs, "postgres_unreachable_serving_cached", "tokens") == 1  # not per request

    stage.pg.start()

    for _ in range(POLLS):
        written = await stage.fetchval("SELECT count(*) FROM usage_records")
        if written == written_before + buffered:
            break
        await asyncio.sleep(POLL_S)
    else:
        pytest.fail(f"the buffered usage did not land: {written} of {written_before + buffered}")
    assert writer.buffered == 0
    assert writer.dropped == 0
    assert await stage.fetchval("SELECT sum(requests) FROM usage_hourly") == written
    assert await stage.fetchval("SELECT count(*) FROM usage_records WHERE status = 503") > 0

    # Everything works again without a restart: tokens never seen, new tokens, new services.
    assert (await gateway.get("/openai/v1/models", headers=auth(unseen))).status == 200
    fresh = await new_token(admin, as_admin, "after")
    assert (await gateway.get("/openai/v1/models", headers=auth(fresh))).status == 200
    assert (await gateway.get("/openweather/data/2.5/weather", headers=auth(known))).status == 200
    assert weather.seen[-1].query["appid"] == WEATHER_KEY
    assert (await gateway.get("/openai/v1/models", headers=auth(revoked))).status == 401
    assert (await gateway.get("/monitoring/health")).status == 200
    logs = captured_logs.getvalue()
    assert events(logs, "postgres_reachable_again", "tokens") == 1
    # (The fake OpenWeather's own access log shows its `appid=`: that is the upstream's.)
    for secret in (OPENAI_KEY, known["token"], unseen["token"], dropped["token"]):
        assert secret not in logs


@pytest.fixture
async def silent_pool() -> AsyncIterator[db.Pool]:
    """A pool whose server accepts connections and never answers (a host that hangs): asyncpg
    alone would wait 60 s for it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshakes; nobody ever reads
        port = listener.getsockname()[1]
        pool = await db.create_pool(
            Secret(f"postgresql://wallet:unused@127.0.0.1:{port}/wallet"), min_size=0
        )
        try:
            yield pool
        finally:
            pool.terminate()


async def test_lookups_give_up_quickly_when_postgres_hangs(
    silent_pool: db.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (callers, keypool, catalog):
        monkeypatch.setattr(module, "LOOKUP_TIMEOUT_S", 0.2)
    vault = Vault(Secret(os.urandom(32)))
    vault.unsealed = True  # as after the canary check; nothing is decrypted here
    token = Secret("AIzaWT_" + "h" * 43)
    async with asyncio.timeout(HANG_GUARD_S):
        with pytest.raises(DatabaseUnavailable):
            await Callers(silent_pool).authenticate(token, "openai")
        with pytest.raises(DatabaseUnavailable):
            await Catalog(silent_pool).get("openai")
        with pytest.raises(DatabaseUnavailable):
            await KeyPool(silent_pool, vault, 1000).usable("openai")
