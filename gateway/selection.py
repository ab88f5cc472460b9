"""Key selection (pure): which of the stored keys a caller may use, best first.

Order: free tier before paid, then higher priority; keys of the same tier and priority form
a group, ordered by the service's strategy: `priority` (the oldest first), `weighted` (a
random order drawn by `metadata.weight`), `round_robin` and `least_used` (the reservation
script in gateway/quota.py chooses within the group, from state shared in Redis). Keys that
are exhausted, resting or at their concurrency cap are skipped by the callers.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal, get_args

from gateway.secret import Secret

TIER_ORDER = {"free": 0, "paid": 1}
DEFAULT_PERIOD = "daily"  # for a quota given without `quotaPeriod`
Strategy = Literal["priority", "round_robin", "least_used", "weighted"]
STRATEGIES: Final = get_args(Strategy)
DEFAULT_WEIGHT: Final = 1.0
# Strategies that order a group in the process; the others need the reservation script.
LOCAL_STRATEGIES: Final = frozenset({"priority", "weighted"})


def quota_of(tier: str, metadata: dict[str, object], default_free_quota: int) -> int | None:
    """A key's quota: its `metadata.quota`, else DEFAULT_FREE_QUOTA for a free-tier key, else
    none (unlimited)."""
    quota = metadata.get("quota")
    if isinstance(quota, int) and not isinstance(quota, bool):
        return quota
    return default_free_quota if tier == "free" else None


def weight_of(metadata: Mapping[str, object]) -> float:
    """`metadata.weight`: a positive number, DEFAULT_WEIGHT when absent (or not one)."""
    weight = metadata.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return DEFAULT_WEIGHT
    return float(weight) if math.isfinite(weight) and weight > 0 else DEFAULT_WEIGHT


def concurrency_cap_of(metadata: Mapping[str, object]) -> int | None:
    """`metadata.maxConcurrency`: at most this many requests in flight on the key."""
    cap = metadata.get("maxConcurrency")
    if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0:
        return cap
    return None


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
    weight: float = DEFAULT_WEIGHT  # share of its group's traffic (`weighted` strategy)
    max_concurrency: int | None = None  # requests in flight at once; None: no cap


def rank(keys: Iterable[UsableKey]) -> list[UsableKey]:
    return sorted(keys, key=lambda k: (TIER_ORDER.get(k.tier, 9), -k.priority, k.created_at))


@dataclass(frozen=True)
class Candidates:
    """Keys best first, and the group of each (ascending): the keys of one group are equals
    that the strategy chooses among; a group is tried only when every key before it is out."""

    keys: tuple[UsableKey, ...]
    groups: tuple[int, ...]


def arrange(
    keys: Iterable[UsableKey],
    strategy: str,
    demoted: Callable[[str], bool] = lambda _: False,
    *,
    pinned: str | None = None,
    draw: Callable[[], float] = random.random,
) -> Candidates:
    """Free before paid, then priority; a `demoted` key (nearly out upstream) after all the
    others; the `pinned` key (a sticky session's) first, in a group of its own. Within a
    group: the oldest first, or for `weighted` a random order where each key comes first with
    a chance proportional to its weight (Efraimidis-Spirakis: sort by u ** (1 / weight))."""

    if isinstance(keys, list) and len(keys) == 1:  # the common case: nothing to order
        return Candidates((keys[0],), (0,))

    def group(k: UsableKey) -> tuple[bool, bool, int, int]:
        return (k.id != pinned, demoted(k.id), TIER_ORDER.get(k.tier, 9), -k.priority)

    ranked = [(group(k), k) for k in keys]
    if strategy == "weighted":
        ranked.sort(key=lambda gk: (gk[0], -(draw() ** (1.0 / gk[1].weight))))
    else:
        ranked.sort(key=lambda gk: (gk[0], gk[1].created_at))
    groups: list[int] = []
    number, previous = -1, None
    for current, _ in ranked:
        if current != previous:
            number, previous = number + 1, current
        groups.append(number)
    return Candidates(tuple(k for _, k in ranked), tuple(groups))


def allowed(keys: Iterable[UsableKey], owner_id: str, owner_is_admin: bool) -> list[UsableKey]:
    """A USER's token draws from that user's keys; an ADMIN's from every key."""
    if owner_is_admin:
        return list(keys)
    return [k for k in keys if k.owner_id == owner_id]


class Stickiness:
    """`X-Wallet-Session`: a client session keeps the key it was last served with while that
    key is usable (a conversation stays on one account). Remembered per gateway process, for
    the MAX_SESSIONS most recent sessions."""

    MAX_SESSIONS: Final = 10_000
    MAX_SESSION_CHARS: Final = 128

    def __init__(self) -> None:
        self._keys: OrderedDict[tuple[str, str, str], str] = OrderedDict()

    def key_for(self, session: str | None, token_id: str, service: str) -> str | None:
        """The key id the session was last served with, if any."""
        if not session or len(session) > self.MAX_SESSION_CHARS:
            return None
        return self._keys.get((token_id, service, session))

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
