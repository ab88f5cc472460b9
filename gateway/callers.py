"""Who is calling the gateway: wallet tokens verified against a short in-process cache.

The cache keeps the token's hash, never the token. A revoked token, a disabled user or a
changed scope is dropped by invalidation (pub/sub) at once and by the TTL at the latest.

While PostgreSQL is unreachable, a token it accepted keeps being accepted from the cache for
up to STALE_MAX_S after it last did (stale-while-error); anything else (a token never seen,
one dropped by an invalidation, a cached refusal) gets 503 `database_unavailable`: a
refusal never turns into acceptance, and an unknown token is not called invalid when that
cannot be checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final

from gateway import tokens
from gateway.db import DB_ERRORS, LOOKUP_TIMEOUT_S, STALE_MAX_S, OutageLog, Pool, Record
from gateway.errors import DatabaseUnavailable, Forbidden, Unauthenticated
from gateway.limits import Budget, budget_from_db
from gateway.secret import Secret
from gateway.users import default_tier

TTL_S: Final = 60.0
NEGATIVE_TTL_S: Final = 2.0
# While PostgreSQL is unreachable, a token served from a stale entry is checked again at most
# this often (each check may wait up to LOOKUP_TIMEOUT_S).
OUTAGE_RETRY_S: Final = 5.0
MAX_ENTRIES: Final = 100_000
BY_HASH: Final = """SELECT t.id, t.owner_id, t.services, t.expires_at, t.budget AS token_budget,
t.rate_limit, u.role, u.tier, u.budget AS user_budget
FROM tokens t JOIN users u ON u.id = t.owner_id
WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND u.enabled"""


class _LookupAbandoned(Exception):
    """The request doing a shared token lookup was cancelled before it finished."""


@dataclass(frozen=True)
class Caller:
    token_id: str
    owner_id: str
    owner_is_admin: bool
    services: frozenset[str]
    expires_at: datetime | None
    tier: str = "free"  # the owner's rate-limit tier
    rate_limit: int | None = None  # the token's own requests per minute, over the tier's
    token_budget: Budget | None = None
    user_budget: Budget | None = None


def caller_from_row(row: Record) -> Caller:
    """The one place a BY_HASH row becomes a Caller: a new column goes in both."""
    return Caller(
        str(row["id"]),
        str(row["owner_id"]),
        row["role"] == "ADMIN",
        frozenset(row["services"]),
        row["expires_at"],
        row["tier"] or default_tier(row["role"]),
        row["rate_limit"],
        budget_from_db(row["token_budget"]),
        budget_from_db(row["user_budget"]),
    )


@dataclass(frozen=True)
class _Entry:
    caller: Caller | None
    until: float  # fresh until (monotonic clock)
    verified: float  # when PostgreSQL last gave this answer


def _admit(caller: Caller | None, service: str) -> Caller:
    """The caller a token lookup found, if it may call `service` now."""
    if caller is None:
        raise Unauthenticated("unknown or revoked wallet token")
    if caller.expires_at is not None and caller.expires_at <= datetime.now(UTC):
        raise Unauthenticated("this wallet token has expired")
    if service not in caller.services:
        raise Forbidden(f"this wallet token may not use {service!r}")
    return caller


class Callers:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._entries: dict[bytes, _Entry] = {}
        self._inflight: dict[bytes, asyncio.Future[Caller | None]] = {}
        self._outage = OutageLog("tokens")
        # Bumped by every invalidation: a lookup that started before one is not cached.
        self._generation = 0

    async def _lookup(self, digest: bytes) -> Caller | None:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S), self._pool.acquire() as conn:
            row = await conn.fetchrow(BY_HASH, digest)
        return None if row is None else caller_from_row(row)

    async def _get(self, digest: bytes) -> Caller | None:
        while True:
            entry = self._entries.get(digest)
            if entry is not None and entry.until > time.monotonic():
                return entry.caller
            pending = self._inflight.get(digest)
            if pending is None:
                break
            try:  # one database lookup however many requests wait for it
                return await asyncio.shield(pending)
            except _LookupAbandoned:
                continue  # the request doing it went away; this one is still here
        future: asyncio.Future[Caller | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            caller = await self._verify(digest, entry)
            future.set_result(caller)
        except asyncio.CancelledError:
            # This request's client hung up: the requests waiting on the same lookup must not
            # inherit the cancellation (they would be dropped without an answer).
            future.set_exception(_LookupAbandoned())
            future.exception()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[digest]
        return caller

    async def _verify(self, digest: bytes, entry: _Entry | None) -> Caller | None:
        """Ask PostgreSQL and cache its answer; if it cannot be reached, fall back on `entry`,
        the expired one."""
        generation = self._generation
        try:
            caller = await self._lookup(digest)
        except DB_ERRORS as exc:
            self._outage.failed(exc)
            return self._stale(digest, entry, exc)
        self._outage.succeeded()
        if generation == self._generation:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            now = time.monotonic()
            ttl = TTL_S if caller is not None else NEGATIVE_TTL_S
            self._entries[digest] = _Entry(caller, now + ttl, now)
        return caller

    def _stale(self, digest: bytes, entry: _Entry | None, exc: BaseException) -> Caller:
        """The last acceptance PostgreSQL gave for this token, if it is still cached (not
        dropped by an invalidation meanwhile) and at most STALE_MAX_S old; else 503."""
        now = time.monotonic()
        if (
            entry is None
            or entry.caller is None
            or self._entries.get(digest) is not entry
            or now - entry.verified >= STALE_MAX_S
        ):
            raise DatabaseUnavailable("this wallet token") from exc
        self._entries[digest] = replace(entry, until=now + OUTAGE_RETRY_S)
        return entry.caller

    async def authenticate(self, token: Secret[str] | None, service: str) -> Caller:
        if token is None:
            raise Unauthenticated(
                "present a wallet token (Authorization: Bearer, X-Wallet-Token, "
                "or the service's own key slot)"
            )
        return _admit(await self._get(tokens.token_hash(token)), service)

    def cached(self, token: Secret[str] | None, service: str) -> Caller | None:
        """`authenticate` without waiting, when the cache holds a fresh answer for `token`:
        the caller, or the same error; None when `authenticate` has more to do."""
        if token is None:
            return None
        entry = self._entries.get(tokens.token_hash(token))
        if entry is None or entry.until <= time.monotonic():
            return None
        return _admit(entry.caller, service)

    def invalidate(self, kind: str, target_id: str | None) -> None:
        if kind in ("token", "user"):
            self._generation += 1
        if kind == "token" and target_id is not None:
            self._drop(lambda c: c.token_id == target_id)
        elif kind == "user" and target_id is not None:
            self._drop(lambda c: c.owner_id == target_id)
        elif kind in ("token", "user"):
            self.clear()

    def _drop(self, match: Callable[[Caller], bool]) -> None:
        for digest in [d for d, e in self._entries.items() if e.caller and match(e.caller)]:
            del self._entries[digest]

    def clear(self) -> None:
        self._generation += 1
        self._entries.clear()
