"""Identifiers: random UUIDs, and parsing that makes a malformed id look like a missing one."""

from __future__ import annotations

import uuid

from gateway.errors import NotFound


def new_id() -> str:
    return str(uuid.uuid4())


def parse_id(value: str, what: str) -> uuid.UUID:
    """A malformed id answers exactly like an unknown one (404), so ids cannot be probed."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"no such {what}") from None
