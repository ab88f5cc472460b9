"""Stored API keys: sealed by the vault, fingerprinted for duplicates, shown masked only."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, cast

from gateway import audit
from gateway.db import Connection, Record, one, unique_is_conflict
from gateway.errors import Conflict, NotFound, ValidationFailed
from gateway.ids import parse_id
from gateway.secret import Secret
from gateway.vault import Sealed, Vault, key_aad, mask

Tier = Literal["free", "paid"]
TIERS: Final = ("free", "paid")
STATUSES: Final = ("active", "invalid", "cooldown", "exhausted")
PERIODS: Final = {
    "minute": "minute",
    "hour": "hour",
    "hourly": "hour",
    "daily": "daily",
    "day": "daily",
    "monthly": "monthly",
    "month": "monthly",
}
MAX_METADATA_BYTES: Final = 8192
MAX_SECRET_CHARS: Final = 4096
FINGERPRINT_NS: Final = "api-key"
DUPLICATE: Final = "this key is already stored in the wallet"

GET: Final = """SELECT id, owner_id, service, tier, name, priority, enabled, status, metadata,
masked, created_at, updated_at, kid, sealed FROM api_keys
WHERE id = $1 AND ($2::uuid IS NULL OR owner_id = $2)"""
GET_FOR_UPDATE: Final = GET + " FOR UPDATE"
LIST: Final = """SELECT id, owner_id, service, tier, name, priority, enabled, status, metadata,
masked, created_at, updated_at FROM api_keys
WHERE ($1::uuid IS NULL OR owner_id = $1) AND ($2::text IS NULL OR service = $2)
  AND ($3::text IS NULL OR tier = $3) AND ($4::text IS NULL OR status = $4)
