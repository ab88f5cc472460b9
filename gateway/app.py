"""The app factories' common base, and the gateway app (port 6789).

This release's gateway serves health and metrics; the proxy pipeline lands on top of the
same resources."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from gateway import monitoring, resources
from gateway.appkeys import APP_NAME, METRICS, SETTINGS
from gateway.metrics import Metrics
from gateway.middleware import make_middleware
from gateway.settings import Settings

REQUEST_ID_HEADER: Final = "X-Wallet-Request-Id"


def base_app(settings: Settings, name: str, request_id_header: str) -> web.Application:
    """What both apps share: middleware, settings, metrics, resources, monitoring routes."""
    app = web.Application(
        middlewares=[make_middleware(request_id_header)], client_max_size=settings.max_body_bytes
    )
    app[SETTINGS] = settings
    app[APP_NAME] = name
    app[METRICS] = Metrics(name)
    resources.install(app)
    monitoring.add_routes(app)
    return app


def create_app(settings: Settings) -> web.Application:
    return base_app(settings, "gateway", REQUEST_ID_HEADER)
