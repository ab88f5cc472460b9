"""Wallet tokens: what applications present instead of a real key. Stored only as a hash.

Format: `AIzaWT_` + 43 URL-safe base64 characters (256 random bits). The `AIza` prefix passes
the googlemaps SDK's client-side key check; every character is URL-unreserved, so SDKs can
put the token in a query string unchanged.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from gateway import audit
from gateway.db import Connection, Record, one
from gateway.errors import NotFound, ValidationFailed
from gateway.ids import parse_id
from gateway.limits import Budget, budget_from_db
from gateway.secret import Secret

PREFIX: Final = "AIzaWT_"
TOKEN_BYTES: Final = 32
MAX_NAME: Final = 200

GET: Final = """SELECT id, owner_id, name, services, hint, created_at, expires_at, revoked_at,
budget, rate_limit FROM tokens WHERE id = $1 AND ($2::uuid IS NULL OR owner_id = $2)"""
LIST: Final = """SELECT id, owner_id, name, services, hint, created_at, expires_at, revoked_at,
budget, rate_limit FROM tokens WHERE ($1::uuid IS NULL OR owner_id = $1)
ORDER BY created_at DESC LIMIT $2 OFFSET $3"""
COUNT: Final = "SELECT count(*) FROM tokens WHERE ($1::uuid IS NULL OR owner_id = $1)"
INSERT: Final = """INSERT INTO tokens (id, owner_id, name, services, token_hash, hint, expires_at,
budget, rate_limit) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id, owner_id, name, services, hint, created_at, expires_at, revoked_at, budget,
rate_limit"""
UPDATE: Final = """UPDATE tokens SET name = $3, budget = $4, rate_limit = $5
WHERE id = $1 AND ($2::uuid IS NULL OR owner_id = $2)
RETURNING id, owner_id, name, services, hint, created_at, expires_at, revoked_at, budget,
rate_limit"""
REVOKE: Final = """UPDATE tokens SET revoked_at = coalesce(revoked_at, now())
WHERE id = $1 AND ($2::uuid IS NULL OR owner_id = $2) RETURNING id"""
BY_HASH: Final = """SELECT t.id, t.owner_id, t.name, t.services, t.hint, t.created_at,
t.expires_at, t.revoked_at, t.budget, t.rate_limit, u.role, u.enabled
FROM tokens t JOIN users u ON u.id = t.owner_id WHERE t.token_hash = $1"""


@dataclass(frozen=True)
class TokenRecord:
    id: str
    owner_id: str
    name: str
    services: tuple[str, ...]
    hint: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    budget: Budget | None = None
    rate_limit: int | None = None  # requests per minute; None: the owner's tier decides

    def usable(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner_id": self.owner_id,
            "name": self.name,
            "services": list(self.services),
            "hint": self.hint,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "budget": self.budget.to_json() if self.budget else None,
            "rate_limit": self.rate_limit,
        }


def _from_row(row: Record) -> TokenRecord:
    return TokenRecord(
        str(row["id"]),
        str(row["owner_id"]),
        row["name"],
        tuple(row["services"]),
        row["hint"],
        row["created_at"],
        row["expires_at"],
        row["revoked_at"],
        budget_from_db(row["budget"]),
        row["rate_limit"],
    )


def generate() -> Secret[str]:
    return Secret(PREFIX + secrets.token_urlsafe(TOKEN_BYTES))


def token_hash(token: Secret[str]) -> bytes:
    # 256 random bits: a fast hash is enough (no dictionary to attack), and keeps lookups cheap.
    # surrogatepass: a presented token can hold undecodable header bytes (surrogate-escaped)
    # or a lone surrogate from JSON; it hashes to no stored token instead of raising.
    return hashlib.sha256(token.reveal().encode("utf-8", "surrogatepass")).digest()


def looks_like_token(value: str) -> bool:
    return value.startswith(PREFIX) and len(value) == len(PREFIX) + 43


def hint(token: Secret[str]) -> str:
    value = token.reveal()
    return f"{PREFIX}…{value[-4:]}"


def validate_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME:
        raise ValidationFailed("name", f"must be a non-empty string of at most {MAX_NAME} chars")
    return value.strip()


def validate_expiry(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationFailed("expires_at", "must be an ISO 8601 time or null")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        # In UTC now: a time near year 9999 with a negative offset overflows here, not later
        # as a 500 when the database driver converts it.
        when = when.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValidationFailed("expires_at", "must be an ISO 8601 time or null") from None
    if when <= datetime.now(UTC):
        raise ValidationFailed("expires_at", "must be in the future")
    return when


async def create_token(
    conn: Connection,
    actor: audit.Actor,
    owner_id: str,
    name: str,
    services: list[str],
    expires_at: datetime | None,
    budget: Budget | None = None,
    rate_limit: int | None = None,
) -> tuple[TokenRecord, Secret[str]]:
    token = generate()
    async with conn.transaction():
        row = await conn.fetchrow(
            INSERT,
            uuid.uuid4(),
            uuid.UUID(owner_id),
            name,
            services,
            token_hash(token),
            hint(token),
            expires_at,
            budget.to_json() if budget else None,
            rate_limit,
        )
        record = _from_row(one(row))
        await audit.append(
            conn,
            actor,
            "token.create",
            "token",
            record.id,
            {
                "name": name,
                "services": services,
                "owner_id": owner_id,
                "budget": budget.to_json() if budget else None,
                "rate_limit": rate_limit,
            },
        )
    return record, token


async def update_token(
    conn: Connection,
    actor: audit.Actor,
    owner_id: str | None,
    token_id: str,
    changes: dict[str, Any],
) -> TokenRecord:
    """Change a token's name, budget or rate limit (`changes` holds validated values)."""
    owner = uuid.UUID(owner_id) if owner_id else None
    async with conn.transaction():
        row = await conn.fetchrow(GET + " FOR UPDATE", parse_id(token_id, "token"), owner)
        if row is None:
            raise NotFound("no such token")
        before = _from_row(row)
        budget = changes.get("budget", before.budget)
        row = await conn.fetchrow(
            UPDATE,
            uuid.UUID(before.id),
            owner,
            changes.get("name", before.name),
            budget.to_json() if budget else None,
            changes.get("rate_limit", before.rate_limit),
        )
        after = _from_row(one(row))
        details = {k: (v.to_json() if isinstance(v, Budget) else v) for k, v in changes.items()}
        await audit.append(conn, actor, "token.update", "token", after.id, details)
    return after


