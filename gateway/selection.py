"""Key selection (pure): which of the stored keys a caller may use, best first.

Order: free tier before paid, then higher priority, then the oldest key. The cost-management
release adds quotas, cooldowns and strategies on top of this ranking.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from gateway.secret import Secret

TIER_ORDER = {"free": 0, "paid": 1}
DEFAULT_PERIOD = "daily"  # for a quota given without `quotaPeriod`


def quota_of(tier: str, metadata: dict[str, object], default_free_quota: int) -> int | None:
    """A key's quota: its `metadata.quota`, else DEFAULT_FREE_QUOTA for a free-tier key, else
    none (unlimited)."""
    quota = metadata.get("quota")
    if isinstance(quota, int) and not isinstance(quota, bool):
        return quota
    return default_free_quota if tier == "free" else None


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
    quota: int | None = None  # requests per `period`; None: unlimited
    period: str = DEFAULT_PERIOD


def rank(keys: Iterable[UsableKey]) -> list[UsableKey]:
    return sorted(keys, key=lambda k: (TIER_ORDER.get(k.tier, 9), -k.priority, k.created_at))


def allowed(keys: Iterable[UsableKey], owner_id: str, owner_is_admin: bool) -> list[UsableKey]:
    """A USER's token draws from that user's keys; an ADMIN's from every key."""
    return [k for k in keys if owner_is_admin or k.owner_id == owner_id]


class Stickiness:
    """`X-Wallet-Session`: a client session keeps the key it was last served with while that
    key is usable (a conversation stays on one account). Remembered per gateway process, for
    the MAX_SESSIONS most recent sessions."""

    MAX_SESSIONS: Final = 10_000
    MAX_SESSION_CHARS: Final = 128

    def __init__(self) -> None:
        self._keys: OrderedDict[tuple[str, str, str], str] = OrderedDict()

    def prefer(
        self, session: str | None, token_id: str, service: str, usable: list[UsableKey]
    ) -> list[UsableKey]:
        """`usable` with the session's key first, when it is among them."""
        if not session or len(session) > self.MAX_SESSION_CHARS:
            return usable
        key_id = self._keys.get((token_id, service, session))
        if key_id is None or usable[0].id == key_id:
            return usable
        sticky = [k for k in usable if k.id == key_id]
        return sticky + [k for k in usable if k.id != key_id] if sticky else usable

    def remember(self, session: str | None, token_id: str, service: str, key_id: str) -> None:
        if not session or len(session) > self.MAX_SESSION_CHARS:
            return
        entry = (token_id, service, session)
        self._keys[entry] = key_id
        self._keys.move_to_end(entry)
        if len(self._keys) > self.MAX_SESSIONS:
            self._keys.popitem(last=False)
