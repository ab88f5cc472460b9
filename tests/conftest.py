"""Shared fixtures: real PostgreSQL and Redis (embedded unless DATABASE_URL/REDIS_URL are set),
a fresh database per session, a clean state per test, and the apps on port 0."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from argon2 import PasswordHasher
from redis.asyncio import BlockingConnectionPool, Redis

from admin import embedded
from admin.app import create_app as create_admin_app
from gateway import audit, db, logs, services
from gateway.app import create_app as create_gateway_app
from gateway.hotredis import HotRedis
from gateway.secret import Secret
from gateway.settings import Settings

ADMIN_PASSWORD = "admin-password-for-tests"
USER_PASSWORD = "user-password-for-tests"
TABLES = (
    "audit_log",
    "api_keys",
    "tokens",
    "vault_canaries",
    "users",
    "services",
    "usage_records",
    "usage_hourly",
    "certificate_authorities",
)


@dataclass(frozen=True)
class Servers:
    database_url: Secret[str]
    redis_url: Secret[str]
    admin_url: Secret[str]  # the server's maintenance database


def _test_database_url(base: str, name: str) -> str:
    head, _, tail = base.rpartition("/")
    query = tail.partition("?")[2]
    return f"{head}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """PostgreSQL and Redis for the whole session; a throwaway database on the server."""
    started: embedded.EmbeddedServers | None = None
    base_db, base_redis = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    if not base_db or not base_redis:
        # Not under pytest's basetemp: a concurrent pytest session resets that to 0700, which
        # would lock out the PostgreSQL system user.
        data_dir = Path(tempfile.mkdtemp(prefix="wallet-tests-"))
        started = embedded.start(
            data_dir, postgres=not base_db, redis_server=not base_redis, say=lambda _m: None
        )
        base_db = base_db or started.database_url.reveal()  # type: ignore[union-attr]
        base_redis = base_redis or started.redis_url.reveal()  # type: ignore[union-attr]
    name = f"wallet_test_{uuid.uuid4().hex[:12]}"
    maintenance = Secret(_test_database_url(base_db, "postgres"))
    url = Secret(_test_database_url(base_db, name))

    async def create() -> None:
        conn = await asyncpg.connect(maintenance.reveal())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        conn = await db.connect(url)
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(maintenance.reveal())
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    try:
        yield Servers(url, Secret(base_redis), maintenance)
    finally:
        asyncio.run(drop())
        if started is not None:
            started.stop()
            shutil.rmtree(started.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def master_key() -> bytes:
    return os.urandom(32)


@pytest.fixture(scope="session")
def password_hashes() -> dict[str, str]:
    hasher = PasswordHasher()
    return {ADMIN_PASSWORD: hasher.hash(ADMIN_PASSWORD), USER_PASSWORD: hasher.hash(USER_PASSWORD)}


@pytest.fixture
def settings(servers: Servers, master_key: bytes) -> Settings:
    return Settings(
        database_url=servers.database_url,
        redis_url=servers.redis_url,
        jwt_secret=Secret(secrets.token_urlsafe(40)),
        encryption_key=Secret(master_key),
        log_format="json",
    )


@dataclass(frozen=True)
class World:
    """The state every test starts from: built-in services, one ADMIN and one USER."""

    admin_id: str
    user_id: str
    other_user_id: str


@pytest.fixture
async def world(servers: Servers, password_hashes: dict[str, str]) -> AsyncIterator[World]:
    conn = await db.connect(servers.database_url)
    redis = Redis.from_url(servers.redis_url.reveal())
    try:
        await conn.execute("TRUNCATE " + ", ".join(TABLES) + " CASCADE")
        await redis.flushdb()
        await services.seed(conn, audit.Actor.system("tests"))
        ids = []
        for username, password, role in (
            ("admin", ADMIN_PASSWORD, "ADMIN"),
            ("alice", USER_PASSWORD, "USER"),
            ("bob", USER_PASSWORD, "USER"),
        ):
            user_id = uuid.uuid4()
            await conn.execute(
                "INSERT INTO users (id, username, password_hash, role, password_changed_at)"
                " VALUES ($1, $2, $3, $4, now() - interval '1 hour')",
                user_id,
                username,
                password_hashes[password],
                role,
            )
            ids.append(str(user_id))
        yield World(*ids)
    finally:
        await conn.close()
        await redis.aclose()


@pytest.fixture
async def redis_client(servers: Servers, world: World) -> AsyncIterator[Redis]:
    """A client of the session's Redis, flushed for this test (by `world`); it queues
    commands past its connection limit as the apps' clients do."""
    pool = BlockingConnectionPool.from_url(servers.redis_url.reveal(), max_connections=64)
    redis = Redis.from_pool(pool)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def hot(servers: Servers, world: World) -> AsyncIterator[HotRedis]:
    """The gateway's hot-path Redis client on the session's Redis (flushed by `world`)."""
    client = HotRedis(servers.redis_url)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Everything the apps log during the test, as rendered (redaction included)."""
    buffer = io.StringIO()
    logs.configure("debug", "json", logs.Redactor(), stream=buffer)
    return buffer


@pytest.fixture
async def admin_client(
    aiohttp_client: Any, settings: Settings, world: World, captured_logs: io.StringIO
) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(create_admin_app(settings))
    return client


@pytest.fixture
async def gateway_client(
    aiohttp_client: Any, settings: Settings, world: World
) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(create_gateway_app(settings))
    return client


async def login(
    client: TestClient[Any, Any], username: str = "admin", password: str = ADMIN_PASSWORD
) -> dict[str, str]:
    resp = await client.post("/auth/login", json={"username": username, "password": password})
    assert resp.status == 200, await resp.text()
    return {"Authorization": f"Bearer {(await resp.json())['token']}"}


@pytest.fixture
async def as_admin(admin_client: TestClient[Any, Any]) -> dict[str, str]:
    return await login(admin_client)


@pytest.fixture
async def as_alice(admin_client: TestClient[Any, Any]) -> dict[str, str]:
    return await login(admin_client, "alice", USER_PASSWORD)


@pytest.fixture
async def as_bob(admin_client: TestClient[Any, Any]) -> dict[str, str]:
    return await login(admin_client, "bob", USER_PASSWORD)


def wallet_bin() -> Path:
    """The `wallet` console script of the interpreter running the tests."""
    import sys

    return Path(sys.executable).parent / "wallet"


def random_master_key_b64() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)


async def assert_error(resp: ClientResponse, status: int, code: str) -> dict[str, Any]:
    """The one error shape: {"error": {"code", "message", "request_id", ...}}."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert {"code", "message", "request_id"} <= set(error)
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["request_id"] == resp.headers["X-Request-Id"]
    return error


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say loudly, last, when the browser tests were skipped for want of a browser."""
    from browser import skipped_banner  # only here: it imports Selenium

    banner = skipped_banner(terminalreporter.stats.get("skipped", []))
    if banner:
        terminalreporter.write_sep("!", banner, red=True, bold=True)
