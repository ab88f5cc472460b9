"""The gateway app factory (port 6789). This issue's gateway serves health and metrics;
the proxy pipeline lands on top of the same resources."""

from __future__ import annotations

from aiohttp import web

from gateway import monitoring, resources
from gateway.appkeys import APP_NAME, METRICS, SETTINGS
from gateway.metrics import Metrics
from gateway.middleware import make_middleware
from gateway.settings import Settings

REQUEST_ID_HEADER = "X-Wallet-Request-Id"


def create_app(settings: Settings) -> web.Application:
    app = web.Application(
        middlewares=[make_middleware(REQUEST_ID_HEADER)], client_max_size=settings.max_body_bytes
    )
    app[SETTINGS] = settings
    app[APP_NAME] = "gateway"
    app[METRICS] = Metrics("gateway")
    resources.install(app)
    monitoring.add_routes(app)
    return app
