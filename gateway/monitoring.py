"""`/monitoring/health` and `/monitoring/metrics`, served by both apps."""

from __future__ import annotations

import asyncio
from typing import Final

import asyncpg
from aiohttp import web
from aioprometheus.renderer import render
from redis.exceptions import RedisError

from gateway.appkeys import METRICS, POOL, REDIS, SETTINGS, VAULT
from gateway.errors import NotFound

CHECK_TIMEOUT_S: Final = 2.0


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
    if not request.app[SETTINGS].enable_metrics:
        raise NotFound("metrics are disabled (ENABLE_METRICS=false)")
    registry = request.app[METRICS]
    registry.vault_sealed.set({}, 0 if request.app[VAULT].unsealed else 1)
    body, headers = render(registry.registry, request.headers.getall("Accept", []))
    return web.Response(body=body, headers=headers)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/monitoring/health", health, name="health")
    app.router.add_get("/monitoring/metrics", metrics, name="metrics")
