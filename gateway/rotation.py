"""Master-key rotation: re-seal every stored secret under the current master key, online.

Rows are re-sealed in batches with a compare-and-swap update, so requests keep being served
and a key edited meanwhile is never overwritten with stale bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from gateway import audit
from gateway.ca import ca_aad
from gateway.db import Pool
from gateway.errors import VaultSealed
from gateway.keys import FINGERPRINT_NS
from gateway.vault import Sealed, Vault, VaultError, key_aad

log = structlog.get_logger(__name__)

PENDING: Final = "SELECT count(*) FROM api_keys WHERE kid <> $1"
BATCH: Final = """SELECT id, owner_id, service, kid, sealed FROM api_keys
WHERE kid <> $1 AND id > $2 ORDER BY id LIMIT $3"""
SWAP: Final = """UPDATE api_keys SET kid = $2, sealed = $3, fingerprint = $4
WHERE id = $1 AND kid = $5 AND sealed = $6"""
RETIRE_CANARIES: Final = """DELETE FROM vault_canaries c WHERE c.kid <> $1
AND NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.kid = c.kid)
AND NOT EXISTS (SELECT 1 FROM certificate_authorities a WHERE a.kid = c.kid) RETURNING kid"""
CA_PENDING: Final = "SELECT id, kid, sealed FROM certificate_authorities WHERE kid <> $1"
CA_SWAP: Final = """UPDATE certificate_authorities SET kid = $2, sealed = $3
WHERE id = $1 AND kid = $4 AND sealed = $5"""

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class RotationResult:
    resealed: int
    failed: tuple[str, ...]
    retired_kids: tuple[str, ...]


async def reseal_all(
    pool: Pool,
    vault: Vault,
    actor: audit.Actor,
    *,
    batch: int = 200,
    progress: Progress | None = None,
) -> RotationResult:
    current = vault.current_kid
    if current is None or not vault.unsealed:
        raise VaultSealed()
    total: int = await pool.fetchval(PENDING, current)
    done, failed, cursor = 0, [], uuid.UUID(int=0)
    while rows := await pool.fetch(BATCH, current, cursor, batch):
        for row in rows:
            cursor = row["id"]
            old = Sealed(row["kid"], bytes(row["sealed"]))
            aad = key_aad(str(row["id"]), str(row["owner_id"]), row["service"])
            try:
                secret = vault.open(old, aad)
            except VaultError:
                failed.append(str(row["id"]))
                log.error("reseal_failed", key_id=str(row["id"]), kid=old.kid)
                continue
            new = vault.seal(secret, aad)
            # A row changed meanwhile was re-sealed by its writer under the current key.
            await pool.execute(
                SWAP,
                row["id"],
                new.kid,
                new.blob,
                vault.fingerprint(FINGERPRINT_NS, secret),
                old.kid,
                old.blob,
            )
            done += 1
        if progress:
            progress(done + len(failed), total)
    if progress and done + len(failed) < total:
        # Rows re-sealed by their own writers (or deleted) meanwhile left the pending set
        # unseen; the pass is complete, so the last report says so (the CLI ends its line).
        progress(total, total)
    # The forward proxy's CA keys (gateway/ca.py), active and retired alike.
    for row in await pool.fetch(CA_PENDING, current):
        old = Sealed(row["kid"], bytes(row["sealed"]))
        aad = ca_aad(str(row["id"]))
        try:
            der = vault.open_bytes(old, aad)
        except VaultError:
            failed.append(f"ca:{row['id']}")
            log.error("reseal_failed", ca_id=str(row["id"]), kid=old.kid)
            continue
        new = vault.seal_bytes_unchecked(der, aad)
        await pool.execute(CA_SWAP, row["id"], new.kid, new.blob, old.kid, old.blob)
        done += 1
    async with pool.acquire() as conn, conn.transaction():
        retired = tuple(r["kid"] for r in await conn.fetch(RETIRE_CANARIES, current))
        await audit.append(
            conn,
            actor,
            "vault.rotate",
            "vault",
            current,
            {"resealed": done, "failed": len(failed), "retired": list(retired)},
        )
    return RotationResult(done, tuple(failed), retired)
