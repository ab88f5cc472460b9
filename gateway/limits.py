"""Client limits: rate limits per wallet token (by its owner's tier) and budgets per token and
per user, both checked in Redis in one script call before a request goes anywhere.

- Rate limit: requests per UTC minute, by the owner's tier in RATE_LIMIT_TIERS (counted
  over all their tokens together, so more tokens do not mean more requests) or by a token's
  own `rate_limit` (counted for that token alone); 0: unlimited. Refused requests count too.
- Budgets: an amount per period (`daily`, `monthly`, also `minute`, `hour`) on a token, on a
  user, or both. A request is charged its service's hold (see gateway/costs.py) when it is
  admitted, and settled to its real cost when it is over, so concurrent requests can never
  spend past a budget as long as no single answer costs more than the hold.

Everything one script touches is named under the owner's hash tag (`{caller:<user id>}`),
so the same script runs on Redis Cluster. Amounts are counted in integer nano-units.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final, NamedTuple

from gateway import rkeys
from gateway.costs import amount, money
from gateway.errors import TooManyRequests, ValidationFailed
from gateway.hotredis import HotRedis, HotScript
from gateway.quota import GRACE_MS, window

NANO: Final = Decimal(10) ** 9
MAX_BUDGET: Final = Decimal(1_000_000)
RATE_PERIOD: Final = "minute"
BUDGET_PERIODS: Final = {
    "minute": "minute",
    "hour": "hour",
    "hourly": "hour",
    "daily": "daily",
    "day": "daily",
    "monthly": "monthly",
    "month": "monthly",
}
NONE: Final = -1

ADMIT: Final = """
-- KEYS: rate counter, token spend, user spend (one owner's hash tag)
-- ARGV: rate limit (-1: none), rate TTL ms, hold (nano), token budget (nano, -1: none),
--       token TTL ms, user budget (nano, -1: none), user TTL ms
-- Returns {verdict, rate count, spent}: 0 admitted, 1 rate limited, 2 token budget, 3 user's.
local used = 0
local limit = tonumber(ARGV[1])
if limit >= 0 then
  used = redis.call('INCR', KEYS[1])
  if used == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  if used > limit then return {1, used, 0} end
end
local hold = tonumber(ARGV[3])
local budgets = {{KEYS[2], tonumber(ARGV[4]), ARGV[5], 2}, {KEYS[3], tonumber(ARGV[6]), ARGV[7], 3}}
for _, b in ipairs(budgets) do
  if b[2] >= 0 then
    local spent = tonumber(redis.call('GET', b[1]) or '0')
    if spent >= b[2] or spent + hold > b[2] then return {b[4], used, spent} end
  end
end
if hold > 0 then
  for _, b in ipairs(budgets) do
    if b[2] >= 0 then
      redis.call('INCRBY', b[1], hold)
      redis.call('PEXPIRE', b[1], b[3])
    end
  end
end
return {0, used, 0}
"""

SETTLE: Final = """
-- KEYS: spend counters to correct; ARGV[1]: the difference (nano), ARGV[2..]: their TTLs ms
for i, key in ipairs(KEYS) do
  redis.call('INCRBY', key, ARGV[1])
  redis.call('PEXPIRE', key, ARGV[i + 1])
end
return 0
"""


class Budget(NamedTuple):
    amount: Decimal
    period: str

    def to_json(self) -> dict[str, str]:
        return {"amount": money(self.amount), "period": self.period}


def validate_budget(value: object, field: str = "budget") -> Budget | None:
    """`{"amount": "10.00", "period": "monthly"}` (amount as a string or number) or null."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"amount", "period"}:
        raise ValidationFailed(field, 'must be {"amount": "10.00", "period": "monthly"} or null')
    limit = amount(f"{field}.amount", value.get("amount"), MAX_BUDGET)
    period = BUDGET_PERIODS.get(str(value.get("period", "monthly")))
    if period is None:
        raise ValidationFailed(f"{field}.period", "must be minute, hour, daily or monthly")
    return Budget(limit, period)


def budget_from_db(value: Mapping[str, Any] | None) -> Budget | None:
    if not value:
        return None
    return Budget(Decimal(str(value["amount"])), str(value["period"]))


def validate_rate_limit(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9:
        raise ValidationFailed(
            "rate_limit", "must be a whole number of requests per minute, or null"
        )
    return value


def nano(amount: Decimal) -> int:
    return int((amount * NANO).to_integral_value(ROUND_HALF_UP))


class RateLimited(TooManyRequests):
    code = "rate_limited"

    def __init__(self, limit: int, retry_after_s: int) -> None:
        super().__init__(
            f"{limit} requests per minute are allowed; retry after the minute ends",
            retry_after_s,
        )
        self.headers.update(rate_headers(limit, 0, retry_after_s))


class BudgetExceeded(TooManyRequests):
    code = "budget_exceeded"

    def __init__(self, whose: str, budget: Budget, retry_after_s: int) -> None:
        super().__init__(
            f"this request would take the {whose}'s {budget.period} budget of "
            f"{money(budget.amount)} past its limit; it renews when the period ends",
            retry_after_s,
        )
        self.headers["x-should-retry"] = "false"


def rate_headers(limit: int, remaining: int, reset_s: int) -> dict[str, str]:
    """The IETF draft's RateLimit-* fields (limit per window, remaining, seconds to reset)."""
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(max(remaining, 0)),
        "RateLimit-Reset": str(max(reset_s, 1)),
    }


@dataclass(frozen=True)
class Plan:
    """What one request must pass: its token's rate limit and the budgets it draws on."""

    owner_id: str
    token_id: str
    rate_limit: int | None
    token_rate: bool  # the token's own limit, counted for it alone (else the owner's tier)
    hold: Decimal
    token_budget: Budget | None
    user_budget: Budget | None


@dataclass(frozen=True)
class Admitted:
    """An admitted request: the hold charged against its budgets, to settle when it ends."""

    charged: int  # nano
    headers: dict[str, str]  # RateLimit-* for the response
    spend_keys: tuple[str, ...]  # the budget counters charged (their windows at admission)
    spend_ttls: tuple[int, ...]


def _ttl_ms(period: str, now: datetime) -> tuple[int, int]:
    """(TTL in ms of a counter for `period`'s window, whole seconds until the window ends)."""
    end = window(period, now).end
    seconds = (end - now).total_seconds()
    return int(seconds * 1000) + GRACE_MS, max(1, int(seconds + 0.999))


class Limits:
    def __init__(self, client: HotRedis, tiers: Mapping[str, int], enabled: bool) -> None:
        self._admit = HotScript(client, ADMIT)
        self._settle = HotScript(client, SETTLE)
        self._tiers = tiers
        self._enabled = enabled

    def rate_limit(self, tier: str, own: int | None) -> int | None:
        """Requests per minute for a token (None: unlimited)."""
        if not self._enabled:
            return None
        limit = own if own is not None else self._tiers.get(tier, self._tiers.get("free", 0))
        return limit or None

    async def admit(self, plan: Plan, now: datetime | None = None) -> Admitted:
        """Count the request against its rate limit and charge its hold to its budgets, in
        one script call; raises RateLimited or BudgetExceeded."""
        now = now or datetime.now(UTC)
        owner, token = plan.owner_id, plan.token_id
        rate_ttl, rate_reset = _ttl_ms(RATE_PERIOD, now)
        scope = token if plan.token_rate else None  # a tier counts all the owner's tokens
        keys = [rkeys.rate_counter(owner, scope, window(RATE_PERIOD, now).id)]
        args: list[str | int] = [
            NONE if plan.rate_limit is None else plan.rate_limit,
            rate_ttl,
            nano(plan.hold),
        ]
        resets: list[int] = []
        spend_keys: list[str] = []
        spend_ttls: list[int] = []
        for whose, budget in (("token", plan.token_budget), ("user", plan.user_budget)):
            if budget is None:
                keys.append(rkeys.spend_counter(owner, whose, token, "none"))
                args += [NONE, 0]
                resets.append(0)
                continue
            ttl, reset = _ttl_ms(budget.period, now)
            keys.append(rkeys.spend_counter(owner, whose, token, window(budget.period, now).id))
            args += [nano(budget.amount), ttl]
            resets.append(reset)
            spend_keys.append(keys[-1])
            spend_ttls.append(ttl)
        verdict, used, _spent = await self._admit(keys=keys, args=args)
        if verdict == 1:
            assert plan.rate_limit is not None
            raise RateLimited(plan.rate_limit, rate_reset)
        if verdict in (2, 3):
            budget = plan.token_budget if verdict == 2 else plan.user_budget
            assert budget is not None
            raise BudgetExceeded("token" if verdict == 2 else "user", budget, resets[verdict - 2])
        headers = (
            rate_headers(plan.rate_limit, plan.rate_limit - int(used), rate_reset)
            if plan.rate_limit is not None
            else {}
        )
        charged = nano(plan.hold) if spend_keys else 0
        return Admitted(charged, headers, tuple(spend_keys), tuple(spend_ttls))

    async def settle(self, admitted: Admitted, cost: Decimal) -> None:
        """Correct the budgets charged at admission to the request's real cost: a refund
        when it cost less (or failed), nothing to do when the hold was exact."""
        difference = nano(cost) - admitted.charged
        if admitted.spend_keys and difference:
            await self._settle(keys=admitted.spend_keys, args=[difference, *admitted.spend_ttls])
