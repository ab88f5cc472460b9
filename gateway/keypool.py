"""The gateway's usable keys per service, decrypted once and kept briefly in process memory.

Plaintext keys live only here (and in the outbound request). A background task reloads the
services in use every TTL_S, so requests do not wait on PostgreSQL and keep being served
from the last good copy while it is down; entries are dropped at once when the admin app
announces a change to keys, users or services (the next request then loads them).
"""

from __future__ import annotations

import asyncio
from typing import Final

import structlog

from gateway.db import DB_ERRORS, Pool
from gateway.errors import VaultSealed
from gateway.inject import key_forms
from gateway.selection import DEFAULT_PERIOD, UsableKey, quota_of, rank
from gateway.vault import Sealed, Vault, VaultError, key_aad

log = structlog.get_logger(__name__)

TTL_S: Final = 30.0
ENABLED_KEYS: Final = """SELECT id, owner_id, service, tier, priority, created_at, kid, sealed,
metadata FROM api_keys WHERE service = $1 AND enabled AND status = 'active'"""


class KeyPool:
    def __init__(self, pool: Pool, vault: Vault, default_free_quota: int) -> None:
        self._pool = pool
        self._vault = vault
        self._default_free_quota = default_free_quota
        self._by_service: dict[str, tuple[UsableKey, ...]] = {}
        # Bumped by every invalidation: a load that started before one is not cached.
        self._generation = 0

    async def usable(self, service: str) -> tuple[UsableKey, ...]:
        """Enabled, active keys of `service`, best first."""
        if not self._vault.unsealed:
            raise VaultSealed()
        keys = self._by_service.get(service)
        if keys is None:
            generation = self._generation
            keys = await self._load(service)
            if generation == self._generation:
                self._by_service[service] = keys
        return keys

    async def keep_fresh(self) -> None:
        """Background: reload every service in use each TTL_S; a failed reload keeps the
        last good copy."""
        while True:
            await asyncio.sleep(TTL_S)
            for service in list(self._by_service):
                generation = self._generation
                try:
                    keys = await self._load(service)
                except DB_ERRORS as exc:
                    log.warning("keypool_refresh_failed", service=service, error=type(exc).__name__)
                    break
                if generation == self._generation:
                    self._by_service[service] = keys

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
