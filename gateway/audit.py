"""The audit log: one hash-chained record per change of state, written in the change's transaction.

Each record's hash covers its content and the previous record's hash; `seq` has no gaps
(it is assigned under a transaction-scoped advisory lock), so an edited, inserted or deleted
record breaks the chain at a place `verify` names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from gateway.db import Connection, Record
from gateway.errors import ValidationFailed

GENESIS: Final = "0" * 64
# pg_advisory_xact_lock key serialising appends (held until the change commits).
CHAIN_LOCK: Final = 0xA0D17
LAST: Final = "SELECT seq, hash, at FROM audit_log ORDER BY seq DESC LIMIT 1"
INSERT: Final = """
INSERT INTO audit_log (seq, at, actor_id, actor, action, target_type, target_id, source,
                       details, prev_hash, hash)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"""
SCAN: Final = """
SELECT seq, at, actor_id, actor, action, target_type, target_id, source, details, prev_hash, hash
FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"""
# $5: the free-text search as a LIKE pattern (see `like_pattern`), matched against the
# action, actor, target and details (which never hold a secret), or null.
LIST: Final = """
SELECT seq, at, actor_id, actor, action, target_type, target_id, source, details, hash
FROM audit_log
WHERE ($1::text IS NULL OR action = $1) AND ($2::text IS NULL OR target_type = $2)
  AND ($3::text IS NULL OR target_id = $3) AND ($4::text IS NULL OR actor = $4)
  AND ($5::text IS NULL OR action ILIKE $5 OR actor ILIKE $5 OR target_type ILIKE $5
       OR target_id ILIKE $5 OR details::text ILIKE $5)
ORDER BY seq DESC LIMIT $6 OFFSET $7"""
COUNT: Final = """
SELECT count(*) FROM audit_log
WHERE ($1::text IS NULL OR action = $1) AND ($2::text IS NULL OR target_type = $2)
  AND ($3::text IS NULL OR target_id = $3) AND ($4::text IS NULL OR actor = $4)
  AND ($5::text IS NULL OR action ILIKE $5 OR actor ILIKE $5 OR target_type ILIKE $5
       OR target_id ILIKE $5 OR details::text ILIKE $5)"""
ACTIONS: Final = "SELECT DISTINCT action FROM audit_log ORDER BY action"
MAX_SEARCH: Final = 200


@dataclass(frozen=True)
class Actor:
    """Who made a change: a user (by id and name) or the system/CLI, and from where."""

    id: str | None
    name: str
    source: str

    @classmethod
    def system(cls, source: str = "cli") -> Actor:
        return cls(None, "system", source)


def record_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    canonical = json.dumps(
        {
            k: record[k]
            for k in (
                "seq",
                "at",
                "actor_id",
                "actor",
                "action",
                "target_type",
                "target_id",
                "source",
                "details",
            )
        },
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(f"{prev_hash}\n{canonical}".encode()).hexdigest()


def _at_text(at: datetime) -> str:
    return at.astimezone(UTC).isoformat(timespec="microseconds")


async def append(
    conn: Connection,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str | None,
    details: Mapping[str, Any] | None = None,
) -> None:
    """Append a record. Must run inside the transaction that makes the change."""
    assert conn.is_in_transaction(), "audit records are written in the change's transaction"
    await conn.execute("SELECT pg_advisory_xact_lock($1)", CHAIN_LOCK)
    last = await conn.fetchrow(LAST)
    seq, prev = (last["seq"] + 1, last["hash"]) if last else (1, GENESIS)
    at = datetime.now(UTC)
    record = {
        "seq": seq,
        "at": _at_text(at),
        "actor_id": actor.id,
        "actor": actor.name,
        "action": action,
        "target_type": target_type,
        "target_id": target_id,
        "source": actor.source,
        "details": dict(details or {}),
    }
    await conn.execute(
        INSERT,
        seq,
        at,
        actor.id,
        actor.name,
        action,
        target_type,
        target_id,
        actor.source,
        record["details"],
        prev,
        record_hash(prev, record),
    )


@dataclass(frozen=True)
class Break:
    seq: int
    problem: str


@dataclass(frozen=True)
class Verdict:
    checked: int
    head_seq: int
    head_hash: str
    breaks: tuple[Break, ...]

    @property
    def ok(self) -> bool:
        return not self.breaks


async def _scan(conn: Connection, batch: int) -> AsyncIterator[Record]:
    after = 0
    while rows := await conn.fetch(SCAN, after, batch):
        for row in rows:
            yield row
        after = rows[-1]["seq"]


async def verify(conn: Connection, batch: int = 1000) -> Verdict:
    """Walk the chain; name every record whose content, link or position is wrong."""
    breaks: list[Break] = []
    expected_seq, prev, checked = 1, GENESIS, 0
    async for row in _scan(conn, batch):
        checked += 1
        seq = row["seq"]
        if seq != expected_seq:
            missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}-{seq - 1}"
            breaks.append(Break(seq, f"record(s) {missing} missing before this one"))
        record = {
            **dict(row),
            "at": _at_text(row["at"]),
            "actor_id": str(row["actor_id"]) if row["actor_id"] else None,
        }
        if row["prev_hash"] != prev:
            breaks.append(
                Break(
                    seq,
                    "does not link to the record before it "
                    "(a record was inserted, deleted or rewritten)",
                )
            )
        if record_hash(row["prev_hash"], record) != row["hash"]:
            breaks.append(Break(seq, "content does not match its hash (edited)"))
        prev, expected_seq = row["hash"], seq + 1
    return Verdict(checked, expected_seq - 1, prev, tuple(breaks))


async def list_records(
    conn: Connection,
    *,
    action: str | None,
    target_type: str | None,
    target_id: str | None,
    actor: str | None,
    limit: int,
    offset: int,
    q: str | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Records matching every filter given, newest first; `q` searches as `validate_search`
    says."""
    pattern = like_pattern(q) if q else None
    filters = (action, target_type, target_id, actor, pattern)
    rows = await conn.fetch(LIST, *filters, limit, offset)
    total: int = await conn.fetchval(COUNT, *filters)
    items = [
        {
            "seq": r["seq"],
            "at": r["at"].isoformat(),
            "actor_id": _str(r["actor_id"]),
            "actor": r["actor"],
            "action": r["action"],
            "target_type": r["target_type"],
            "target_id": r["target_id"],
            "source": r["source"],
            "details": r["details"],
            "hash": r["hash"],
        }
        for r in rows
    ]
    return items, total


async def actions(conn: Connection) -> list[str]:
    """Every action recorded so far (for a filter's choices)."""
    return [r["action"] for r in await conn.fetch(ACTIONS)]


def validate_search(value: str | None) -> str | None:
    """Free text found in a record's action, actor, target or details (case-insensitive)."""
    if value is None or not value.strip():
        return None
    if len(value) > MAX_SEARCH or "\x00" in value:
        raise ValidationFailed("q", f"must be text of at most {MAX_SEARCH} characters")
    return value.strip()


def like_pattern(text: str) -> str:
    """`text` as a LIKE pattern matching it anywhere: its own `%`, `_` and `\\` match
    literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _str(value: object) -> str | None:
    return None if value is None else str(value)
