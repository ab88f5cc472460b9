"""Users: accounts, roles and argon2 password hashes."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway import audit
from gateway.db import Connection, Record, one, unique_is_conflict
from gateway.errors import Conflict, NotFound, ValidationFailed
from gateway.ids import new_id, parse_id
from gateway.limits import Budget, budget_from_db
from gateway.secret import Secret

Role = Literal["USER", "ADMIN"]
ROLES: Final = ("USER", "ADMIN")
USERNAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{1,63}$")
MIN_PASSWORD: Final = 12
_HASHER: Final = PasswordHasher()
# Verified against when the user does not exist, so timing does not reveal usernames.
_DUMMY_HASH: Final = _HASHER.hash("not-a-real-password")

GET: Final = """SELECT id, username, role, enabled, password_changed_at, created_at, updated_at,
tier, budget FROM users WHERE id = $1"""
GET_FOR_UPDATE: Final = GET + " FOR UPDATE"
GET_LOGIN: Final = """SELECT id, username, role, enabled, password_changed_at, created_at,
updated_at, tier, budget, password_hash FROM users WHERE lower(username) = lower($1)"""
LIST: Final = """SELECT id, username, role, enabled, password_changed_at, created_at, updated_at,
tier, budget FROM users ORDER BY created_at, username LIMIT $1 OFFSET $2"""
COUNT: Final = "SELECT count(*) FROM users"
INSERT: Final = """INSERT INTO users (id, username, password_hash, role) VALUES ($1, $2, $3, $4)
RETURNING id, username, role, enabled, password_changed_at, created_at, updated_at, tier, budget"""
UPDATE: Final = """UPDATE users SET role = $2, enabled = $3, tier = $4, budget = $5,
updated_at = now() WHERE id = $1
RETURNING id, username, role, enabled, password_changed_at, created_at, updated_at, tier, budget"""
UPDATE_HASH: Final = """UPDATE users SET password_hash = $2, password_changed_at = now(),
updated_at = now() WHERE id = $1"""
DELETE: Final = "DELETE FROM users WHERE id = $1"
USERNAMES: Final = "SELECT id, username FROM users WHERE id = ANY($1::uuid[])"
ACTIVE_ADMINS: Final = "SELECT count(*) FROM users WHERE role = 'ADMIN' AND enabled"
# Serialises changes that could remove the last active admin.
ADMIN_LOCK: Final = 0xAD314


@dataclass(frozen=True)
class User:
    id: str
    username: str
    role: Role
    enabled: bool
    password_changed_at: datetime
    created_at: datetime
    updated_at: datetime
    tier: str | None = None  # None: by role (see `rate_tier`)
    budget: Budget | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "ADMIN"

    @property
    def rate_tier(self) -> str:
        return self.tier or default_tier(self.role)

    def actor(self, source: str) -> audit.Actor:
        return audit.Actor(self.id, self.username, source)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "username": self.username,
            "role": self.role,
            "enabled": self.enabled,
            "tier": self.rate_tier,
            "budget": self.budget.to_json() if self.budget else None,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


def _from_row(row: Record) -> User:
    return User(
        str(row["id"]),
        row["username"],
        cast(Role, row["role"]),
        row["enabled"],
        row["password_changed_at"],
        row["created_at"],
        row["updated_at"],
        row["tier"],
        budget_from_db(row["budget"]),
    )


def default_tier(role: str) -> str:
    return "admin" if role == "ADMIN" else "free"


def validate_tier(value: object, known: Iterable[str]) -> str | None:
    """A rate-limit tier named in RATE_LIMIT_TIERS, or null for the role's default."""
    names = sorted(known)
    if value is None:
        return None
    if not isinstance(value, str) or value not in names:
        raise ValidationFailed("tier", f"must be one of {', '.join(names)} or null")
    return value


def validate_username(value: object) -> str:
    if not isinstance(value, str) or not USERNAME.fullmatch(value):
        raise ValidationFailed("username", "2-64 characters: letters, digits, '.', '_', '@', '-'")
    return value


def validate_password(value: object, field: str = "password") -> Secret[str]:
    if not isinstance(value, str) or not MIN_PASSWORD <= len(value) <= 1024:
        raise ValidationFailed(field, f"must be a string of {MIN_PASSWORD} to 1024 characters")
    return Secret(value)


def validate_role(value: object) -> Role:
    if value not in ROLES:
        raise ValidationFailed("role", "must be USER or ADMIN")
    return value


async def hash_password(password: Secret[str]) -> str:
    # argon2 is deliberately slow: keep it off the event loop.
    return await asyncio.to_thread(_HASHER.hash, password.reveal())


