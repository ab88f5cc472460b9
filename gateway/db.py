"""The PostgreSQL boundary: the pool, numbered migrations, and error translation."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TypeAlias

import asyncpg
import asyncpg.pool
import structlog

from gateway.errors import Conflict, Unavailable
from gateway.secret import Secret

log = structlog.get_logger(__name__)

SQL_DIR: Final = Path(__file__).resolve().parent.parent / "sql"
# pg_advisory_lock key for migrations: any constant, the same in every process.
MIGRATION_LOCK: Final = 0x57A11E7
# What a query raises when PostgreSQL is down, restarting or unreachable.
DB_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    # Class 57: shutting down (a fast shutdown ends running queries with AdminShutdownError),
    # crashed, starting up, or an idle session closed. Not a query the server cancelled (a
    # statement timeout): that one would fail the same way again.
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.IdleSessionTimeoutError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
)
# How long a gateway read on the request path (a free connection, a connect, the query) may
# wait before the request is answered from cache or with 503: asyncpg would wait 60 s for a
# connect to a host that does not answer.
LOOKUP_TIMEOUT_S: Final = 3.0
# How long the gateway's caches (tokens, keys, services) may keep serving an answer that
# PostgreSQL last confirmed this long ago, while PostgreSQL cannot be reached.
STALE_MAX_S: Final = 15 * 60.0
SCHEMA_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
APPLIED: Final = "SELECT version, checksum FROM schema_migrations"
RECORD: Final = "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)"

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
# A plain connection or one borrowed from the pool: store functions accept either.
Connection: TypeAlias = (
    "asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"
)
Record = asyncpg.Record


class OutageLog:
    """Logs once when a cache finds PostgreSQL unreachable and once when it is back, however
    many requests meet the outage in between."""

    def __init__(self, cache: str) -> None:
        self._cache = cache
        self._since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if self._since is None:
            self._since = time.monotonic()
            log.warning(
                "postgres_unreachable_serving_cached",
                cache=self._cache,
                error=type(exc).__name__,
                stale_max_s=STALE_MAX_S,
            )

    def succeeded(self) -> None:
        if self._since is not None:
            elapsed = round(time.monotonic() - self._since, 1)
            log.info("postgres_reachable_again", cache=self._cache, after_s=elapsed)
            self._since = None


def one(row: Record | None) -> Record:
    """The row a statement with RETURNING must produce."""
    if row is None:
        raise RuntimeError("statement returned no row")
    return row


async def _init_connection(conn: Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def create_pool(dsn: Secret[str], *, min_size: int = 1, max_size: int = 10) -> Pool:
    try:
        pool = await asyncpg.create_pool(
            dsn.reveal(),
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            command_timeout=30,
        )
    except (OSError, asyncpg.PostgresError) as exc:
        # Not chained: some drivers put the DSN (with its password) in the message.
        raise Unavailable(f"cannot connect to PostgreSQL ({type(exc).__name__})") from None
    assert pool is not None
    return pool


async def connect(dsn: Secret[str]) -> asyncpg.Connection[asyncpg.Record]:
    try:
        conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(dsn.reveal())
    except (OSError, asyncpg.PostgresError) as exc:
        raise Unavailable(f"cannot connect to PostgreSQL ({type(exc).__name__})") from None
    await _init_connection(conn)
    return conn


def migration_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    return sorted(p for p in sql_dir.glob("*.sql") if p.name[:3].isdigit())


async def migrate(conn: Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply each numbered file once, under an advisory lock so concurrent starts don't race."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(SCHEMA_TABLE)
        done = {r["version"]: r["checksum"] for r in await conn.fetch(APPLIED)}
        for path in migration_files(sql_dir):
            text = path.read_text()
            checksum = hashlib.sha256(text.encode()).hexdigest()
            if path.name in done:
                if done[path.name] != checksum:
                    log.warning("migration_changed_after_apply", migration=path.name)
                continue
            async with conn.transaction():
                await conn.execute(text)
                await conn.execute(RECORD, path.name, checksum)
            applied_now.append(path.name)
            log.info("migration_applied", migration=path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


@contextmanager
def unique_is_conflict(message: str) -> Iterator[None]:
    """Translate a unique violation into a 409 with a message that names no value."""
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(message) from exc
