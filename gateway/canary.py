"""The vault canary: proves at startup that the configured master key is the right one.

Every master key that has sealed anything leaves a canary row. The vault unseals when a
configured key opens its canary, or when the database has none yet (a fresh install).
A new current key whose predecessor is configured gets its canary (phase one of rotation).
"""

from __future__ import annotations

from typing import Final

import structlog

from gateway.db import Connection
from gateway.vault import Sealed, Vault, VaultError

log = structlog.get_logger(__name__)

AAD: Final = b"wallet-canary-v1"
PLAINTEXT: Final = b"api-key-wallet canary"
SELECT_ALL: Final = "SELECT kid, sealed FROM vault_canaries"
INSERT: Final = "INSERT INTO vault_canaries (kid, sealed) VALUES ($1, $2) ON CONFLICT DO NOTHING"


async def unseal(conn: Connection, vault: Vault) -> bool:
    """Set `vault.unsealed` from the canaries; returns it. Never logs key material."""
    vault.unsealed = False
    if vault.current_kid is None:
        log.warning("vault_sealed", reason="ENCRYPTION_KEY is not set")
        return False
    rows = {r["kid"]: bytes(r["sealed"]) for r in await conn.fetch(SELECT_ALL)}
    opened = [kid for kid in vault.kids if kid in rows and _opens(vault, kid, rows[kid])]
    if rows and not opened:
        log.error(
            "vault_sealed",
            reason="no configured master key opens a stored canary",
            configured=list(vault.kids),
            stored=sorted(rows),
        )
        return False
    if vault.current_kid not in rows:
        sealed = vault.seal_bytes_unchecked(PLAINTEXT, AAD)
        await conn.execute(INSERT, sealed.kid, sealed.blob)
    vault.unsealed = True
    return True


def _opens(vault: Vault, kid: str, blob: bytes) -> bool:
    try:
        return vault.open_unchecked(Sealed(kid, blob), AAD) == PLAINTEXT
    except VaultError:
        return False
