"""`/analytics/overview` and `/analytics/usage`: totals, per service and per key, and time
series, read from the hourly rollup `usage_hourly` (never the records themselves) plus each
key's current quota window in Redis (one MGET per request).

Ranges are `[from, to)` in UTC with hourly resolution: `from` is taken back to the start of
its hour (or of its day or month for those series). An ADMIN sees everything; a USER only the
usage they made (`user_id` = them) and only their own keys. A filter that cannot match (a
malformed id, another user's id asked by a USER, a string that is no service slug) answers
like one that matches nothing, so ids cannot be probed. Costs are decimal strings.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from aiohttp import web
from redis.exceptions import RedisError

from admin.auth import authenticated
from gateway.appkeys import POOL, REDIS, SETTINGS
from gateway.db import Connection, Record
from gateway.errors import REDIS_DOWN, BadRequest
from gateway.monitoring import QuotaReading, quota_limit, read_quotas
from gateway.quota import Limit
from gateway.services import SLUG
from gateway.usage import NONE
from gateway.users import User

GRANULARITIES: Final = ("hour", "day", "month")
# The range a series covers when `from` is not given, by granularity.
DEFAULT_SPAN: Final = {
    "hour": timedelta(hours=24),
    "day": timedelta(days=30),
    "month": timedelta(days=365),
}
OVERVIEW_SPAN: Final = timedelta(hours=24)
MAX_POINTS: Final = 1000  # hourly: 41 days; daily: 2.7 years
DEFAULT_TOP_KEYS: Final = 100
MAX_TOP_KEYS: Final = 1000
QUOTA_READ_TIMEOUT_S: Final = 2.0
FILTERS: Final = frozenset({"from", "to", "service", "key", "user"})
OVERVIEW_PARAMS: Final = FILTERS | {"limit"}
USAGE_PARAMS: Final = FILTERS | {"granularity"}
ZERO: Final[dict[str, Any]] = {"requests": 0, "errors": 0, "fallbacks": 0, "cost": Decimal(0)}

# $1 from, $2 to (excluded), then each filter when not null: $3 service, $4 key, $5 user.
WHERE: Final = """hour >= $1 AND hour < $2 AND ($3::text IS NULL OR service = $3)
  AND ($4::uuid IS NULL OR key_id = $4) AND ($5::uuid IS NULL OR user_id = $5)"""
SUMS: Final = """sum(requests)::bigint AS requests, sum(errors)::bigint AS errors,
  sum(fallbacks)::bigint AS fallbacks, sum(cost) AS cost FROM usage_hourly WHERE """
# Per key of each service (the nil key: refused before a key was chosen); the services and
# the totals are added up from these few rows (one aggregate, which PostgreSQL runs parallel).
OVERVIEW: Final = "SELECT service, key_id, " + SUMS + WHERE + " GROUP BY service, key_id"
# Days by date_bin (integer arithmetic: date_trunc in a time zone costs more per row); months
# are summed from the days.
DAYS: Final = (
    "SELECT date_bin('1 day', hour, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS ts, " + SUMS
    + WHERE + " GROUP BY 1"
)  # fmt: skip
MONTHS: Final = """date_trunc('month', ts, 'UTC') AS ts, sum(requests)::bigint AS requests,
  sum(errors)::bigint AS errors, sum(fallbacks)::bigint AS fallbacks, sum(cost) AS cost FROM ("""
SERIES: Final = {
    "hour": "SELECT hour AS ts, " + SUMS + WHERE + " GROUP BY 1 ORDER BY 1",
    "day": DAYS + " ORDER BY 1",
    "month": "SELECT " + MONTHS + DAYS + ") AS days GROUP BY 1 ORDER BY 1",
}
KEYS: Final = """SELECT id, service, tier, name, metadata FROM api_keys
WHERE ($1::uuid IS NULL OR owner_id = $1) AND ($2::text IS NULL OR service = $2)
  AND ($3::uuid IS NULL OR id = $3)"""
# The filters are optional parameters: a plan cached for one combination would serve the others
# badly (a key filter needs the (key_id, hour) index, no filter the hour range).
CUSTOM_PLANS: Final = "SET LOCAL plan_cache_mode = force_custom_plan"


def _bad(name: str, message: str) -> BadRequest:
    return BadRequest(f"{name}: {message}", details={"field": name})


def money(amount: Decimal | None) -> str:
    """A cost as a decimal string without trailing zeros ("12.34", "0")."""
    if not amount:
        return "0"
    return format(amount.normalize(), "f")


def parse_time(name: str, raw: str) -> datetime:
    """An ISO 8601 date or date-time; without an offset it is UTC."""
    for text in (raw, raw.replace(" ", "+")):  # an unencoded `+01:00` arrives as " 01:00"
        try:
            value = datetime.fromisoformat(text)
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            return value.astimezone(UTC)
        except (ValueError, OverflowError):
            continue
    raise _bad(name, "must be an ISO 8601 date or date-time, e.g. 2026-11-26T10:00:00Z")


def bucket_start(ts: datetime, granularity: str) -> datetime:
    """The UTC hour, day or month holding `ts`."""
    ts = ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if granularity == "hour":
        return ts
    ts = ts.replace(hour=0)
    return ts if granularity == "day" else ts.replace(day=1)


def bucket_count(start: datetime, end: datetime, granularity: str) -> int:
    """How many buckets of `granularity` meet [start, end); `start` is a bucket start."""
    if end <= start:
        return 0
    if granularity == "month":
        months = (end.year - start.year) * 12 + end.month - start.month
        return months + (end != bucket_start(end, "month"))
    step = timedelta(hours=1) if granularity == "hour" else timedelta(days=1)
    return -((start - end) // step)


@dataclass(frozen=True)
class Scope:
    """What a request may see and asked for; `nothing` when a filter cannot match."""

    start: datetime
    end: datetime
    service: str | None
    key: uuid.UUID | None
    user: uuid.UUID | None
    owner: uuid.UUID | None  # whose keys: None for an ADMIN
    nothing: bool

    def args(self) -> tuple[object, ...]:
        return (self.start, self.end, self.service, self.key, self.user)


def _id_filter(raw: str | None) -> tuple[uuid.UUID | None, bool]:
    """An id filter and whether it can match at all (a malformed id matches nothing)."""
    if raw is None or raw == "":
        return None, True
    try:
        return uuid.UUID(raw), True
    except ValueError:
        return None, False


def scope_of(request: web.Request, user: User, allowed: frozenset[str], granularity: str) -> Scope:
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise _bad(unknown[0], f"unknown parameter; allowed: {', '.join(sorted(allowed))}")
    query = request.query
    now = datetime.now(UTC)
    end = parse_time("to", query["to"]) if query.get("to") else now
    span = DEFAULT_SPAN[granularity] if "granularity" in allowed else OVERVIEW_SPAN
    try:
        start = parse_time("from", query["from"]) if query.get("from") else end - span
    except OverflowError:
        raise _bad("to", "is too early") from None
    if start > end:
        raise _bad("from", "must not be after `to`")
    return narrowed(
        user, start, end, granularity, query.get("service"), query.get("key"), query.get("user")
    )


def narrowed(
    user: User,
    start: datetime,
    end: datetime,
    granularity: str,
    service: str | None = None,
    key_filter: str | None = None,
    user_filter: str | None = None,
) -> Scope:
    """[start, end) with the filters as given (raw text), narrowed to what `user` may see."""
    service = service or None
    key, key_ok = _id_filter(key_filter)
    asked, user_ok = _id_filter(user_filter)
    me = uuid.UUID(user.id)
    if not user.is_admin:
        user_ok = user_ok and asked in (None, me)  # another user's usage is never shown
        asked = me
    return Scope(
        start=bucket_start(start, granularity),
        end=end,
        service=service,
        key=key,
        user=asked,
        owner=None if user.is_admin else me,
        nothing=not (key_ok and user_ok) or (service is not None and not SLUG.fullmatch(service)),
    )


def _top_keys(request: web.Request) -> int:
    raw = request.query.get("limit") or str(DEFAULT_TOP_KEYS)
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_TOP_KEYS:
        raise _bad("limit", f"must be a whole number from 1 to {MAX_TOP_KEYS}")
    return int(raw)


def _sums(row: Record | None) -> dict[str, Any]:
    if row is None:
        return {"requests": 0, "errors": 0, "fallbacks": 0, "cost": "0"}
    return {
        "requests": row["requests"] or 0,
        "errors": row["errors"] or 0,
        "fallbacks": row["fallbacks"] or 0,
        "cost": money(row["cost"]),
    }


async def _quota_readings(
    app: web.Application, limits: Sequence[tuple[str, Limit]]
) -> tuple[str, list[QuotaReading | None]]:
    """Readings of the keys' current windows, or "unavailable" (all null) if Redis is down:
    the overview still answers from PostgreSQL."""
    try:
        async with asyncio.timeout(QUOTA_READ_TIMEOUT_S):
            readings = await read_quotas(app[REDIS], limits, datetime.now(UTC))
    except (*REDIS_DOWN, RedisError, OSError, TimeoutError):
        return "unavailable", [None] * len(limits)
    return "ok", readings


async def _overview_rows(conn: Connection, scope: Scope) -> tuple[list[Record], list[Record]]:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(CUSTOM_PLANS)
        sums = await conn.fetch(OVERVIEW, *scope.args())
        keys = await conn.fetch(KEYS, scope.owner, scope.service, scope.key)
    return sums, keys


def _key_entries(
    by_key: list[Record], keys: list[Record], default_free_quota: int, admin: bool
) -> tuple[list[dict[str, Any]], list[tuple[str, Limit]]]:
    """One entry per key: the caller's keys (with or without usage in the range) and, for an
    ADMIN, keys deleted since that still have usage."""
    used = {row["key_id"]: row for row in by_key if str(row["key_id"]) != NONE}
    entries: list[dict[str, Any]] = []
    limits: list[tuple[str, Limit]] = []
    for key in keys:
        limit = quota_limit(str(key["id"]), key["tier"], key["metadata"], default_free_quota)
        entry = {"key_id": str(key["id"]), "service": key["service"], "name": key["name"]}
        entry |= {"tier": key["tier"], "deleted": False, **_sums(used.pop(key["id"], None))}
        entry |= {"quota": limit.quota, "period": limit.period if limit.quota is not None else None}
        entries.append(entry)
        limits.append((key["service"], limit))
    if admin:
        for row in used.values():
            entry = {"key_id": str(row["key_id"]), "service": row["service"], "name": None}
            entry |= {"tier": None, "deleted": True, **_sums(row), "quota": None, "period": None}
            entries.append(entry)
            limits.append((row["service"], Limit(entry["key_id"], None, "daily")))
    return entries, limits


def _per_service(rows: list[Record]) -> list[dict[str, Any]]:
    tally: dict[str, dict[str, Any]] = {}
    for row in rows:
        sums = tally.setdefault(row["service"], {"service": row["service"], **ZERO})
        for name in ("requests", "errors", "fallbacks", "cost"):
            sums[name] += row[name] or 0
    return sorted(tally.values(), key=lambda s: (-s["requests"], s["service"]))


def _with_quotas(
    entries: list[dict[str, Any]], readings: list[QuotaReading | None]
) -> list[dict[str, Any]]:
    for entry, reading in zip(entries, readings, strict=True):
        entry["quota_used"] = None if reading is None else reading.used
        entry["quota_left"] = None if reading is None else reading.left
        entry["resets_at"] = None if reading is None else reading.resets_at.isoformat()
    return entries


async def overview_of(app: web.Application, user: User, scope: Scope, top: int) -> dict[str, Any]:
    """The overview's body (also what the console's dashboard shows): totals, per service,
    the `top` keys by requests with their current quota windows."""
    sums: list[Record] = []
    keys: list[Record] = []
    if not scope.nothing:
        async with app[POOL].acquire() as conn:
            sums, keys = await _overview_rows(conn, scope)
    services = _per_service(sums)
    totals = {name: sum((s[name] for s in services), ZERO[name]) for name in ZERO}
    entries, limits = _key_entries(sums, keys, app[SETTINGS].default_free_quota, user.is_admin)
    order = sorted(
        range(len(entries)), key=lambda i: (-entries[i]["requests"], entries[i]["key_id"])
    )
    order = order[:top]
    state, readings = await _quota_readings(app, [limits[i] for i in order])
    for tally in (totals, *services):
        tally["cost"] = money(tally["cost"])
    return {
        "from": scope.start.isoformat(),
        "to": scope.end.isoformat(),
        "totals": totals,
        "by_service": services,
        "by_key": _with_quotas([entries[i] for i in order], readings),
        "quota_state": state,
    }


async def overview(request: web.Request) -> web.Response:
    user = await authenticated(request)
    scope = scope_of(request, user, OVERVIEW_PARAMS, "hour")
    top = _top_keys(request)
    return web.json_response(await overview_of(request.app, user, scope, top))


async def series_rows(app: web.Application, scope: Scope, granularity: str) -> list[Record]:
    """The buckets of `granularity` in the scope that hold usage (`ts`, `requests`, `errors`,
    `fallbacks`, `cost`), in time order; empty buckets are absent."""
    if scope.nothing:
        return []
    async with app[POOL].acquire() as conn, conn.transaction(readonly=True):
        await conn.execute(CUSTOM_PLANS)
        return list(await conn.fetch(SERIES[granularity], *scope.args()))


async def usage(request: web.Request) -> web.Response:
    user = await authenticated(request)
    granularity = request.query.get("granularity") or "hour"
    if granularity not in GRANULARITIES:
        raise _bad("granularity", f"must be one of {', '.join(GRANULARITIES)}")
    scope = scope_of(request, user, USAGE_PARAMS, granularity)
    points = bucket_count(scope.start, scope.end, granularity)
    if points > MAX_POINTS:
        raise _bad(
            "from",
            f"the range holds {points} {granularity} buckets, more than {MAX_POINTS}; "
            "narrow from/to or use a coarser granularity",
        )
    rows = await series_rows(request.app, scope, granularity)
    return web.json_response(
        {
            "granularity": granularity,
            "from": scope.start.isoformat(),
            "to": scope.end.isoformat(),
            "series": [{"ts": row["ts"].astimezone(UTC).isoformat(), **_sums(row)} for row in rows],
        }
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/analytics/overview", overview, name="analytics.overview")
    app.router.add_get("/analytics/usage", usage, name="analytics.usage")