ORDER BY service, tier, priority DESC, created_at LIMIT $5 OFFSET $6"""
COUNT: Final = """SELECT count(*) FROM api_keys
WHERE ($1::uuid IS NULL OR owner_id = $1) AND ($2::text IS NULL OR service = $2)
  AND ($3::text IS NULL OR tier = $3) AND ($4::text IS NULL OR status = $4)"""
FIND_FINGERPRINT: Final = "SELECT id FROM api_keys WHERE fingerprint = ANY($1::bytea[])"
INSERT: Final = """INSERT INTO api_keys (id, owner_id, service, tier, name, priority, enabled,
metadata, kid, sealed, fingerprint, masked) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
$12) RETURNING id, owner_id, service, tier, name, priority, enabled, status, metadata, masked,
created_at, updated_at"""
UPDATE: Final = """UPDATE api_keys SET tier = $2, name = $3, priority = $4, enabled = $5,
metadata = $6, status = $7, updated_at = now() WHERE id = $1
RETURNING id, owner_id, service, tier, name, priority, enabled, status, metadata, masked,
created_at, updated_at"""
RESEAL: Final = """UPDATE api_keys SET kid = $2, sealed = $3, fingerprint = $4, masked = $5,
status = 'active', updated_at = now() WHERE id = $1"""
DELETE: Final = "DELETE FROM api_keys WHERE id = $1 AND ($2::uuid IS NULL OR owner_id = $2)"


@dataclass(frozen=True)
class KeyRecord:
    id: str
    owner_id: str
    service: str
    tier: Tier
    name: str
    priority: int
    enabled: bool
    status: str
    metadata: dict[str, Any]
    masked: str
    created_at: datetime
    updated_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner_id": self.owner_id,
            "service": self.service,
            "tier": self.tier,
            "name": self.name,
            "priority": self.priority,
            "enabled": self.enabled,
            "status": self.status,
            "masked": self.masked,
            "metadata": self.metadata,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class NewKey:
    owner_id: str
    service: str
    secret: Secret[str]
    tier: Tier
    name: str
    priority: int = 0
    enabled: bool = True
    metadata: Mapping[str, Any] | None = None


def _from_row(row: Record) -> KeyRecord:
    return KeyRecord(
        str(row["id"]),
        str(row["owner_id"]),
        row["service"],
        cast(Tier, row["tier"]),
        row["name"],
        row["priority"],
        row["enabled"],
        row["status"],
        row["metadata"],
        row["masked"],
        row["created_at"],
        row["updated_at"],
    )


def validate_secret(value: object) -> Secret[str]:
    if not isinstance(value, str) or not value.strip():
        raise ValidationFailed("key", "must be a non-empty string")
    value = value.strip()
    if len(value) > MAX_SECRET_CHARS or not value.isprintable():
        raise ValidationFailed("key", f"must be printable, at most {MAX_SECRET_CHARS} characters")
    return Secret(value)


def validate_metadata(value: object, secret: Secret[str] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationFailed("metadata", "must be an object")
    meta = dict(value)
    if (
        "quota" in meta
        and meta["quota"] is not None
        and (
            not isinstance(meta["quota"], int)
            or isinstance(meta["quota"], bool)
            or meta["quota"] < 0
        )
    ):
        raise ValidationFailed("metadata.quota", "must be a whole number >= 0")
    if "quotaPeriod" in meta and meta["quotaPeriod"] is not None:
        period = PERIODS.get(str(meta["quotaPeriod"]).lower())
        if period is None:
            raise ValidationFailed("metadata.quotaPeriod", "must be minute, hour, daily or monthly")
        meta["quotaPeriod"] = period
    if "type" in meta and not isinstance(meta["type"], str | None):
        raise ValidationFailed("metadata.type", "must be a string")
    weight = meta.get("weight")  # share of its group's traffic (`weighted` strategy)
    if weight is not None and (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not 0 < weight <= 10**6  # NaN fails too
    ):
        raise ValidationFailed("metadata.weight", "must be a number > 0 and <= 1000000")
    cap = meta.get("maxConcurrency")  # requests in flight at once, across every gateway
    if cap is not None and (
        isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= 10**6
    ):
        raise ValidationFailed("metadata.maxConcurrency", "must be a whole number >= 1")
    encoded = json.dumps(meta)
    if len(encoded) > MAX_METADATA_BYTES:
        raise ValidationFailed("metadata", f"must be at most {MAX_METADATA_BYTES} bytes as JSON")
    if secret is not None and secret.reveal() in encoded:
        raise ValidationFailed("metadata", "must not contain the key itself")
    return meta


def validate_tier(value: object) -> Tier:
    if value not in TIERS:
        raise ValidationFailed("tier", "must be free or paid")
    return value


def validate_priority(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not -(10**6) <= value <= 10**6:
        raise ValidationFailed("priority", "must be a whole number between -1000000 and 1000000")
    return value


def _owner(owner_id: str | None) -> uuid.UUID | None:
    return None if owner_id is None else uuid.UUID(owner_id)


async def _refuse_duplicate(conn: Connection, vault: Vault, secret: Secret[str]) -> bytes:
    if await conn.fetchval(FIND_FINGERPRINT, vault.fingerprints(FINGERPRINT_NS, secret)):
        raise Conflict(DUPLICATE)
    return vault.fingerprint(FINGERPRINT_NS, secret)


async def create_key(conn: Connection, vault: Vault, actor: audit.Actor, new: NewKey) -> KeyRecord:
    key_id = uuid.uuid4()
    sealed = vault.seal(new.secret, key_aad(str(key_id), new.owner_id, new.service))
    async with conn.transaction():
        fingerprint = await _refuse_duplicate(conn, vault, new.secret)
        with unique_is_conflict(DUPLICATE):
            row = await conn.fetchrow(
                INSERT,
                key_id,
                uuid.UUID(new.owner_id),
                new.service,
                new.tier,
                new.name,
                new.priority,
                new.enabled,
                dict(new.metadata or {}),
                sealed.kid,
                sealed.blob,
                fingerprint,
                mask(new.secret),
            )
        record = _from_row(one(row))
        await audit.append(
            conn,
            actor,
            "key.create",
            "key",
            record.id,
            {
                "service": record.service,
                "tier": record.tier,
                "owner_id": record.owner_id,
                "masked": record.masked,
            },
        )
    return record


async def list_keys(
    conn: Connection,
    owner_id: str | None,
    *,
    service: str | None,
    tier: str | None,
    status: str | None,
    limit: int,
    offset: int,
) -> tuple[list[KeyRecord], int]:
    args = (_owner(owner_id), service, tier, status)
    rows = await conn.fetch(LIST, *args, limit, offset)
    return [_from_row(r) for r in rows], await conn.fetchval(COUNT, *args)


async def get_key(conn: Connection, owner_id: str | None, key_id: str) -> KeyRecord:
    row = await conn.fetchrow(GET, parse_id(key_id, "key"), _owner(owner_id))
    if row is None:
        raise NotFound("no such key")
    return _from_row(row)


async def update_key(
    conn: Connection,
    vault: Vault,
    actor: audit.Actor,
    owner_id: str | None,
    key_id: str,
    changes: Mapping[str, Any],
    new_secret: Secret[str] | None,
) -> KeyRecord:
    """Change fields and/or replace the secret (rotation) in one audited transaction."""
    kid = parse_id(key_id, "key")
    async with conn.transaction():
        row = await conn.fetchrow(GET_FOR_UPDATE, kid, _owner(owner_id))
        if row is None:
            raise NotFound("no such key")
        current = _from_row(row)
        if new_secret is not None:
            fingerprint = await _refuse_duplicate(conn, vault, new_secret)
            sealed = vault.seal(new_secret, key_aad(current.id, current.owner_id, current.service))
            with unique_is_conflict(DUPLICATE):
                await conn.execute(
                    RESEAL, kid, sealed.kid, sealed.blob, fingerprint, mask(new_secret)
                )
        merged = {**current.to_json(), **changes}
        row = await conn.fetchrow(
            UPDATE,
            kid,
            merged["tier"],
            merged["name"],
            merged["priority"],
            merged["enabled"],
            merged["metadata"],
            merged["status"] if new_secret is None else "active",
        )
        updated = _from_row(one(row))
        details: dict[str, Any] = {"changed": sorted(changes)}
        if new_secret is not None:
            details["secret_replaced"] = True
            details["masked"] = updated.masked
        await audit.append(conn, actor, "key.update", "key", updated.id, details)
    return updated


async def delete_key(
    conn: Connection, actor: audit.Actor, owner_id: str | None, key_id: str
) -> None:
    kid = parse_id(key_id, "key")
    async with conn.transaction():
        status = await conn.execute(DELETE, kid, _owner(owner_id))
        if status.endswith(" 0"):
            raise NotFound("no such key")
        await audit.append(conn, actor, "key.delete", "key", str(kid))


MARK_INVALID: Final = """UPDATE api_keys SET status = 'invalid', updated_at = now()
WHERE id = $1 AND status = 'active' RETURNING service"""


async def mark_invalid(conn: Connection, key_id: str, upstream_status: int) -> bool:
    """The gateway saw the upstream reject this key as invalid: stop using it until an admin
    sets it back to `active`. Audited; False when it was not active (already marked)."""
    kid = parse_id(key_id, "key")
    async with conn.transaction():
        service = await conn.fetchval(MARK_INVALID, kid)
        if service is None:
            return False
        await audit.append(
            conn,
            audit.Actor.system("gateway"),
            "key.invalid",
            "key",
            str(kid),
            {"service": service, "upstream_status": upstream_status},
        )
    return True


async def open_secret(conn: Connection, vault: Vault, key_id: str) -> Secret[str]:
    """Decrypt one stored key. The gateway's hot path caches this; admin responses never call it."""
    row = await conn.fetchrow(GET, parse_id(key_id, "key"), None)
    if row is None:
        raise NotFound("no such key")
    return vault.open(
        Sealed(row["kid"], bytes(row["sealed"])),
        key_aad(str(row["id"]), str(row["owner_id"]), row["service"]),
    )
