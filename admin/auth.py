"""Admin authentication: login with throttling, HS256 JWTs, and role checks (RBAC).

The role and the enabled flag are read from PostgreSQL on every admin call (the admin app is
not the hot path), so disabling, demoting or deleting a user takes effect at once.
"""

from __future__ import annotations

import secrets
import time
import uuid
from datetime import UTC, datetime
from typing import Final

import jwt
from aiohttp import web

from admin.body import read_object, reject_unknown
from gateway import rkeys, users
from gateway.appkeys import METRICS, POOL, REDIS, SETTINGS
from gateway.errors import Forbidden, NotFound, TooManyRequests, Unauthenticated, ValidationFailed
from gateway.secret import Secret

ALGORITHM: Final = "HS256"
AUDIENCE: Final = "wallet-admin"
ISSUER: Final = "api-key-wallet"
MAX_FAILURES_PER_USER: Final = 5
MAX_FAILURES_PER_ADDR: Final = 30
FAILURE_WINDOW_S: Final = 900
USER_KEY: Final = web.RequestKey("user", users.User)

# Count a failure against both keys and return the counts, atomically (one round trip).
RECORD_FAILURE: Final = """
local u = redis.call('INCR', KEYS[1])
if u == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local a = redis.call('INCR', KEYS[2])
if a == 1 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return {u, a}
"""


def issue_token(secret: Secret[str], user: users.User, lifetime_s: int) -> tuple[str, datetime]:
    now = int(time.time())
    claims = {
        "sub": user.id,
        "role": user.role,
        "iat": now,
        # `iat` is whole seconds: a password change later in the same second must still end
        # this session (see current_user).
        "iat_ms": int(time.time() * 1000),
        "exp": now + lifetime_s,
        "jti": secrets.token_hex(16),
        "aud": AUDIENCE,
        "iss": ISSUER,
    }
    return (
        jwt.encode(claims, secret.reveal(), algorithm=ALGORITHM),
        datetime.fromtimestamp(now + lifetime_s, UTC),
    )


def decode_token(secret: Secret[str], token: str) -> dict[str, object]:
    try:
        claims: dict[str, object] = jwt.decode(
            token,
            secret.reveal(),
            algorithms=[ALGORITHM],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["sub", "exp", "iat", "jti"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("session expired; log in again") from None
    except (jwt.PyJWTError, UnicodeEncodeError):
        # UnicodeEncodeError: header bytes that are not UTF-8 reach us surrogate-escaped.
        raise Unauthenticated("invalid bearer token") from None
    return claims


async def _throttled(request: web.Request, username: str) -> None:
    redis = request.app[REDIS]
    for key, limit in (
        (rkeys.login_failures_user(username), MAX_FAILURES_PER_USER),
        (rkeys.login_failures_addr(_address(request)), MAX_FAILURES_PER_ADDR),
    ):
        count = await redis.get(key)
        if count is not None and int(count) >= limit:
            ttl = await redis.ttl(key)
            raise TooManyRequests(
                "too many failed logins; try again later", retry_after_s=max(int(ttl), 1)
            )


def _address(request: web.Request) -> str:
    return request.remote or "unknown"


async def verify_login(request: web.Request, username: str, password: str) -> users.User:
    """The user with these credentials, throttled per username and per address: the one
    check behind both `POST /auth/login` and the console's login form."""
    await _throttled(request, username)
    async with request.app[POOL].acquire() as conn:
        user = await users.check_password(conn, username, Secret(password))
    if user is None:
        await request.app[REDIS].eval(
            RECORD_FAILURE,
            2,
            rkeys.login_failures_user(username),
            rkeys.login_failures_addr(_address(request)),
            FAILURE_WINDOW_S,
        )
        request.app[METRICS].login_failures.inc({"reason": "bad_credentials"})
        raise Unauthenticated("wrong username or password")
    await request.app[REDIS].delete(rkeys.login_failures_user(username))
    return user


def validate_credentials(username: object, password: object) -> tuple[str, str]:
    if not isinstance(username, str) or not username or len(username) > 200:
        raise ValidationFailed("username", "is required")
    if not isinstance(password, str) or not password or len(password) > 1024:
        raise ValidationFailed("password", "is required")
    return username, password


async def login(request: web.Request) -> web.Response:
    body = await read_object(request)
    reject_unknown(body, {"username", "password"})
    username, password = validate_credentials(body.get("username"), body.get("password"))
    user = await verify_login(request, username, password)
    settings = request.app[SETTINGS]
    token, expires_at = issue_token(settings.jwt_secret, user, settings.jwt_expires_in_s)
    return web.json_response(
        {
            "token": token,
            "expires_at": expires_at.isoformat(),
            "user": {"id": user.id, "username": user.username, "role": user.role},
        }
    )


async def authenticated(request: web.Request) -> users.User:
    """The user behind the bearer JWT, checked against the database now."""
    if USER_KEY in request:
        return request[USER_KEY]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send Authorization: Bearer <token from POST /auth/login>")
    claims = decode_token(request.app[SETTINGS].jwt_secret, token.strip())
    iat_ms = claims.get("iat_ms")
    issued_at = iat_ms / 1000 if isinstance(iat_ms, int) else claims["iat"]
    user = await current_user(request, claims["sub"], issued_at)
    request[USER_KEY] = user
    return user


async def current_user(request: web.Request, subject: object, issued_at: object) -> users.User:
    """The user a session (a JWT or a console cookie) names, if it may still act: it exists,
    is enabled, and has not changed its password since `issued_at` (seconds)."""
    try:
        user_id = uuid.UUID(str(subject))
    except ValueError:
        raise Unauthenticated("invalid bearer token") from None
    try:
        async with request.app[POOL].acquire() as conn:
            user = await users.get_user(conn, user_id)
    except NotFound:
        raise Unauthenticated("this account no longer exists") from None
    if not user.enabled:
        raise Unauthenticated("this account is disabled")
    if isinstance(issued_at, int | float) and issued_at < user.password_changed_at.timestamp():
        raise Unauthenticated("the password changed since this session began; log in again")
    return user


async def admin_only(request: web.Request) -> users.User:
    user = await authenticated(request)
    if not user.is_admin:
        raise Forbidden("this needs the ADMIN role")
    return user


def owner_scope(user: users.User) -> str | None:
    """The owner filter for keys and tokens: None (everything) for an ADMIN."""
    return None if user.is_admin else user.id


def source(request: web.Request) -> str:
    return _address(request)
