"""The web console at `/ui/`: server-rendered pages (aiohttp-jinja2) over the admin API's own
service functions, with cookie sessions, CSRF on every form, and HTML error pages.

Pages live in one module per noun (`dashboard`, `keys`, `services`, `tokens`, `users`,
`audit`), on the helpers of `page`; this module wires them up and owns what every page
shares: the session, the CSRF check on every POST, security headers, login and logout, and
errors rendered as pages instead of JSON.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import aiohttp_jinja2
import jinja2
from aiohttp import web
from yarl import URL

from admin import auth
from admin.console import audit, dashboard, keys, page, services, session, tokens, users
from admin.console.page import PREFIX, render
from gateway import tasks
from gateway.appkeys import ERROR_PAGE
from gateway.errors import Forbidden, Unauthenticated, ValidationFailed

HERE: Final = Path(__file__).parent
LOGIN: Final = f"{PREFIX}/login"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# Pages load only their own CSS, scripts and images: no inline script can run, so markup
# that slipped past escaping could not act either.
HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    # Unlike the API's no-referrer: browsers then send a real Origin with same-origin forms.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if not path.startswith(PREFIX + "/") or path.startswith(PREFIX + "/static/"):
        return await handler(request)
    try:
        await session.load(request)
        if request.method not in SAFE_METHODS:
            if path == LOGIN:
                refused = await _refused_login(request)
                if refused is not None:
                    return refused
            elif session.SESSION_KEY not in request:
                # Not a forgery to report: the session ended (idle, signed out elsewhere)
                # while the form was open. Nothing can act without one anyway.
                raise Unauthenticated("your session ended, so that was not saved; sign in again")
            else:
                await session.check_csrf(request)
        response = await handler(request)
    except Unauthenticated as exc:
        # A session whose user may no longer act (disabled, deleted, password changed) ends
        # here: kept, it would bounce between the login form and the page forever.
        response = _to_login(request, exc.message)
        await session.end(request, response)
    except web.HTTPException as exc:
        if exc.status < 400:
            _secure_headers(exc)
        raise  # errors: rendered by the app's middleware, as pages (see error_page)
    # Other errors, the database or Redis being down included, go on to the app's middleware
    # too, which counts and logs them and asks `error_page` for the answer.
    session.seal_notice(request, response)
    _secure_headers(response)
    return response


def _secure_headers(response: web.StreamResponse) -> None:
    for name, value in HEADERS.items():
        response.headers[name] = value


async def _refused_login(request: web.Request) -> web.Response | None:
    """The sign-in form again when its CSRF check fails (None when it passes): a form left
    open past its login cookie's hour is the usual cause, not a forgery."""
    try:
        await session.check_csrf(request)
    except Forbidden:
        form = await request.post()
        username = form.get("username")
        context = {
            "next": _safe_next(form.get("next")),
            "error": "This sign-in form expired; sign in again.",
            "username": username if isinstance(username, str) else "",
        }
        response = _login_page(request, context, 403)
        _secure_headers(response)
        return response
    return None


def _to_login(request: web.Request, message: str) -> web.Response:
    """To the sign-in form, then back: to this page, or for a form, to the page it was on."""
    back = request.path_qs
    if request.method not in SAFE_METHODS:
        referer = URL(request.headers.get("Referer", ""))
        same_site = referer.host is None or referer.host_port_subcomponent == request.host
        back = referer.path_qs if same_site and referer.path.startswith(PREFIX + "/") else ""
    target = URL(LOGIN).with_query(next=_safe_next(back))
    return page.redirect(str(target), message)


def error_page(
    request: web.Request, status: int, message: str, request_id: str
) -> web.Response | None:
    """Errors on console paths as an HTML page with the right status (the JSON shape
    everywhere else)."""
    if not request.path.startswith(PREFIX + "/"):
        return None
    context = {"status": status, "message": message, "request_id": request_id}
    response = render(request, "error.html", context, status=status)
    _secure_headers(response)
    return response


def _safe_next(raw: object) -> str:
    """Only a console path: a `next` naming another site would make login an open redirect."""
    if (
        isinstance(raw, str)
        and raw.startswith(PREFIX + "/")
        and "\\" not in raw
        and URL(raw).host is None
    ):
        return raw
    return f"{PREFIX}/"


def _login_page(request: web.Request, context: dict[str, Any], status: int = 200) -> web.Response:
    nonce = session.login_nonce(request)
    context = {**context, "login_csrf": session.csrf_token(request, nonce)}
    response = render(request, "login.html", context, status=status)
    session.keep_login_nonce(request, response, nonce)
    return response


async def login_form(request: web.Request) -> web.Response:
    target = _safe_next(request.query.get("next"))
    error = ""
    if session.SESSION_KEY in request:
        try:
            await page.user(request)
        except Unauthenticated as exc:  # the user may no longer act: that session ends
            error = exc.message
        else:
            return page.redirect(target)
    response = _login_page(request, {"next": target, "error": error, "username": ""})
    if error:
        await session.end(request, response)
    return response


async def login(request: web.Request) -> web.Response:
    form = await request.post()
    username, password = form.get("username"), form.get("password")
    target = _safe_next(form.get("next"))
    try:
        name, secret = auth.validate_credentials(username, password)
        account = await auth.verify_login(request, name, secret)
    except (ValidationFailed, Unauthenticated) as exc:
        context = {
            "next": target,
            "error": page.field_errors(exc).popitem()[1],
            "username": username if isinstance(username, str) else "",
        }
        return _login_page(request, context, 422 if isinstance(exc, ValidationFailed) else 401)
    response = page.redirect(target)
    await session.start(request, response, account.id)
    return response


async def logout(request: web.Request) -> web.Response:
    response = page.redirect(f"{PREFIX}/login", "Signed out.")
    await session.end(request, response)
    return response


def setup(app: web.Application) -> None:
    """Templates, the console middleware, static files and every page's routes."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
    )
    app.middlewares.append(middleware)
    app[ERROR_PAGE] = error_page
    app.router.add_get(f"{PREFIX}/login", login_form, name="ui.login")
    app.router.add_post(f"{PREFIX}/login", login, name="ui.login.submit")
    app.router.add_post(f"{PREFIX}/logout", logout, name="ui.logout")
    app.router.add_static(f"{PREFIX}/static", HERE / "static", name="ui.static")
    for module in (dashboard, keys, services, tokens, users, audit):
        module.add_routes(app)
    # The dashboard lists keys resting after an upstream refused them: rests are announced
    # by the gateways over the invalidation channel, so the admin app listens too.
    app.cleanup_ctx.extend((tasks.tasks_ctx, dashboard.resting_ctx))
