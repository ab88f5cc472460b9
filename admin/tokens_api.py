"""`/tokens`: wallet tokens for applications; the token itself is shown once, at creation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from admin.auth import authenticated, owner_scope, source
from admin.body import list_response, pagination, read_object, reject_unknown
from gateway import invalidation, limits, services, tokens
from gateway.appkeys import POOL, REDIS
from gateway.errors import Forbidden, ValidationFailed
from gateway.ids import parse_id
from gateway.secret import Secret
from gateway.users import User

CREATE_FIELDS: Final = {"name", "services", "expires_at", "budget", "rate_limit"}
UPDATE_FIELDS: Final = {"name", "budget", "rate_limit"}
MAX_SERVICES: Final = 100


async def create(request: web.Request) -> web.Response:
    user = await authenticated(request)
    body = await read_object(request)
    reject_unknown(body, CREATE_FIELDS)
    record, token = await issue_token(request, user, body)
    return web.json_response({**record.to_json(), "token": token.reveal()}, status=201)


async def issue_token(
    request: web.Request, user: User, body: Mapping[str, Any]
) -> tuple[tokens.TokenRecord, Secret[str]]:
    """Validate `body` (the fields of `POST /tokens`, as JSON values) and create the token for
    `user`: what the API and the console's form both call. The token is returned this once."""
    name = tokens.validate_name(body.get("name"))
    wanted = body.get("services")
    if (
        not isinstance(wanted, list)
        or not wanted
        or len(wanted) > MAX_SERVICES
        or not all(isinstance(s, str) for s in wanted)
    ):
        raise ValidationFailed("services", "must be a non-empty list of service slugs")
    expires_at = tokens.validate_expiry(body.get("expires_at"))
    budget = limits.validate_budget(body.get("budget"))
    rate_limit = _rate_limit(user, body)
    async with request.app[POOL].acquire() as conn:
        for slug in wanted:
            await services.get_service(conn, slug)
        record, token = await tokens.create_token(
            conn,
            user.actor(source(request)),
            user.id,
            name,
            list(dict.fromkeys(wanted)),
            expires_at,
            budget,
            rate_limit,
        )
    return record, token


def _rate_limit(user: User, body: Mapping[str, Any]) -> int | None:
    """A token's own rate limit (requests per minute) overrides its owner's tier: only an
    ADMIN may set one."""
    value = limits.validate_rate_limit(body.get("rate_limit"))
    if value is not None and not user.is_admin:
        raise Forbidden("only an ADMIN may set a token's rate_limit")
    return value


async def update(request: web.Request) -> web.Response:
    """`PUT /tokens/{id}`: name, budget and (ADMIN) rate_limit; never the token itself."""
    user = await authenticated(request)
    body = await read_object(request)
    reject_unknown(body, UPDATE_FIELDS)
    changes: dict[str, Any] = {}
    if "name" in body:
        changes["name"] = tokens.validate_name(body["name"])
    if "budget" in body:
        changes["budget"] = limits.validate_budget(body["budget"])
    if "rate_limit" in body:
        if not user.is_admin:
            raise Forbidden("only an ADMIN may set a token's rate_limit")
        changes["rate_limit"] = limits.validate_rate_limit(body["rate_limit"])
    async with request.app[POOL].acquire() as conn:
        record = await tokens.update_token(
            conn, user.actor(source(request)), owner_scope(user), request.match_info["id"], changes
        )
    await invalidation.publish(request.app[REDIS], "token", record.id)
    return web.json_response(record.to_json())


async def list_(request: web.Request) -> web.Response:
    user = await authenticated(request)
    limit, offset = pagination(request)
    async with request.app[POOL].acquire() as conn:
        items, total = await tokens.list_tokens(conn, owner_scope(user), limit, offset)
    return list_response([t.to_json() for t in items], total)


async def show(request: web.Request) -> web.Response:
    user = await authenticated(request)
    async with request.app[POOL].acquire() as conn:
        record = await tokens.get_token(conn, owner_scope(user), request.match_info["id"])
    return web.json_response(record.to_json())


async def revoke(request: web.Request) -> web.Response:
    user = await authenticated(request)
    await revoke_token(request, user, request.match_info["id"])
    return web.Response(status=204)


async def revoke_token(request: web.Request, user: User, token_id: str) -> None:
    """Revoke one of the tokens `user` may see (404 otherwise) and tell every gateway process
    to drop it from its cache: what the API and the console both call."""
    async with request.app[POOL].acquire() as conn:
        await tokens.revoke_token(conn, user.actor(source(request)), owner_scope(user), token_id)
    # The canonical id, as the gateways' caches hold it: `/tokens/{ID IN UPPER CASE}` revokes
    # the same token, and must drop it from them too.
    await invalidation.publish(request.app[REDIS], "token", str(parse_id(token_id, "token")))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokens", create, name="tokens.create")
    app.router.add_get("/tokens", list_, name="tokens.list")
    app.router.add_get("/tokens/{id}", show, name="tokens.show")
    app.router.add_put("/tokens/{id}", update, name="tokens.update")
    app.router.add_delete("/tokens/{id}", revoke, name="tokens.revoke")
