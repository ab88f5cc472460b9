"""Console sessions: a random cookie naming a Redis record, idle expiry, and CSRF tokens.

The cookie is 32 random bytes, HttpOnly, SameSite=Strict, scoped to `/ui/`, and `Secure` over
TLS (`CONSOLE_SECURE_COOKIE`). Redis keeps only a digest of it, with the user id and the login
time; the record's TTL is the idle timeout, renewed by every request. The CSRF token of a form
is an HMAC of the session (or, before login, of a short-lived login cookie) under the JWT
secret, so it needs no storage and is worthless with another session.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from yarl import URL

from gateway import rkeys
from gateway.appkeys import REDIS, SETTINGS
from gateway.errors import BadRequest, Forbidden, Unauthenticated

SESSION_COOKIE: Final = "wallet_console"
LOGIN_COOKIE: Final = "wallet_console_login"
COOKIE_PATH: Final = "/ui/"
LOGIN_COOKIE_MAX_AGE_S: Final = 3600
CSRF_FIELD: Final = "csrf"


@dataclass(frozen=True)
class Session:
    token: str  # the cookie's value: never logged, never stored
    user_id: str
    created: float

    @property
    def key(self) -> str:
        return rkeys.console_session(_digest(self.token))


SESSION_KEY: Final = web.RequestKey("console_session", Session)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _secure(request: web.Request) -> bool:
    setting = request.app[SETTINGS].console_secure_cookie
    return setting == "true" or (setting == "auto" and request.secure)


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str) -> None:
    response.set_cookie(
        name,
        value,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
    )


async def start(request: web.Request, response: web.StreamResponse, user_id: str) -> None:
    """A new session for `user_id` (a new cookie at every login: no session fixation)."""
    settings = request.app[SETTINGS]
    if SESSION_KEY in request:  # signing in again while signed in: the old one ends
        await request.app[REDIS].delete(request[SESSION_KEY].key)
    session = Session(secrets.token_urlsafe(32), user_id, time.time())
    record = json.dumps({"user": user_id, "created": session.created})
    await request.app[REDIS].set(session.key, record, ex=settings.console_idle_timeout_s)
    _set_cookie(request, response, SESSION_COOKIE, session.token)
    response.del_cookie(LOGIN_COOKIE, path=COOKIE_PATH)


async def load(request: web.Request) -> Session | None:
    """The request's live session, its idle timer renewed; None without one."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > 100:
        return None
    settings = request.app[SETTINGS]
    key = rkeys.console_session(_digest(token))
    raw = await request.app[REDIS].getex(key, ex=settings.console_idle_timeout_s)
    if raw is None:
        return None
    record = json.loads(raw)
    session = Session(token, str(record["user"]), float(record["created"]))
    if time.time() - session.created > settings.console_session_lifetime_s:
        await request.app[REDIS].delete(key)
        return None
    request[SESSION_KEY] = session
    return session


def require(request: web.Request) -> Session:
    if SESSION_KEY not in request:
        raise Unauthenticated("log in to use the console")
    return request[SESSION_KEY]


async def end(request: web.Request, response: web.StreamResponse) -> None:
    """Sign out: the record goes from Redis and the cookie from the browser."""
    if SESSION_KEY in request:
        await request.app[REDIS].delete(request[SESSION_KEY].key)
        del request[SESSION_KEY]
    response.del_cookie(SESSION_COOKIE, path=COOKIE_PATH)


def login_nonce(request: web.Request) -> str:
    """The login form's CSRF binding: the login cookie's value, or a new one to set with
    `keep_login_nonce` on the response that carries the form."""
    nonce = request.cookies.get(LOGIN_COOKIE)
    if nonce and len(nonce) <= 100:
        return nonce
    return secrets.token_urlsafe(24)


def keep_login_nonce(request: web.Request, response: web.StreamResponse, nonce: str) -> None:
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Strict",
        secure=_secure(request),
        max_age=LOGIN_COOKIE_MAX_AGE_S,
    )


def csrf_token(request: web.Request, nonce: str | None = None) -> str:
    """The CSRF token forms of this request's session carry (or of a login `nonce`)."""
    if nonce is not None:
        subject = f"login:{nonce}"
    elif SESSION_KEY in request:
        subject = f"session:{request[SESSION_KEY].token}"
    else:
        return ""
    secret = request.app[SETTINGS].jwt_secret.reveal().encode()
    return hmac.new(secret, f"console-csrf:{subject}".encode(), hashlib.sha256).hexdigest()


async def check_csrf(request: web.Request) -> None:
    """Refuse a state-changing request whose form lacks this session's CSRF token, or that a
    browser says came from another origin."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null" and origin.split("://", 1)[-1] != request.host:
        raise Forbidden("cross-origin form refused")
    try:
        form = await request.post()
    except (ValueError, LookupError):  # not UTF-8, an unknown charset, a broken multipart
        raise BadRequest("the form could not be read") from None
    given = form.get(CSRF_FIELD)
    nonce = request.cookies.get(LOGIN_COOKIE) if SESSION_KEY not in request else None
    expected = csrf_token(request, nonce) if (nonce or SESSION_KEY in request) else ""
    if not isinstance(given, str) or not expected or not hmac.compare_digest(given, expected):
        raise Forbidden("the form's CSRF token is missing or stale; reload the page and retry")


def notice_seal(request: web.Request, notice: str) -> str:
    """A notice carried in a redirect's query is shown only with this seal: a link crafted
    elsewhere cannot put its own words in the console's notice bar."""
    secret = request.app[SETTINGS].jwt_secret.reveal().encode()
    digest = hmac.new(secret, f"console-notice:{notice}".encode(), hashlib.sha256)
    return digest.hexdigest()[:32]


def notice(request: web.Request) -> str:
    text = request.query.get("notice", "")
    seal = request.query.get("seal", "")
    if text and len(text) <= 300 and hmac.compare_digest(seal, notice_seal(request, text)):
        return text
    return ""


def seal_notice(request: web.Request, response: web.StreamResponse) -> None:
    """Seal the notice of a redirect a handler answered with (see `notice`)."""
    location = response.headers.get("Location")
    if response.status != 303 or not location or "notice=" not in location:
        return
    url = URL(location)
    text = url.query.get("notice")
    if text:
        response.headers["Location"] = str(url.update_query(seal=notice_seal(request, text)))


ONCE_FIELD: Final = "once"
ONCE_TTL_S: Final = 86400


def once_token() -> str:
    """A form's mark that it may act only once (see `claim_once`)."""
    return secrets.token_urlsafe(16)


async def claim_once(request: web.Request, mark: object) -> bool:
    """Whether this form (by its `once` mark, within this session) is sent for the first time:
    a reload of the page that answered it sends it again, and must not act again."""
    if not isinstance(mark, str) or not 8 <= len(mark) <= 64:
        return False
    key = rkeys.console_form_once(_digest(f"{require(request).token}:{mark}"))
    return bool(await request.app[REDIS].set(key, "1", nx=True, ex=ONCE_TTL_S))


async def release_once(request: web.Request, mark: str) -> None:
    """The form did not act (it came back with errors): it may be sent again."""
    key = rkeys.console_form_once(_digest(f"{require(request).token}:{mark}"))
    await request.app[REDIS].delete(key)