def _verify(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


async def check_password(conn: Connection, username: str, password: Secret[str]) -> User | None:
    """The enabled user with this name and password, or None (same cost either way)."""
    row = await conn.fetchrow(GET_LOGIN, username)
    stored = row["password_hash"] if row else _DUMMY_HASH
    ok = await asyncio.to_thread(_verify, stored, password.reveal())
    if row is None or not ok or not row["enabled"]:
        return None
    return _from_row(row)


async def get_user(conn: Connection, user_id: str | uuid.UUID) -> User:
    row = await conn.fetchrow(
        GET, user_id if isinstance(user_id, uuid.UUID) else parse_id(user_id, "user")
    )
    if row is None:
        raise NotFound("no such user")
    return _from_row(row)


async def list_users(conn: Connection, limit: int, offset: int) -> tuple[list[User], int]:
    rows = await conn.fetch(LIST, limit, offset)
    return [_from_row(r) for r in rows], await conn.fetchval(COUNT)


async def usernames(conn: Connection, user_ids: Iterable[str]) -> dict[str, str]:
    """`{user id: username}` for these ids, in one query (a page naming the owners of the
    rows it lists); an id with no user is left out."""
    ids = [uuid.UUID(user_id) for user_id in set(user_ids)]
    if not ids:
        return {}
    rows = await conn.fetch(USERNAMES, ids)
    return {str(row["id"]): row["username"] for row in rows}


async def create_user(
    conn: Connection, actor: audit.Actor, username: str, password: Secret[str], role: Role
) -> User:
    password_hash = await hash_password(password)
    async with conn.transaction():
        with unique_is_conflict(f"username {username!r} is taken"):
            row = await conn.fetchrow(INSERT, uuid.UUID(new_id()), username, password_hash, role)
        user = _from_row(one(row))
        await audit.append(
            conn, actor, "user.create", "user", user.id, {"username": username, "role": role}
        )
    return user


class Unchanged:
    """A field the update leaves as it is (None means "set to null" for nullable fields)."""


UNCHANGED: Final = Unchanged()


async def update_user(
    conn: Connection,
    actor: audit.Actor,
    user_id: str,
    *,
    role: Role | None,
    enabled: bool | None,
    tier: str | Unchanged | None = UNCHANGED,
    budget: Budget | Unchanged | None = UNCHANGED,
) -> User:
    uid = parse_id(user_id, "user")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADMIN_LOCK)
        row = await conn.fetchrow(GET_FOR_UPDATE, uid)
        if row is None:
            raise NotFound("no such user")
        before = _from_row(row)
        new_role = role or before.role
        new_enabled = before.enabled if enabled is None else enabled
        loses_admin = (
            before.is_admin and before.enabled and (new_role != "ADMIN" or not new_enabled)
        )
        if loses_admin:
            await _refuse_last_admin(conn)
        new_tier = before.tier if isinstance(tier, Unchanged) else tier
        new_budget = before.budget if isinstance(budget, Unchanged) else budget
        after = _from_row(
            one(
                await conn.fetchrow(
                    UPDATE,
                    uid,
                    new_role,
                    new_enabled,
                    new_tier,
                    new_budget.to_json() if new_budget else None,
                )
            )
        )
        changes: dict[str, Any] = {
            k: v for k, v in (("role", role), ("enabled", enabled)) if v is not None
        }
        if not isinstance(tier, Unchanged):
            changes["tier"] = tier
        if not isinstance(budget, Unchanged):
            changes["budget"] = budget.to_json() if budget else None
        await audit.append(conn, actor, "user.update", "user", after.id, changes)
    return after


async def delete_user(conn: Connection, actor: audit.Actor, user_id: str) -> None:
    uid = parse_id(user_id, "user")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADMIN_LOCK)
        row = await conn.fetchrow(GET_FOR_UPDATE, uid)
        if row is None:
            raise NotFound("no such user")
        user = _from_row(one(row))
        if user.is_admin and user.enabled:
            await _refuse_last_admin(conn)
        await conn.execute(DELETE, uid)
        await audit.append(conn, actor, "user.delete", "user", user.id, {"username": user.username})


async def _refuse_last_admin(conn: Connection) -> None:
    if await conn.fetchval(ACTIVE_ADMINS) <= 1:
        raise Conflict("the last active ADMIN cannot be disabled, demoted or deleted")


async def set_password(
    conn: Connection, actor: audit.Actor, user_id: str, password: Secret[str]
) -> None:
    password_hash = await hash_password(password)
    async with conn.transaction():
        status = await conn.execute(UPDATE_HASH, parse_id(user_id, "user"), password_hash)
        if status.endswith(" 0"):
            raise NotFound("no such user")
        await audit.append(conn, actor, "user.password", "user", user_id)


async def ensure_first_admin(conn: Connection, password: Secret[str]) -> User | None:
    """Create `admin` when no user exists yet; None when users exist already."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", ADMIN_LOCK)
        if await conn.fetchval(COUNT):
            return None
        return await create_user(conn, audit.Actor.system("bootstrap"), "admin", password, "ADMIN")
