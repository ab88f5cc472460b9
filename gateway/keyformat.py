"""Key format detection: which built-in service a pasted secret belongs to (pure)."""

from __future__ import annotations

import re
from typing import Final

# (pattern, service). Order does not matter: every match is a candidate.
PATTERNS: Final = (
    (re.compile(r"^(sk|rk)_(test|live)_[A-Za-z0-9]{10,}$"), "stripe"),
    (re.compile(r"^sk-(proj-|svcacct-|admin-)?(?!ant-)[A-Za-z0-9_-]{16,}$"), "openai"),
    (re.compile(r"^AIza[0-9A-Za-z_-]{35}$"), "googlemaps"),
    (re.compile(r"^[0-9a-f]{32}$"), "openweather"),
)


def candidates(secret: str) -> list[str]:
    """Every built-in service whose key format the secret matches."""
    return [service for pattern, service in PATTERNS if pattern.fullmatch(secret)]
