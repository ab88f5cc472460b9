"""The admin app factory (port 6790): JSON API, auth, OpenAPI, health and metrics."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from admin import (
    analytics_api,
    audit_api,
    auth,
    console,
    keys_api,
    openapi,
    services_api,
    tokens_api,
    users_api,
)
from gateway.app import base_app
from gateway.settings import Settings

REQUEST_ID_HEADER: Final = "X-Request-Id"


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings, "admin", REQUEST_ID_HEADER)
    app.router.add_post("/auth/login", auth.login, name="auth.login")
    app.router.add_get("/openapi.json", openapi.serve, name="openapi")
    for module in (keys_api, services_api, tokens_api, users_api, audit_api, analytics_api):
        module.add_routes(app)
    console.setup(app)
    return app
