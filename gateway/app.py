"""The app factories' common base, and the gateway app (port 6789)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from gateway import (
    ca,
    envelope,
    fwdproxy,
    invalidation,
    monitoring,
    proxy,
    resources,
    tasks,
    upstream,
    usage,
    wsrelay,
)
from gateway.appkeys import (
    APP_NAME,
    CALLERS,
    CATALOG,
    COOLDOWNS,
    KEYPOOL,
    LIMITS,
    METRICS,
    POOL,
    PRESSURE,
    QUOTAS,
    REDIS,
    SETTINGS,
    STICKY,
    VAULT,
)
from gateway.ca import AUTHORITIES
from gateway.callers import Callers
from gateway.catalog import Catalog
from gateway.cooldown import Cooldowns, Pressure
from gateway.hotcluster import HotCluster
from gateway.hotredis import HotRedis
from gateway.keypool import KeyPool
from gateway.limits import Limits
from gateway.metrics import Metrics
from gateway.middleware import make_middleware, make_prepare_hook
from gateway.quota import Quotas
from gateway.selection import Stickiness
from gateway.settings import Settings

REQUEST_ID_HEADER: Final = "X-Wallet-Request-Id"
LISTENER_READY_S: Final = 5.0


def base_app(settings: Settings, name: str, request_id_header: str) -> web.Application:
    """What both apps share: middleware, settings, metrics, resources, monitoring routes."""
    app = web.Application(
        middlewares=[make_middleware(request_id_header)], client_max_size=settings.max_body_bytes
    )
    app.on_response_prepare.append(make_prepare_hook(request_id_header))
    app[SETTINGS] = settings
    app[APP_NAME] = name
    app[METRICS] = Metrics(name)
    resources.install(app)
    monitoring.add_routes(app)
    return app


async def caches_ctx(app: web.Application) -> AsyncIterator[None]:
    """The hot path's in-memory state, kept fresh by the invalidation listener."""
    app[CATALOG] = catalog = Catalog(app[POOL])
    app[CALLERS] = callers = Callers(app[POOL])
    app[KEYPOOL] = keypool = KeyPool(app[POOL], app[VAULT], app[SETTINGS].default_free_quota)
    redis_url = app[SETTINGS].redis_url
    assert redis_url is not None, "REDIS_URL is resolved before the app starts"
    hot = (HotCluster if app[SETTINGS].redis_cluster else HotRedis)(redis_url)
    settings = app[SETTINGS]
    app[QUOTAS] = Quotas(hot, settings.quotas_fail_open)
    app[LIMITS] = Limits(hot, settings.rate_limit_tiers, settings.enable_rate_limiting)
    app[COOLDOWNS] = cooldowns = Cooldowns(app[REDIS])
    app[STICKY] = Stickiness()
    app[PRESSURE] = Pressure()
    await catalog.refresh()

    def on_message(kind: str, target_id: str | None) -> None:
        if kind == "cooldown":
            cooldowns.on_message(target_id)
            return
        if kind == "key" and target_id is not None:
            cooldowns.lift(target_id)
        callers.invalidate(kind, target_id)
        keypool.invalidate(kind, target_id)
        if kind == "service":
            catalog.invalidate()
        if kind == "ca" and (authorities := app.get(AUTHORITIES)) is not None:
            tasks.spawn(app, "ca-reload", authorities.reload())

    def on_reset() -> None:
        callers.clear()
        keypool.clear()
        catalog.invalidate()
        # Rests announced while we were not listening (or before this process started).
        tasks.spawn(app, "cooldowns-load", cooldowns.load())
        # A `wallet ca rotate` announced while we were not listening: load the CA again
        # (not yet there on the first subscription: authorities_ctx runs after this one).
        authorities = app.get(AUTHORITIES)
        if authorities is not None:
            tasks.spawn(app, "ca-reload", authorities.reload())

    tasks.spawn(app, "catalog-refresh", catalog.keep_fresh())
    tasks.spawn(app, "keypool-refresh", keypool.keep_fresh())
    ready = asyncio.Event()
    listener = invalidation.listen(app[REDIS], on_message, on_reset, ready)
    tasks.spawn(app, "invalidation-listener", listener)
    # Serve only once subscribed, so no change is missed; a Redis outage must not block startup.
    try:
        async with asyncio.timeout(LISTENER_READY_S):
            await ready.wait()
    except TimeoutError:
        pass
    yield
    await hot.close()


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings, "gateway", REQUEST_ID_HEADER)
    app.cleanup_ctx.extend(
        (
            tasks.tasks_ctx,
            upstream.session_ctx,
            wsrelay.session_ctx,
            caches_ctx,
            ca.authorities_ctx,
            usage.usage_ctx,
        )
    )
    app.middlewares.append(fwdproxy.divert)  # forward-proxy connections skip the routes
    app.router.add_post("/proxy", envelope.handle, name="proxy.envelope")
    app.router.add_route("*", "/{service}", proxy.reverse, name="proxy.service")
    app.router.add_route("*", "/{service}/{path:.*}", proxy.reverse, name="proxy.reverse")
    return app
