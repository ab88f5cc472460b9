"""Keys resting after their upstream refused them for rate or quota reasons.

When an upstream refuses a key for rate or quota reasons (gateway/signals.py judges the
answer), the key rests for the upstream's `Retry-After` (or `retry-after-ms`, or its
rate-limit reset headers), a per-signal default if it gives none, and comes back on its own
afterwards. The
process that saw the refusal tells every gateway process over the invalidation channel, and
each keeps the resting keys in memory, so choosing a key costs no round trip. The rest is
also written to one Redis hash, which a process reads whenever it (re)subscribes: one that
starts later, or missed messages while Redis was away, knows the keys resting already (the
admin console's dashboard too). An admin's change to a key ends its rest everywhere.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway import invalidation, rkeys
from gateway.errors import REDIS_DOWN

log = structlog.get_logger(__name__)
DEFAULT_S: Final = 60.0
MAX_S: Final = 24 * 3600.0  # an upstream cannot bench a key for longer than a day


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float:
    """How long the upstream asked us to wait: `retry-after-ms`, `Retry-After` in seconds or
    as an HTTP date; DEFAULT_S when absent or unreadable; capped at MAX_S."""
    wait = asked_wait_s(headers, now)
    return DEFAULT_S if wait is None else wait


def asked_wait_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """`retry-after-ms`, else `Retry-After` (seconds or an HTTP date), capped at MAX_S; None
    when the upstream named no (usable) wait."""
    wait: float | None = None
    if ms := headers.get("retry-after-ms"):
        try:
            wait = float(ms) / 1000
        except ValueError:
            wait = None
    if wait is None and (value := headers.get("Retry-After")):
        try:
            wait = float(value)
        except ValueError:
            try:
                wait = parsedate_to_datetime(value).timestamp() - (now or time.time())
            except (TypeError, ValueError):
                wait = None
    if wait is None or wait != wait or wait <= 0:  # absent, NaN, or in the past
        return None
    return min(wait, MAX_S)


class Cooldowns:
    def __init__(self, redis: Redis | RedisCluster) -> None:
        self._redis = redis
        self._until: dict[str, float] = {}  # key id -> wall-clock end of its rest

    def resting(self, key_id: str, now: float | None = None) -> float:
        """Seconds left of `key_id`'s rest; 0 when it may be used."""
        until = self._until.get(key_id)
        if until is None:
            return 0.0
        left = until - (now or time.time())
        if left <= 0:
            del self._until[key_id]
            return 0.0
        return left

    async def rest(self, key_id: str, seconds: float) -> None:
        """Rest `key_id` here at once, and on every other gateway process within a moment."""
        until = time.time() + seconds
        self.note(key_id, until)
        try:
            await self._redis.hset(rkeys.cooldowns(), key_id, f"{until:.3f}")
        except (*REDIS_DOWN, RedisError) as exc:  # best effort, as the announcement
            log.warning("cooldown_not_stored", key_id=key_id, error=type(exc).__name__)
        await invalidation.publish(self._redis, "cooldown", f"{key_id} {until:.3f}")

    async def load(self) -> None:
        """The rests announced before this process listened (ended ones are dropped)."""
        try:
            stored = await self._redis.hgetall(rkeys.cooldowns())
            now, ended = time.time(), []
            for raw_id, raw_until in stored.items():
                key_id = _text(raw_id)
                try:
                    until = float(_text(raw_until))
                except ValueError:
                    until = 0.0
                if until > now:
                    self.note(key_id, until)
                else:
                    ended.append(key_id)
            if ended:
                await self._redis.hdel(rkeys.cooldowns(), *ended)
        except (*REDIS_DOWN, RedisError) as exc:
            log.warning("cooldowns_not_loaded", error=type(exc).__name__)

    def note(self, key_id: str, until: float) -> None:
        if until > self._until.get(key_id, 0.0):
            self._until[key_id] = until

    def lift(self, key_id: str) -> None:
        """An admin changed the key (say, set it back to active): its rest ends."""
        self._until.pop(key_id, None)

    def on_message(self, target: str | None) -> None:
        """A `cooldown` message from the invalidation channel: `"<key id> <until epoch>"`."""
        key_id, _, until = (target or "").partition(" ")
        try:
            self.note(key_id, float(until))
        except ValueError:
            return


async def forget(redis: Redis | RedisCluster, key_id: str) -> None:
    """An admin changed or deleted the key: its stored rest goes (the `key` invalidation
    ends it in each process's memory)."""
    try:
        await redis.hdel(rkeys.cooldowns(), key_id)
    except (*REDIS_DOWN, RedisError) as exc:
        log.warning("cooldown_not_forgotten", key_id=key_id, error=type(exc).__name__)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# Upstream rate-limit headers: how many requests a key has left in the upstream's own window.
REMAINING_HEADERS: Final = ("x-ratelimit-remaining-requests", "x-ratelimit-remaining")
RESET_HEADERS: Final = ("x-ratelimit-reset-requests", "x-ratelimit-reset")
LOW_REMAINING: Final = 1  # at or below this, a key is ranked after the others
_DURATION = re.compile(
    r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?"
)


LIMIT_PAIRS: Final = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    ("x-ratelimit-remaining", "x-ratelimit-reset"),
)
# A plain reset number this large is a point in time (epoch seconds, as GitHub sends), not
# a duration: no upstream window lasts 30 years.
EPOCH_AFTER: Final = 10**9


def reset_after_s(value: str, now: float | None = None) -> float | None:
    """OpenAI's `x-ratelimit-reset-requests` ("1s", "6m0s", "20ms", "1h2m3.5s"), plain
    seconds, or epoch seconds; None when unreadable."""
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if number != number:  # NaN
            return None
        if number >= EPOCH_AFTER:
            number -= now or time.time()
        return max(number, 0.0)
    match = _DURATION.fullmatch(value)
    if not match or not value:
        return None
    hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def limit_reset_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """When a refused key's upstream window resets, from its rate-limit headers: the longest
    reset among the limits whose `remaining` is 0 (all of them when none says 0, as a limit
    on tokens and one on requests come with their own pair), capped at MAX_S; None without
    any readable reset header."""
    exhausted: list[float] = []
    others: list[float] = []
    for remaining, reset in LIMIT_PAIRS:
        value = headers.get(reset)
        wait = reset_after_s(value, now) if value is not None else None
        if wait is None or wait <= 0:
            continue
        (exhausted if headers.get(remaining, "").strip() == "0" else others).append(wait)
    waits = exhausted or others
    return min(max(waits), MAX_S) if waits else None


class Pressure:
    """Keys whose upstream said they are nearly out of requests for its current window: they
    are ranked after the others until the window resets (seen by this process only)."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}

    def note(self, key_id: str, headers: Mapping[str, str], now: float | None = None) -> None:
        remaining = next((headers[h] for h in REMAINING_HEADERS if h in headers), None)
        if remaining is None:
            return
        try:
            low = int(float(remaining)) <= LOW_REMAINING
        except ValueError:
            return
        if not low:
            self._until.pop(key_id, None)
            return
        reset = next((reset_after_s(headers[h]) for h in RESET_HEADERS if h in headers), None)
        self._until[key_id] = (now or time.time()) + min(reset or DEFAULT_S, MAX_S)

    def low(self, key_id: str, now: float | None = None) -> bool:
        until = self._until.get(key_id)
        if until is None:
            return False
        if until <= (now or time.time()):
            del self._until[key_id]
            return False
        return True
