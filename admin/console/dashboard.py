"""The console's dashboard at `/ui/`: requests, errors, fallbacks and cost over a period (as
the analytics API computes them, from the hourly rollup), quota used and left per key, the
keys not serving now, the latest proxied requests, and the audit chain's state.

Numbers come from the same functions as `/analytics/overview` and `/analytics/usage`; the
latest requests are read from `usage_records` itself (the gateway writes them, with the
rollup, in batches about once a second). A USER sees their own keys and the usage they made;
an ADMIN sees everything, and the audit chain (verified on demand: `?verify=1`, since a
verification reads every record).

Which keys rest after an upstream refused them is known only to the gateways (in memory, told
to each other over the invalidation channel): the admin app listens on that channel too, so
the dashboard lists the rests announced since this process started.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from aiohttp import web

from admin.analytics_api import (
    CUSTOM_PLANS,
    MAX_TOP_KEYS,
    bucket_count,
    money,
    narrowed,
    overview_of,
    series_rows,
)
from admin.auth import owner_scope
from admin.console import charts, page
from gateway import audit, invalidation, tasks
from gateway.appkeys import POOL, REDIS
from gateway.cooldown import Cooldowns
from gateway.db import Record
from gateway.errors import BadRequest
from gateway.services import list_services
from gateway.usage import ERROR_STATUS
from gateway.users import User


@dataclass(frozen=True)
class Period:
    title: str
    span: timedelta
    granularity: str  # of the charts: "hour" or "day"
    label_format: str  # strftime of a bucket's label (UTC)


PERIODS: Final = {
    "24h": Period("Last 24 hours", timedelta(hours=24), "hour", "%H:%M"),
    "7d": Period("Last 7 days", timedelta(days=7), "hour", "%a %H:%M"),
    "30d": Period("Last 30 days", timedelta(days=30), "day", "%b %d"),
}
DEFAULT_PERIOD: Final = "24h"
STEP: Final = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
RECENT_ROWS: Final = 20
TOP_KEYS_SHOWN: Final = 25
CHARTED_KEYS: Final = 10
HALF_WIDTH: Final = 520  # the by-service charts sit side by side
NOT_SERVING_SHOWN: Final = 100
MAX_SERVICES: Final = 1000

# The latest requests in the period: a USER's own (their name on a key only if it is theirs).
RECENT: Final = """SELECT r.at, r.service, r.key_id, k.name AS key_name, r.status, r.latency_ms,
  r.cost, r.fallbacks
FROM usage_records r
LEFT JOIN api_keys k ON k.id = r.key_id AND ($1::uuid IS NULL OR k.owner_id = $1)
WHERE r.at >= $2 AND ($1::uuid IS NULL OR r.user_id = $1) AND ($3::text IS NULL OR r.service = $3)
ORDER BY r.at DESC, r.id DESC LIMIT $4"""
# Keys taken out of service: marked invalid by the gateway, set aside by an admin, or disabled.
NOT_SERVING: Final = """SELECT id, service, name, status, enabled, updated_at FROM api_keys
WHERE ($1::uuid IS NULL OR owner_id = $1) AND ($2::text IS NULL OR service = $2)
  AND (status <> 'active' OR NOT enabled)
