"""`/users`: accounts and roles (ADMIN), and each user's own password."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from admin.auth import admin_only, authenticated, source
from admin.body import list_response, optional_bool, pagination, read_object, reject_unknown
from gateway import invalidation, limits, users
from gateway.appkeys import POOL, REDIS, SETTINGS
from gateway.errors import Forbidden, NotFound, ValidationFailed
from gateway.secret import Secret

CREATE_FIELDS: Final = {"username", "password", "role"}
UPDATE_FIELDS: Final = {"role", "enabled", "tier", "budget"}
PASSWORD_FIELDS: Final = {"current_password", "new_password"}


async def create(request: web.Request) -> web.Response:
    admin = await admin_only(request)
    body = await read_object(request)
    reject_unknown(body, CREATE_FIELDS)
    username = users.validate_username(body.get("username"))
    password = users.validate_password(body.get("password"))
    role = users.validate_role(body.get("role", "USER"))
    async with request.app[POOL].acquire() as conn:
        user = await users.create_user(conn, admin.actor(source(request)), username, password, role)
    return web.json_response(user.to_json(), status=201)


async def list_(request: web.Request) -> web.Response:
    await admin_only(request)
    limit, offset = pagination(request)
    async with request.app[POOL].acquire() as conn:
        items, total = await users.list_users(conn, limit, offset)
    return list_response([u.to_json() for u in items], total)


def _target(request: web.Request, me: users.User) -> str:
    target = request.match_info["id"]
    return me.id if target == "me" else target


async def show(request: web.Request) -> web.Response:
    me = await authenticated(request)
    target = _target(request, me)
    if target != me.id and not me.is_admin:
        raise NotFound("no such user")
    async with request.app[POOL].acquire() as conn:
        user = await users.get_user(conn, target)
    return web.json_response(user.to_json())


async def update(request: web.Request) -> web.Response:
    admin = await admin_only(request)
    body = await read_object(request)
    reject_unknown(body, UPDATE_FIELDS)
    role = users.validate_role(body["role"]) if "role" in body else None
    enabled = optional_bool(body, "enabled")
    tiers = request.app[SETTINGS].rate_limit_tiers
    tier = users.validate_tier(body["tier"], tiers) if "tier" in body else users.UNCHANGED
    budget = limits.validate_budget(body["budget"]) if "budget" in body else users.UNCHANGED
    async with request.app[POOL].acquire() as conn:
        user = await users.update_user(
            conn,
            admin.actor(source(request)),
            _target(request, admin),
            role=role,
            enabled=enabled,
            tier=tier,
            budget=budget,
        )
    await invalidation.publish(request.app[REDIS], "user", user.id)
    return web.json_response(user.to_json())


async def delete(request: web.Request) -> web.Response:
    admin = await admin_only(request)
    async with request.app[POOL].acquire() as conn:
        await users.delete_user(conn, admin.actor(source(request)), _target(request, admin))
    await invalidation.publish(request.app[REDIS], "user", _target(request, admin))
    return web.Response(status=204)


async def change_password(request: web.Request) -> web.Response:
    """Self-service needs the current password; an ADMIN may reset anyone's without it."""
    me = await authenticated(request)
    target = _target(request, me)
    body = await read_object(request)
    reject_unknown(body, PASSWORD_FIELDS)
    new = users.validate_password(body.get("new_password"), "new_password")
    if target != me.id and not me.is_admin:
        raise NotFound("no such user")
    async with request.app[POOL].acquire() as conn:
        if target == me.id:
            current = body.get("current_password")
            if not isinstance(current, str):
                raise ValidationFailed("current_password", "is required")
            if await users.check_password(conn, me.username, Secret(current)) is None:
                raise Forbidden("current_password is wrong")
        await users.set_password(conn, me.actor(source(request)), target, new)
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/users", create, name="users.create")
    app.router.add_get("/users", list_, name="users.list")
    app.router.add_get("/users/{id}", show, name="users.show")
    app.router.add_put("/users/{id}", update, name="users.update")
    app.router.add_delete("/users/{id}", delete, name="users.delete")
    app.router.add_put("/users/{id}/password", change_password, name="users.password")
