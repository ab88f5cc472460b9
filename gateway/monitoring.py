"""`/monitoring/health` and `/monitoring/metrics`, served by both apps, and the per-key quota
readings (current window, from Redis) that the gateway's metrics and the admin analytics show."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import aiohttp
import asyncpg
import structlog
from aiohttp import web
from aioprometheus.renderer import render
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway import rkeys
from gateway.appkeys import APP_NAME, METRICS, POOL, REDIS, SETTINGS, SIBLINGS, VAULT
from gateway.db import DB_ERRORS
from gateway.errors import REDIS_DOWN, NotFound
from gateway.keys import PERIODS
from gateway.metrics import merge_exposition
from gateway.quota import Limit, window
from gateway.selection import DEFAULT_PERIOD, quota_of
from gateway.usage import USAGE

log = structlog.get_logger(__name__)

CHECK_TIMEOUT_S: Final = 2.0
TEXT_FORMAT: Final = "text/plain"
WORKER_SCOPE: Final = "worker"  # `?scope=worker`: this process only
USABLE_KEYS: Final = """SELECT id, service, tier, metadata FROM api_keys
WHERE enabled AND status = 'active' ORDER BY service, id"""


async def _check_postgres(app: web.Application) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await app[POOL].fetchval("SELECT 1")
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"down ({type(exc).__name__})"
    return "ok"


async def _check_redis(app: web.Application) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            await app[REDIS].ping()
    except (*REDIS_DOWN, OSError, TimeoutError, RedisError) as exc:
        return f"down ({type(exc).__name__})"
    return "ok"


async def health(request: web.Request) -> web.Response:
    app = request.app
    postgres, redis = await asyncio.gather(_check_postgres(app), _check_redis(app))
    vault = "ok" if app[VAULT].unsealed else "sealed"
    app[METRICS].vault_sealed.set({}, 0 if vault == "ok" else 1)
    checks = {"postgres": postgres, "redis": redis, "vault": vault}
    healthy = all(v == "ok" for v in checks.values())
    return web.json_response(
        {"status": "ok" if healthy else "degraded", "checks": checks},
        status=200 if healthy else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    """This process's metrics; under `--workers N`, merged with every sibling's, so a scrape
    of the shared port sees the whole gateway whichever worker answers it."""
    app = request.app
    if not app[SETTINGS].enable_metrics:
        raise NotFound("metrics are disabled (ENABLE_METRICS=false)")
    registry = app[METRICS]
    registry.vault_sealed.set({}, 0 if app[VAULT].unsealed else 1)
    registry.in_flight.set({}, registry.in_flight_now)
    if (writer := app.get(USAGE)) is not None:
        registry.usage_buffered.set({}, writer.buffered)
        registry.usage_dropped.set({}, writer.dropped)
    siblings = app.get(SIBLINGS, ())
    worker_only = request.query.get("scope") == WORKER_SCOPE
    # Quota gauges are read from Redis, the same in every process: only the process answering
    # the scrape adds them, after the merge, so `--workers N` never sums them N times.
    quotas = "" if worker_only or app[APP_NAME] != "gateway" else await _quota_gauges(app)
    if not siblings or worker_only:
        body, headers = render(registry.registry, request.headers.getall("Accept", []))
        return web.Response(body=body + quotas.encode(), headers=headers)
    own, _ = render(registry.registry, [TEXT_FORMAT])
    others = await asyncio.gather(*(_sibling_metrics(path) for path in siblings))
    texts = [own.decode(), *(text for text in others if text is not None)]
    merged = merge_exposition(texts) + _workers_family(len(texts), len(siblings) + 1) + quotas
    return web.Response(
        text=merged,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Wallet-Workers": f"{len(texts)}/{len(siblings) + 1}"},
    )


async def _sibling_metrics(path: Path) -> str | None:
    """One sibling worker's own metrics over its local socket; None if it does not answer
    (restarting, or gone), which the merged output reports."""
    try:
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(path)),
                timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S),
            ) as session,
            session.get(
                f"http://worker/monitoring/metrics?scope={WORKER_SCOPE}",
                headers={"Accept": TEXT_FORMAT},
            ) as response,
        ):
            if response.status != 200:
                return None
            return await response.text()
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None


def _workers_family(reporting: int, expected: int) -> str:
    return (
        "# HELP wallet_gateway_workers Gateway worker processes, expected and reporting\n"
        "# TYPE wallet_gateway_workers gauge\n"
        f'wallet_gateway_workers{{app="gateway",state="expected"}} {expected}\n'
        f'wallet_gateway_workers{{app="gateway",state="reporting"}} {reporting}\n'
    )


def quota_limit(key_id: str, tier: str, metadata: object, default_free_quota: int) -> Limit:
    """A stored key's quota and period, read as the gateway's key pool reads them."""
    meta = metadata if isinstance(metadata, dict) else {}
    period = str(meta.get("quotaPeriod") or DEFAULT_PERIOD).lower()
    return Limit(key_id, quota_of(tier, meta, default_free_quota), PERIODS.get(period, period))


@dataclass(frozen=True)
class QuotaReading:
    used: int
    left: int
    resets_at: datetime


async def read_quotas(
    redis: Redis | RedisCluster, limits: Sequence[tuple[str, Limit]], now: datetime
) -> list[QuotaReading | None]:
    """The current window of each (service, limit), one MGET per service (a service's
    counters share a hash tag, so this works on Redis Cluster too, in one pipeline); None for
    a key without a quota (or with a period the gateway does not know)."""
    by_service: dict[str, list[tuple[int, str, int, datetime]]] = {}
    for i, (service, limit) in enumerate(limits):
        if limit.quota is None or limit.period not in PERIODS.values():
            continue
        w = window(limit.period, now)
        name = rkeys.quota_counter(service, limit.key_id, w.id)
        by_service.setdefault(service, []).append((i, name, limit.quota, w.end))
    readings: list[QuotaReading | None] = [None] * len(limits)
    if by_service:
        async with redis.pipeline(transaction=False) as pipe:
            for wanted in by_service.values():
                # Not pipe.mget: redis-py's cluster pipeline refuses it (its keys could span
                # slots); these share one, and the raw command is routed by it.
                pipe.execute_command("MGET", *(name for _, name, _, _ in wanted))
            replies = await pipe.execute()
        for wanted, counts in zip(by_service.values(), replies, strict=True):
            for (i, _, quota, end), count in zip(wanted, counts, strict=True):
                used = int(count or 0)
                readings[i] = QuotaReading(used, max(quota - used, 0), end)
    return readings


async def _quota_gauges(app: web.Application) -> str:
    """`wallet_key_quota_used` / `_remaining` for each usable key with a quota; nothing when
    PostgreSQL or Redis does not answer in time."""
    default = app[SETTINGS].default_free_quota
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            rows = await app[POOL].fetch(USABLE_KEYS)
            limits = [
                (r["service"], quota_limit(str(r["id"]), r["tier"], r["metadata"], default))
                for r in rows
            ]
            readings = await read_quotas(app[REDIS], limits, datetime.now(UTC))
    except (*DB_ERRORS, asyncpg.PostgresError, *REDIS_DOWN, RedisError) as exc:
        log.warning("quota_gauges_unavailable", error=type(exc).__name__)
        return ""
    used, left = [], []
    for (service, limit), reading in zip(limits, readings, strict=True):
        if reading is not None:  # slugs and uuids: nothing to escape in a label value
            labels = f'{{app="gateway",service="{service}",key_id="{limit.key_id}"}}'
            used.append(f"wallet_key_quota_used{labels} {reading.used}\n")
            left.append(f"wallet_key_quota_remaining{labels} {reading.left}\n")
    return (
        "# HELP wallet_key_quota_used Requests counted against a key's quota in its current "
        "window\n# TYPE wallet_key_quota_used gauge\n" + "".join(used) + "# HELP "
        "wallet_key_quota_remaining Requests left in a key's current quota window\n"
        "# TYPE wallet_key_quota_remaining gauge\n" + "".join(left)
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/monitoring/health", health, name="health")
    app.router.add_get("/monitoring/metrics", metrics, name="metrics")