ORDER BY updated_at DESC LIMIT $3"""
STATUS_REASONS: Final = {
    "invalid": "the upstream rejected it as invalid; set it back to active once fixed",
    "cooldown": "set to cooldown",
    "exhausted": "set to exhausted",
}

RESTING: Final = web.AppKey("console_resting", Cooldowns)
RESTING_READY: Final = web.AppKey("console_resting_ready", asyncio.Event)


async def resting_ctx(app: web.Application) -> AsyncIterator[None]:
    """Follow the gateways' key rests (and their end when an admin changes a key) on the
    invalidation channel, as each gateway process does. Startup does not wait for the
    subscription (`RESTING_READY` says when it is in place)."""
    app[RESTING] = resting = Cooldowns(app[REDIS])
    app[RESTING_READY] = ready = asyncio.Event()

    def on_message(kind: str, target: str | None) -> None:
        if kind == "cooldown":
            resting.on_message(target)
        elif kind == "key" and target is not None:
            resting.lift(target)

    def on_reset() -> None:
        """(Re)subscribed: the rests announced while not listening, from Redis."""
        tasks.spawn(app, "console-rests-load", resting.load())

    tasks.spawn(
        app, "console-rest-listener", invalidation.listen(app[REDIS], on_message, on_reset, ready)
    )
    yield


def _when(at: datetime) -> dict[str, str]:
    at = at.astimezone(UTC)
    return {"iso": at.isoformat(), "text": at.strftime("%Y-%m-%d %H:%M:%S UTC")}


def _period(request: web.Request) -> str:
    name = request.query.get("range") or DEFAULT_PERIOD
    if name not in PERIODS:
        raise BadRequest(f"range: must be one of {', '.join(PERIODS)}", details={"field": "range"})
    return name


def series_table(
    rows: Sequence[Record], start: datetime, end: datetime, period: Period
) -> list[dict[str, Any]]:
    """One entry per bucket of [start, end), zero where the rollup has no row."""
    found = {row["ts"].astimezone(UTC): row for row in rows}
    step = STEP[period.granularity]
    table = []
    for i in range(bucket_count(start, end, period.granularity)):
        ts = start + i * step
        row = found.get(ts)
        table.append(
            {
                "label": ts.strftime(period.label_format),
                "at": _when(ts),
                "requests": row["requests"] if row else 0,
                "errors": row["errors"] if row else 0,
                "fallbacks": row["fallbacks"] if row else 0,
                "cost": Decimal(row["cost"] or 0) if row else Decimal(0),
                "cost_text": money(row["cost"]) if row else "0",
            }
        )
    return table


def _charts(
    series: list[dict[str, Any]], services: list[dict[str, Any]], keys: list[dict[str, Any]]
) -> dict[str, Any]:
    if not any(point["requests"] for point in series):
        series = []  # said as "no data", not drawn as flat lines
    labels = [point["label"] for point in series]
    lines = [
        charts.Series(name, [p[name] for p in series], colour)
        for name, colour in zip(("requests", "errors", "fallbacks"), charts.PALETTE, strict=False)
    ]
    cost = [charts.Series("cost", [p["cost"] for p in series], charts.PALETTE[3])]
    busy = [(k["name"], k["requests"]) for k in keys[:CHARTED_KEYS] if k["requests"]]
    return {
        "traffic": charts.line_chart(
            "chart-traffic", "Requests, errors and fallbacks (UTC)", labels, lines
        ),
        "cost": charts.line_chart("chart-cost", "Cost (UTC)", labels, cost)
        if any(point["cost"] for point in series)
        else None,
        "service_requests": charts.bar_chart(
            "chart-service-requests",
            "Requests by service",
            [(s["service"], s["requests"]) for s in services],
            width=HALF_WIDTH,
        ),
        "service_cost": charts.bar_chart(
            "chart-service-cost",
            "Cost by service",
            [(s["service"], Decimal(s["cost"])) for s in services],
            colour=charts.PALETTE[3],
            width=HALF_WIDTH,
        ),
        "key_requests": charts.bar_chart("chart-key-requests", "Requests by key", busy)
        if busy
        else None,
    }


def _key_name(entry: dict[str, Any]) -> str:
    return entry["name"] if entry["name"] is not None else f"(deleted key {entry['key_id'][:8]})"


def quotas(by_key: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The keys with a quota, the fullest first."""
    rows = [
        {
            "name": _key_name(k),
            "service": k["service"],
            "quota": k["quota"],
            "period": k["period"],
            "used": k["quota_used"],
            "left": k["quota_left"],
            "resets_at": _when(datetime.fromisoformat(k["resets_at"])) if k["resets_at"] else None,
        }
        for k in by_key
        if k["quota"] is not None
    ]
    return sorted(rows, key=lambda r: (-(r["used"] or 0) / max(r["quota"], 1), r["name"]))


def not_serving(
    stored: Sequence[Record], by_key: list[dict[str, Any]], resting: Cooldowns, now: float
) -> list[dict[str, Any]]:
    """Keys that will not serve a request now, why, and until when (None: until changed)."""
    rows = []
    for key in stored:
        reason = (
            STATUS_REASONS.get(key["status"], key["status"]) if key["status"] != "active" else ""
        )
        if not key["enabled"]:
            reason = f"disabled; {reason}" if reason else "disabled"
        rows.append(
            {"name": key["name"], "service": key["service"], "reason": reason, "until": None}
        )
    for entry in by_key:
        if entry["deleted"]:
            continue
        rest = resting.resting(entry["key_id"], now)
        if rest:
            until = datetime.fromtimestamp(now + rest, UTC)
            rows.append(_cooling(entry, "resting: its upstream refused it (rate or quota)", until))
        if entry["quota_left"] == 0 and entry["resets_at"]:
            until = datetime.fromisoformat(entry["resets_at"])
            rows.append(
                _cooling(entry, f"quota of {entry['quota']} per {entry['period']} used up", until)
            )
    return rows


