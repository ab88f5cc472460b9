"""Who is calling the gateway: wallet tokens verified against a short in-process cache.

The cache keeps the token's hash, never the token. A revoked token, a disabled user or a
changed scope is dropped by invalidation (pub/sub) at once and by the TTL at the latest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from gateway import tokens
from gateway.db import Pool
from gateway.errors import Forbidden, Unauthenticated
from gateway.secret import Secret

TTL_S: Final = 60.0
NEGATIVE_TTL_S: Final = 2.0
MAX_ENTRIES: Final = 100_000
BY_HASH: Final = """SELECT t.id, t.owner_id, t.services, t.expires_at, u.role
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


@dataclass(frozen=True)
class _Entry:
    caller: Caller | None
    until: float


class Callers:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._entries: dict[bytes, _Entry] = {}
        self._inflight: dict[bytes, asyncio.Future[Caller | None]] = {}

    async def _lookup(self, digest: bytes) -> Caller | None:
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(BY_HASH, digest)
        if row is None:
            return None
        return Caller(
            str(row["id"]),
            str(row["owner_id"]),
            row["role"] == "ADMIN",
            frozenset(row["services"]),
            row["expires_at"],
        )

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
            caller = await self._lookup(digest)
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
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        ttl = TTL_S if caller is not None else NEGATIVE_TTL_S
        self._entries[digest] = _Entry(caller, time.monotonic() + ttl)
        return caller

    async def authenticate(self, token: Secret[str] | None, service: str) -> Caller:
        if token is None:
            raise Unauthenticated(
                "present a wallet token (Authorization: Bearer, X-Wallet-Token, "
                "or the service's own key slot)"
            )
        caller = await self._get(tokens.token_hash(token))
        if caller is None:
            raise Unauthenticated("unknown or revoked wallet token")
        if caller.expires_at is not None and caller.expires_at <= datetime.now(UTC):
            raise Unauthenticated("this wallet token has expired")
        if service not in caller.services:
            raise Forbidden(f"this wallet token may not use {service!r}")
        return caller

    def invalidate(self, kind: str, target_id: str | None) -> None:
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
        self._entries.clear()
