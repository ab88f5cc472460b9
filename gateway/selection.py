"""Key selection (pure): which of the stored keys a caller may use, best first.

Order: free tier before paid, then higher priority, then the oldest key. The cost-management
release adds quotas, cooldowns and strategies on top of this ranking.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from gateway.secret import Secret

TIER_ORDER = {"free": 0, "paid": 1}


@dataclass(frozen=True)
class UsableKey:
    id: str
    owner_id: str
    service: str
    tier: str
    priority: int
    created_at: datetime
    secret: Secret[str]
    forms: tuple[str, ...] = field(default=(), repr=False)  # inject.key_forms(secret)


def rank(keys: Iterable[UsableKey]) -> list[UsableKey]:
    return sorted(keys, key=lambda k: (TIER_ORDER.get(k.tier, 9), -k.priority, k.created_at))


def allowed(keys: Iterable[UsableKey], owner_id: str, owner_is_admin: bool) -> list[UsableKey]:
    """A USER's token draws from that user's keys; an ADMIN's from every key."""
    return [k for k in keys if owner_is_admin or k.owner_id == owner_id]
