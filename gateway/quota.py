"""Per-key quotas: UTC calendar windows, counted in Redis, reserved atomically.

A request's candidate keys (best first) go to one Lua script in one round trip: it takes the
first candidate with quota left in its current window and counts the request against it, so
N concurrent requests against a quota of Q let exactly min(N, Q) through, whichever gateway
process or host serves them. Counters expire with their window.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from gateway import rkeys
from gateway.hotredis import HotRedis, HotScript

# How long a counter outlives its window (clock skew between hosts, late reads).
GRACE_MS: Final = 60_000
UNLIMITED: Final = -1

RESERVE: Final = """
-- KEYS[i]: the window counter of candidate i; ARGV[i]: its limit (-1: none), ARGV[n+i]: TTL ms
local n = #KEYS
for i = 1, n do
  local limit = tonumber(ARGV[i])
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if limit < 0 or used < limit then
    used = redis.call('INCR', KEYS[i])
    if used == 1 then redis.call('PEXPIRE', KEYS[i], ARGV[n + i]) end
    return {i, used}
  end
end
return {0, 0}
"""


@dataclass(frozen=True)
class Window:
    period: str
    id: str  # e.g. "d20261126", part of the counter's name
    end: datetime


def window(period: str, now: datetime) -> Window:
    """The UTC calendar window of `period` (minute, hour, daily, monthly) holding `now`."""
    if period == "minute":
        start = now.replace(second=0, microsecond=0)
        return Window(period, start.strftime("m%Y%m%d%H%M"), start + timedelta(minutes=1))
    if period == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return Window(period, start.strftime("h%Y%m%d%H"), start + timedelta(hours=1))
    if period == "daily":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return Window(period, start.strftime("d%Y%m%d"), start + timedelta(days=1))
    if period == "monthly":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        days = calendar.monthrange(start.year, start.month)[1]
        return Window(period, start.strftime("M%Y%m"), start + timedelta(days=days))
    raise ValueError(f"unknown quota period {period!r}")


@dataclass(frozen=True)
class Limit:
    """A key's quota: `quota` requests per `period`; None means unlimited."""

    key_id: str
    quota: int | None
    period: str


@dataclass(frozen=True)
class Reservation:
    index: int | None  # which candidate was charged; None: every one is exhausted
    used: int  # its count in the window, this request included
    retry_after_s: int  # when nothing was left: seconds until the earliest window ends


class Quotas:
    def __init__(self, client: HotRedis) -> None:
        self._script = HotScript(client, RESERVE)

    async def reserve(
        self, service: str, limits: Sequence[Limit], now: datetime | None = None
    ) -> Reservation:
        """Charge the first of `limits` (best first) with quota left; one Redis round trip."""
        now = now or datetime.now(UTC)
        windows = [window(limit.period, now) for limit in limits]
        keys = [
            rkeys.quota_counter(service, limit.key_id, w.id)
            for limit, w in zip(limits, windows, strict=True)
        ]
        caps = [UNLIMITED if limit.quota is None else limit.quota for limit in limits]
        ttls = [int((w.end - now).total_seconds() * 1000) + GRACE_MS for w in windows]
        index, used = await self._script(keys=keys, args=[*caps, *ttls])
        if index:
            return Reservation(int(index) - 1, int(used), 0)
        earliest = min(w.end for w in windows)
        return Reservation(None, 0, max(1, int((earliest - now).total_seconds() + 0.999)))
