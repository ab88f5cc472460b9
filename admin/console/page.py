"""What every console page handler uses: the signed-in user, rendering, redirects with a
notice, and validation errors placed next to their field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import aiohttp_jinja2
from aiohttp import web
from yarl import URL

from admin import auth
from admin.console import session
from gateway.errors import Forbidden, ValidationFailed, WalletError
from gateway.users import User

PREFIX: Final = "/ui"
CONSOLE_USER: Final = web.RequestKey("console_user", User)


async def user(request: web.Request) -> User:
    """The signed-in user, checked against the database now (as the API does per call)."""
    if CONSOLE_USER in request:
        return request[CONSOLE_USER]
    current = session.require(request)
    found = await auth.current_user(request, current.user_id, current.created)
    request[CONSOLE_USER] = found
    return found


async def admin(request: web.Request) -> User:
    found = await user(request)
    if not found.is_admin:
        raise Forbidden("this page needs the ADMIN role")
    return found


def render(
    request: web.Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status: int = 200,
) -> web.Response:
    """A page; with `status` 422 when it shows a form again with its errors. Every page also
    gets `me` (the signed-in user or None), `csrf` (its forms' token), `notice` and `path`.
    (Not aiohttp-jinja2's context processors: they store state under a plain string key.)"""
    shared = {
        "me": request.get(CONSOLE_USER),
        "csrf": session.csrf_token(request),
        "notice": session.notice(request),
        "path": request.path,
    }
    return aiohttp_jinja2.render_template(
        template, request, {**shared, **(context or {})}, status=status
    )


def redirect(location: str, notice: str | None = None) -> web.Response:
    """A 303 to return after a successful form, with a one-line notice for the next page.
    (A returned response, not a raised `HTTPSeeOther`: cookies set on it are kept, and
    aiohttp deprecates returning exceptions.)"""
    url = URL(location)
    if notice:
        url = url.update_query(notice=notice)
    return web.Response(status=303, headers={"Location": str(url)})


def form_text(form: Mapping[str, Any], name: str) -> str:
    """A form field's text ("" when absent, or a file upload where text belongs)."""
    value = form.get(name)
    return value if isinstance(value, str) else ""


def form_number(raw: str) -> object:
    """An integer from a form field; the text itself when it is not one, for the API's own
    check to name the problem."""
    try:
        return int(raw.strip())
    except ValueError:
        return raw


def field_errors(exc: WalletError) -> dict[str, str]:
    """An error as `{field: message}`, to show next to that field (`form` when it names
    none)."""
    if isinstance(exc, ValidationFailed):
        field = str(exc.details.get("field", "form"))
        return {field: exc.message.removeprefix(f"{field}: ")}
    return {"form": exc.message}
