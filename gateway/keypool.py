"""The gateway's usable keys per service, decrypted once and kept briefly in process memory.

Plaintext keys live only here (and in the outbound request). Entries expire after a short
TTL and are dropped at once when the admin app announces a change to keys or users.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

import structlog

from gateway.db import Pool
from gateway.errors import VaultSealed
from gateway.inject import key_forms
from gateway.selection import UsableKey, rank
from gateway.vault import Sealed, Vault, VaultError, key_aad

log = structlog.get_logger(__name__)

TTL_S: Final = 30.0
ENABLED_KEYS: Final = """SELECT id, owner_id, service, tier, priority, created_at, kid, sealed
FROM api_keys WHERE service = $1 AND enabled AND status = 'active'"""


@dataclass(frozen=True)
class _Entry:
    keys: tuple[UsableKey, ...]
    until: float


class KeyPool:
    def __init__(self, pool: Pool, vault: Vault) -> None:
        self._pool = pool
        self._vault = vault
        self._by_service: dict[str, _Entry] = {}

    async def usable(self, service: str) -> tuple[UsableKey, ...]:
        """Enabled, active keys of `service`, best first."""
        if not self._vault.unsealed:
            raise VaultSealed()
        entry = self._by_service.get(service)
        if entry is not None and entry.until > time.monotonic():
            return entry.keys
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(ENABLED_KEYS, service)
        keys = []
        for row in rows:
            key_id, owner_id = str(row["id"]), str(row["owner_id"])
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
                )
            )
        ranked = tuple(rank(keys))
        self._by_service[service] = _Entry(ranked, time.monotonic() + TTL_S)
        return ranked

    def invalidate(self, kind: str, target_id: str | None) -> None:
        if kind == "service" and target_id is not None:
            self._by_service.pop(target_id, None)
        elif kind in ("key", "user", "service"):
            self._by_service.clear()

    def clear(self) -> None:
        self._by_service.clear()
