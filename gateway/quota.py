"""Per-key quotas and concurrency caps: counted in Redis, reserved atomically, one round trip.

A request's candidate keys (best first, in groups of equals: see selection.arrange) go to one
Lua script in one round trip. Group by group, it skips keys with no quota left in their
current UTC calendar window and keys at their concurrency cap, chooses one of the others
(the first; or for `least_used` the one with the fewest requests in its window; or for
`round_robin` the one served longest ago), counts the request against it and, when the key
has a cap, takes a lease on one of its slots. So N concurrent requests against a quota of Q
let exactly min(N, Q) through, and a key with `maxConcurrency` C never has more than C
requests in flight, whichever gateway process or host serves them.

A lease is a member of the key's sorted set scored by its expiry (Redis's clock): the
request gives it back when it is over, and one a crashed process never gave back stops
counting when it expires (the upstream total timeout plus a margin).
"""

from __future__ import annotations

import calendar
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway import rkeys
from gateway.hotredis import HotRedis, HotScript

log = structlog.get_logger(__name__)

# How long a counter outlives its window (clock skew between hosts, late reads).
GRACE_MS: Final = 60_000
UNLIMITED: Final = -1
# A lease outlives the longest upstream exchange by this much.
LEASE_MARGIN_S: Final = 60
# How a group's key is chosen: the first open one, the least used, the longest unserved.
Choice = Literal["first", "least", "rr"]
CHOICES: Final[dict[str, Choice]] = {
    "priority": "first",
    "weighted": "first",
    "least_used": "least",
    "round_robin": "rr",
}
PER_CANDIDATE: Final = 5  # ARGV values per candidate, see RESERVE

REFUND: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECR', KEYS[1]) end
return 0
"""

RESERVE: Final = """
-- KEYS[i]: candidate i's window counter; KEYS[n+i]: its leases (sorted set, member: lease id,
-- score: expiry in ms); KEYS[2n+1]: the service's turns (hash, key id -> turn last served).
-- ARGV[1]: first | least | rr; ARGV[2]: lease id; ARGV[3]: lease ms; then 5 per candidate:
-- limit (-1: none), counter TTL ms, group, concurrency cap (-1: none), key id.
local n = (#KEYS - 1) / 2
local choice, lease_id, lease_ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now, busy = nil, 0
local function arg(i, j) return ARGV[3 + (i - 1) * 5 + j] end
-- The count in the window of a candidate that may take the request; nil when it may not.
local function open(i)
  local limit = tonumber(arg(i, 1))
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if limit >= 0 and used >= limit then return nil end
  local cap = tonumber(arg(i, 4))
  if cap >= 0 then
    if now == nil then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[n + i], '-inf', now)
    if redis.call('ZCARD', KEYS[n + i]) >= cap then
      busy = 1
      return nil
    end
  end
  return used
end
local turns = KEYS[2 * n + 1]
local i = 1
while i <= n do
  local group = arg(i, 3)
  local best, best_score = nil, nil
  while i <= n and arg(i, 3) == group do
    local used = open(i)
    if used ~= nil then
      local score = 0
      if choice == 'least' then
        score = used
      elseif choice == 'rr' then
        score = tonumber(redis.call('HGET', turns, arg(i, 5)) or '0')
      end
      if best == nil or score < best_score then best, best_score = i, score end
      if choice == 'first' then break end
    end
    i = i + 1
  end
  if best ~= nil then
    local used = redis.call('INCR', KEYS[best])
    if used == 1 then redis.call('PEXPIRE', KEYS[best], arg(best, 2)) end
    if tonumber(arg(best, 4)) >= 0 then
      redis.call('ZADD', KEYS[n + best], now + lease_ms, lease_id)
      redis.call('PEXPIRE', KEYS[n + best], lease_ms)
    end
    if choice == 'rr' then
      redis.call('HSET', turns, arg(best, 5), redis.call('HINCRBY', turns, '~turn', 1))
      redis.call('PEXPIRE', turns, 604800000)
    end
    return {best, used, busy}
  end
end
return {0, 0, busy}
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
    """A candidate key's limits: `quota` requests per `period` (None: unlimited), at most
    `max_concurrency` requests in flight (None: no cap); `group`: see selection.Candidates."""

    key_id: str
    quota: int | None
    period: str
    max_concurrency: int | None = None
    group: int = 0


def new_lease_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Lease:
    """One of a key's concurrency slots, held by one request until released or expired."""

    key_id: str
    slots: str  # the key's sorted set (rkeys.in_flight)
    id: str


