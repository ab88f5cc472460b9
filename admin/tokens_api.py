"""`/tokens`: wallet tokens for applications; the token itself is shown once, at creation."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from admin.auth import authenticated, owner_scope, source
from admin.body import list_response, pagination, read_object, reject_unknown
from gateway import invalidation, services, tokens
from gateway.appkeys import POOL, REDIS
from gateway.errors import ValidationFailed

CREATE_FIELDS: Final = {"name", "services", "expires_at"}
MAX_SERVICES: Final = 100


async def create(request: web.Request) -> web.Response:
    user = await authenticated(request)
    body = await read_object(request)
    reject_unknown(body, CREATE_FIELDS)
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
        )
    return web.json_response({**record.to_json(), "token": token.reveal()}, status=201)


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
    async with request.app[POOL].acquire() as conn:
        await tokens.revoke_token(
            conn, user.actor(source(request)), owner_scope(user), request.match_info["id"]
        )
    await invalidation.publish(request.app[REDIS], "token", request.match_info["id"])
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokens", create, name="tokens.create")
    app.router.add_get("/tokens", list_, name="tokens.list")
    app.router.add_get("/tokens/{id}", show, name="tokens.show")
    app.router.add_delete("/tokens/{id}", revoke, name="tokens.revoke")
