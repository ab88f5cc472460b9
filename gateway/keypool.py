"""The gateway's usable keys per service, decrypted once and kept briefly in process memory.

Plaintext keys live only here (and in the outbound request). A background task reloads the
services in use every TTL_S, so requests do not wait on PostgreSQL and keep being served
from the last good copy while it is down, for up to STALE_MAX_S after it was loaded; entries
are dropped at once when the admin app announces a change to keys, users or services (the
next request then loads them). A service whose keys are not loaded (or too old) while
PostgreSQL is unreachable gets 503 `database_unavailable` within LOOKUP_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final, NamedTuple

import structlog

from gateway.db import DB_ERRORS, LOOKUP_TIMEOUT_S, STALE_MAX_S, OutageLog, Pool
from gateway.errors import DatabaseUnavailable, VaultSealed
from gateway.inject import key_forms
from gateway.selection import (
    DEFAULT_PERIOD,
    UsableKey,
    concurrency_cap_of,
    quota_of,
    rank,
    weight_of,
)
from gateway.vault import Sealed, Vault, VaultError, key_aad

log = structlog.get_logger(__name__)

TTL_S: Final = 30.0
ENABLED_KEYS: Final = """SELECT id, owner_id, service, tier, priority, created_at, kid, sealed,
metadata FROM api_keys WHERE service = $1 AND enabled AND status = 'active'"""


class _Loaded(NamedTuple):
    keys: tuple[UsableKey, ...]
    at: float  # monotonic clock


class KeyPool:
    def __init__(self, pool: Pool, vault: Vault, default_free_quota: int) -> None:
        self._pool = pool
        self._vault = vault
        self._default_free_quota = default_free_quota
        self._by_service: dict[str, _Loaded] = {}
        self._outage = OutageLog("keys")
        # Bumped by every invalidation: a load that started before one is not cached.
        self._generation = 0

    def peek(self, service: str) -> tuple[UsableKey, ...] | None:
        """`usable` without waiting: the keys when the copy in hand may serve; None when
        `usable` has more to do (a load, or an error to raise)."""
        if not self._vault.unsealed:
            return None
        loaded = self._by_service.get(service)
        if loaded is not None and time.monotonic() - loaded.at < STALE_MAX_S:
            return loaded.keys
        return None

    async def usable(self, service: str) -> tuple[UsableKey, ...]:
        """Enabled, active keys of `service`, best first."""
        if not self._vault.unsealed:
            raise VaultSealed()
        loaded = self._by_service.get(service)
        if loaded is not None and time.monotonic() - loaded.at < STALE_MAX_S:
            return loaded.keys
        generation = self._generation
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                keys = await self._load(service)
        except DB_ERRORS as exc:
            self._outage.failed(exc)
            raise DatabaseUnavailable(f"the {service} keys") from exc
        self._outage.succeeded()
        if generation == self._generation:
            self._by_service[service] = _Loaded(keys, time.monotonic())
        return keys

    async def keep_fresh(self) -> None:
        """Background: reload every service in use each TTL_S; a failed reload keeps the
        last good copy (logged once per outage)."""
        while True:
            await asyncio.sleep(TTL_S)
            for service in list(self._by_service):
                generation = self._generation
                try:
                    keys = await self._load(service)
                except DB_ERRORS as exc:
                    self._outage.failed(exc)
                    break
                self._outage.succeeded()
                if generation == self._generation:
                    self._by_service[service] = _Loaded(keys, time.monotonic())

    async def _load(self, service: str) -> tuple[UsableKey, ...]:
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(ENABLED_KEYS, service)
        keys = []
        for row in rows:
            key_id, owner_id = str(row["id"]), str(row["owner_id"])
            metadata = row["metadata"] if isinstance(row["metadata"], dict) else {}
            try:
                secret = self._vault.open(
                    Sealed(row["kid"], bytes(row["sealed"])),
                    key_aad(key_id, owner_id, row["service"]),
                )
            except VaultError:
                log.error("key_does_not_open", key_id=key_id)
                continue
            keys.append(
                UsableKey(
                    key_id,
                    owner_id,
                    row["service"],
                    row["tier"],
                    row["priority"],
                    row["created_at"],
                    secret,
                    key_forms(secret.reveal()),
                    quota_of(row["tier"], metadata, self._default_free_quota),
                    str(metadata.get("quotaPeriod") or DEFAULT_PERIOD),
                    weight_of(metadata),
                    concurrency_cap_of(metadata),
                )
            )
        return tuple(rank(keys))

    def invalidate(self, kind: str, target_id: str | None) -> None:
        self._generation += 1
        if kind == "service" and target_id is not None:
            self._by_service.pop(target_id, None)
        elif kind in ("key", "user", "service"):
            self._by_service.clear()

    def clear(self) -> None:
        self._generation += 1
        self._by_service.clear()
