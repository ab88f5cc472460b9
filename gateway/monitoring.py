"""`/monitoring/health` and `/monitoring/metrics`, served by both apps."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Final

import aiohttp
import asyncpg
from aiohttp import web
from aioprometheus.renderer import render
from redis.exceptions import RedisError

from gateway.appkeys import METRICS, POOL, REDIS, SETTINGS, SIBLINGS, VAULT
from gateway.errors import NotFound
from gateway.metrics import merge_exposition
from gateway.usage import USAGE

CHECK_TIMEOUT_S: Final = 2.0
TEXT_FORMAT: Final = "text/plain"
WORKER_SCOPE: Final = "worker"  # `?scope=worker`: this process only


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
    except (OSError, TimeoutError, RedisError) as exc:
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
    if not siblings or request.query.get("scope") == WORKER_SCOPE:
        body, headers = render(registry.registry, request.headers.getall("Accept", []))
        return web.Response(body=body, headers=headers)
    own, _ = render(registry.registry, [TEXT_FORMAT])
    others = await asyncio.gather(*(_sibling_metrics(path) for path in siblings))
    texts = [own.decode(), *(text for text in others if text is not None)]
    merged = merge_exposition(texts) + _workers_family(len(texts), len(siblings) + 1)
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


def add_routes(app: web.Application) -> None:
    app.router.add_get("/monitoring/health", health, name="health")
    app.router.add_get("/monitoring/metrics", metrics, name="metrics")