async def list_tokens(
    conn: Connection, owner_id: str | None, limit: int, offset: int
) -> tuple[list[TokenRecord], int]:
    owner = uuid.UUID(owner_id) if owner_id else None
    rows = await conn.fetch(LIST, owner, limit, offset)
    return [_from_row(r) for r in rows], await conn.fetchval(COUNT, owner)


async def get_token(conn: Connection, owner_id: str | None, token_id: str) -> TokenRecord:
    owner = uuid.UUID(owner_id) if owner_id else None
    row = await conn.fetchrow(GET, parse_id(token_id, "token"), owner)
    if row is None:
        raise NotFound("no such token")
    return _from_row(row)


async def revoke_token(
    conn: Connection, actor: audit.Actor, owner_id: str | None, token_id: str
) -> None:
    owner = uuid.UUID(owner_id) if owner_id else None
    async with conn.transaction():
        if await conn.fetchval(REVOKE, parse_id(token_id, "token"), owner) is None:
            raise NotFound("no such token")
        await audit.append(conn, actor, "token.revoke", "token", token_id)


async def find_by_token(conn: Connection, token: Secret[str]) -> TokenRecord | None:
    """The token record for a presented token, if known (usable or not)."""
    row = await conn.fetchrow(BY_HASH, token_hash(token))
    return _from_row(row) if row and row["enabled"] else None
