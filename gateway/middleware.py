"""Middleware shared by both apps: request ids, the one JSON error shape, security headers,
access logs and request metrics."""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Final

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import istr

from gateway import logs, sdkerrors
from gateway.appkeys import ERROR_PAGE, METRICS
from gateway.errors import REDIS_DOWN as REDIS_DOWN  # also gateway/proxy.py's
from gateway.errors import WalletError
from gateway.logs import redact_url
from gateway.metrics import status_class

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID: Final = web.RequestKey("request_id", str)
# The service slug a gateway request is for, once known: errors take that service's style.
SERVICE: Final = web.RequestKey("service", str)
SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
HTTP_CODES: Final = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}
DB_DOWN: Final = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    ConnectionError,
    TimeoutError,
)
UNSTORABLE_TEXT: Final = (
    asyncpg.CharacterNotInRepertoireError,
    asyncpg.UntranslatableCharacterError,
)


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str,
    headers: dict[str, str] | None = None,
    details: dict[str, object] | None = None,
    *,
    google_style: bool = False,
) -> web.Response:
    """The one error shape (see gateway/sdkerrors.py for `type` and the Google style)."""
    error: dict[str, object] = {
        "code": code,
        "message": message,
        "type": sdkerrors.error_type(status),
        "request_id": request_id,
    }
    if details:
        error.update(details)
    body: dict[str, object] = {"error": error}
    if google_style and status < 500:  # gateway failures (502, 503, 504) keep their status
        body = {"status": sdkerrors.google_status(status), "error_message": message, **body}
        status = 200
    return web.json_response(body, status=status, headers=headers, dumps=json.dumps)


def _from_http_exception(exc: web.HTTPException) -> tuple[int, str, str]:
    status = exc.status
    code = HTTP_CODES.get(status, f"http_{status}")
    message = exc.reason
    if status == 405:
        message = (
            f"method not allowed; allowed: {', '.join(sorted(exc.allowed_methods))}"
            if isinstance(exc, web.HTTPMethodNotAllowed)
            else exc.reason
        )
    elif status == 413:
        message = "request body too large"
    return status, code, message


# Header names as multidict's `istr`: a case-insensitive lookup need not fold them each time.
_SECURITY_HEADERS: Final = tuple((istr(name), value) for name, value in SECURITY_HEADERS.items())


def _stamp(response: web.StreamResponse, header: str, request_id: str) -> None:
    headers = response.headers
    headers[header] = request_id
    for name, value in _SECURITY_HEADERS:
        headers.setdefault(name, value)


def make_prepare_hook(
    request_id_header: str,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Stamps streamed responses, whose headers leave before the middleware sees them."""
    header = istr(request_id_header)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if REQUEST_ID in request and header not in response.headers:
            _stamp(response, header, request[REQUEST_ID])

    return on_prepare


def make_middleware(request_id_header: str) -> Middleware:
    """One middleware doing the cross-cutting work in order; `request_id_header` differs
    per app (the gateway must not clash with upstream `X-Request-Id`)."""

    # Request ids: unique per process (a random prefix, made after any fork, and a counter);
    # they identify, they need not be unguessable, and reading the OS's randomness per
    # request is a syscall on the hot path.
    prefix = secrets.token_hex(8)
    sequence = itertools.count(1)
    header = istr(request_id_header)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = f"{prefix}{next(sequence):08x}"
        request[REQUEST_ID] = request_id
        metrics = request.app[METRICS]
        started = time.perf_counter()
        route = request.match_info.route.resource
        route_name = route.canonical if route is not None else "unmatched"
        metrics.in_flight_now += 1
        try:
            response = await handler(request)
        except Exception as exc:  # rendered in the one JSON shape (see `_rendered`)
            rendered = _rendered(request, exc, request_id)
            if rendered is None:
                raise
            response = rendered
        finally:
            metrics.in_flight_now -= 1
        elapsed = time.perf_counter() - started
        if not response.prepared:
            _stamp(response, header, request_id)
        status = response.status
        metrics.requests.tally((route_name, status_class(status)))
        metrics.latency.record((route_name,), elapsed)
        logs.access(
            request.method,
            redact_url(request.rel_url),
            status,
            round(elapsed * 1000, 2),
            request_id,
        )
        return response

    return middleware


def _render(
    request: web.Request,
    request_id: str,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    details: dict[str, object] | None = None,
) -> web.Response:
    error_page = request.app.get(ERROR_PAGE)
    if error_page is not None:
        page = error_page(request, status, message, request_id)
        if page is not None:
            page.headers.update(headers or {})  # Retry-After, Allow: as the JSON answer
            return page
    google_style = request.get(SERVICE) in sdkerrors.GOOGLE_STYLE
    return error_response(
        status, code, message, request_id, headers, details, google_style=google_style
    )


def _rendered(request: web.Request, exc: Exception, request_id: str) -> web.Response | None:
    """The error answer for an exception a handler raised; None for one to let through (an
    HTTP exception below 400, such as a redirect). Called while `exc` is being handled."""
    metrics = request.app[METRICS]
    if isinstance(exc, WalletError):
        metrics.errors.inc({"code": exc.code})
        return _render(
            request, request_id, exc.status, exc.code, exc.message, exc.headers, exc.details
        )
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            return None
        status, code, message = _from_http_exception(exc)
        metrics.errors.inc({"code": code})
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _render(request, request_id, status, code, message, headers)
    if isinstance(exc, REDIS_DOWN):
        log.error("redis_unavailable", error=type(exc).__name__, request_id=request_id)
        metrics.errors.inc({"code": "redis_unavailable"})
        return _render(request, request_id, 503, "redis_unavailable", "Redis is unavailable")
    if isinstance(exc, DB_DOWN):
        log.error("database_unavailable", error=type(exc).__name__, request_id=request_id)
        metrics.errors.inc({"code": "database_unavailable"})
        return _render(
            request,
            request_id,
            503,
            "database_unavailable",
            "the database is unavailable",
            {"Retry-After": "1"},
        )
    if isinstance(exc, UNSTORABLE_TEXT):
        # A NUL character (raw, or `\u0000` in JSON) in a path, query or body field reached
        # PostgreSQL, which cannot store it: the client's fault, so a 400, not a 500.
        metrics.errors.inc({"code": "bad_request"})
        return _render(
            request,
            request_id,
            400,
            "bad_request",
            "text must not contain NUL (\\u0000) characters",
        )
    # The one broad catch: anything unexpected becomes a 500 in the JSON shape, logged
    # (secrets scrubbed by the redactor) with the request id a user can quote.
    log.exception("unhandled_error", error=type(exc).__name__, request_id=request_id)
    metrics.errors.inc({"code": "internal_error"})
    return _render(request, request_id, 500, "internal_error", "internal error")