def _cooling(entry: dict[str, Any], reason: str, until: datetime) -> dict[str, Any]:
    return {
        "name": _key_name(entry),
        "service": entry["service"],
        "reason": reason,
        "until": _when(until),
    }


def _recent_key(row: Record) -> str:
    if row["key_id"] is None:
        return "—"  # refused before a key was chosen
    return row["key_name"] if row["key_name"] is not None else "(deleted key)"


def recent_rows(rows: Sequence[Record]) -> list[dict[str, Any]]:
    return [
        {
            "at": _when(r["at"]),
            "service": r["service"],
            "key": _recent_key(r),
            "status": r["status"],
            "ok": r["status"] < ERROR_STATUS,
            "latency_ms": f"{r['latency_ms']:.0f}",
            "cost": money(r["cost"]),
            "fallbacks": r["fallbacks"],
        }
        for r in rows
    ]


async def _audit_state(request: web.Request, user: User) -> dict[str, Any] | None:
    """The chain's head for an ADMIN (None for a USER), verified only when asked."""
    if not user.is_admin:
        return None
    async with request.app[POOL].acquire() as conn:
        head = await conn.fetchrow(audit.LAST)
        verdict = await audit.verify(conn) if request.query.get("verify") == "1" else None
    return {
        "entries": head["seq"] if head else 0,
        "last": _when(head["at"]) if head else None,
        "verdict": verdict,
    }


async def _stored(
    request: web.Request, user: User, service: str | None, since: datetime
) -> dict[str, Any]:
    owner = owner_scope(user)
    async with request.app[POOL].acquire() as conn:
        async with conn.transaction(readonly=True):
            await conn.execute(CUSTOM_PLANS)
            recent = await conn.fetch(RECENT, owner, since, service, RECENT_ROWS)
            stored = await conn.fetch(NOT_SERVING, owner, service, NOT_SERVING_SHOWN)
        known, _ = await list_services(conn, MAX_SERVICES, 0)
    return {"recent": recent, "stored": stored, "services": [s.slug for s in known]}


async def show(request: web.Request) -> web.Response:
    user = await page.user(request)
    name = _period(request)
    period = PERIODS[name]
    now = datetime.now(UTC)
    service = request.query.get("service") or None
    scope = narrowed(user, now - period.span, now, period.granularity, service)
    overview = await overview_of(request.app, user, scope, MAX_TOP_KEYS)
    rows = await series_rows(request.app, scope, period.granularity)
    series = series_table(rows, scope.start, scope.end, period)
    stored = await _stored(request, user, None if scope.nothing else service, scope.start)
    if scope.nothing:  # a service filter that is no slug: nothing, like the API
        stored["recent"], stored["stored"] = [], []
    by_key = overview["by_key"]
    top_keys = [{**k, "name": _key_name(k)} for k in by_key[:TOP_KEYS_SHOWN]]
    context = {
        "range": name,
        "ranges": [(key, p.title) for key, p in PERIODS.items()],
        "service": service or "",
        "services": stored["services"],
        "totals": overview["totals"],
        "by_service": overview["by_service"],
        "by_key": top_keys,
        "more_keys": max(len(by_key) - TOP_KEYS_SHOWN, 0),
        "quota_state": overview["quota_state"],
        "quotas": quotas(by_key),
        "cooling": not_serving(stored["stored"], by_key, request.app[RESTING], now.timestamp()),
        "recent": recent_rows(stored["recent"]),
        "series": series,
        "charts": _charts(series, overview["by_service"], top_keys),
        "audit": await _audit_state(request, user),
        "generated": _when(now),
    }
    return page.render(request, "dashboard.html", context)


def add_routes(app: web.Application) -> None:
    app.router.add_get(f"{page.PREFIX}/", show, name="ui.dashboard")