@dataclass(frozen=True)
class Reservation:
    index: int | None  # which candidate was charged; None: none could take the request
    used: int  # its count in the window, this request included
    retry_after_s: int  # when none could: seconds until the earliest window ends (busy: 1)
    busy: bool = False  # none could, and some were only at their concurrency cap
    lease: Lease | None = None  # the slot taken on a key with a cap
    counter: str | None = None  # the window counter charged, to give the request back


def lease_s(upstream_total_timeout_s: int) -> int:
    """How long a slot is held at most: the longest upstream exchange plus a margin."""
    return upstream_total_timeout_s + LEASE_MARGIN_S


class Quotas:
    def __init__(self, client: HotRedis, fail_open: bool = False) -> None:
        self._client = client
        self._fail_open = fail_open  # QUOTAS_FAIL_OPEN
        self._script = HotScript(client, RESERVE)
        self._refund = HotScript(client, REFUND)

    async def reserve(
        self,
        service: str,
        limits: Sequence[Limit],
        now: datetime | None = None,
        *,
        strategy: str = "priority",
        lease_seconds: int = LEASE_MARGIN_S,
        lease_id: str | None = None,
    ) -> Reservation:
        """Charge one of `limits` (best first, by group) with quota and a free slot left, as
        the service's `strategy` chooses within a group; one Redis round trip."""
        now = now or datetime.now(UTC)
        windows = [window(limit.period, now) for limit in limits]
        counters = zip(limits, windows, strict=True)
        keys = [
            *(rkeys.quota_counter(service, lim.key_id, w.id) for lim, w in counters),
            *(rkeys.in_flight(service, lim.key_id) for lim in limits),
            rkeys.rotation(service),
        ]
        lease_id = lease_id or new_lease_id()
        args: list[str | int] = [CHOICES.get(strategy, "first"), lease_id, lease_seconds * 1000]
        for lim, w in zip(limits, windows, strict=True):
            args += [
                UNLIMITED if lim.quota is None else lim.quota,
                int((w.end - now).total_seconds() * 1000) + GRACE_MS,
                lim.group,
                UNLIMITED if lim.max_concurrency is None else lim.max_concurrency,
                lim.key_id,
            ]
        try:
            index, used, busy = await self._script(keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError):
            counted = any(
                lim.quota is not None or lim.max_concurrency is not None for lim in limits
            )
            if counted and not self._fail_open:
                raise  # quotas and caps fail closed unless QUOTAS_FAIL_OPEN
            if counted:
                log.warning("quota_uncounted_redis_down", service=service)
                return Reservation(0, 0, 0)
            # Nothing to count or cap, only an order lost: serve the best key meanwhile.
            log.warning("key_rotation_unavailable", service=service)
            return Reservation(0, 0, 0)
        if index:
            chosen = int(index) - 1
            slots = keys[len(limits) + chosen]
            capped = limits[chosen].max_concurrency is not None
            lease = Lease(limits[chosen].key_id, slots, lease_id) if capped else None
            return Reservation(chosen, int(used), 0, lease=lease, counter=keys[chosen])
        if busy:
            return Reservation(None, 0, 1, busy=True)
        earliest = min(w.end for w in windows)
        return Reservation(None, 0, max(1, int((earliest - now).total_seconds() + 0.999)))

    async def refund(self, counter: str) -> None:
        """Give back a request charged to a window counter (its request went nowhere): one
        less, unless the window has ended and the counter expired meanwhile."""
        await self._refund(keys=[counter], args=[])

    @staticmethod
    def provisional(service: str, limits: Sequence[Limit], lease_id: str) -> list[Lease]:
        """The leases a reservation with `lease_id` may take: held by the request before the
        call, so that a request cancelled while the reply is on its way still gives its slot
        back (removing a lease that was never taken is harmless, and comes after the script
        on the same connection)."""
        return [
            Lease(lim.key_id, rkeys.in_flight(service, lim.key_id), lease_id)
            for lim in limits
            if lim.max_concurrency is not None
        ]

    async def release(self, leases: Sequence[Lease]) -> None:
        """Give slots back. A slot that can't be given back (Redis down) frees itself when its
        lease expires."""
        for lease in leases:
            try:
                await self._client.execute("ZREM", lease.slots, lease.id)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                log.warning("lease_release_failed", key_id=lease.key_id, error=type(exc).__name__)
