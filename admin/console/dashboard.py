"""The console's dashboard at `/ui/` (being built)."""

from __future__ import annotations

from aiohttp import web

from admin.console import page


async def show(request: web.Request) -> web.Response:
    await page.user(request)
    return page.render(request, "dashboard.html")


def add_routes(app: web.Application) -> None:
    app.router.add_get(f"{page.PREFIX}/", show, name="ui.dashboard")
