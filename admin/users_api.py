"""`/users`: accounts and roles (ADMIN), and each user's own password."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from admin.auth import admin_only, authenticated, source
from admin.body import list_response, optional_bool, pagination, read_object, reject_unknown
from gateway import invalidation, limits, users
from gateway.appkeys import POOL, REDIS, SETTINGS
from gateway.errors import Forbidden, NotFound, ValidationFailed
from gateway.limits import Budget
from gateway.secret import Secret

CREATE_FIELDS: Final = {"username", "password", "role"}
UPDATE_FIELDS: Final = {"role", "enabled", "tier", "budget"}
PASSWORD_FIELDS: Final = {"current_password", "new_password"}


async def create(request: web.Request) -> web.Response:
    admin = await admin_only(request)
    body = await read_object(request)
    reject_unknown(body, CREATE_FIELDS)
    user = await add_user(request, admin, body)
    return web.json_response(user.to_json(), status=201)


async def add_user(request: web.Request, admin: users.User, body: dict[str, Any]) -> users.User:
    """Validate and create an account. The console's form also sets its rate-limit `tier`
    (the API's body may not: it sets a tier with PUT), in the same transaction."""
    username = users.validate_username(body.get("username"))
    password = users.validate_password(body.get("password"))
    role = users.validate_role(body.get("role", "USER"))
    tiers = request.app[SETTINGS].rate_limit_tiers
    tier = users.validate_tier(body.get("tier"), tiers)
    actor = admin.actor(source(request))
    async with request.app[POOL].acquire() as conn, conn.transaction():
        user = await users.create_user(conn, actor, username, password, role)
        if tier is not None:
            user = await users.update_user(conn, actor, user.id, role=None, enabled=None, tier=tier)
    return user


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


@dataclass(frozen=True)
class UserChanges:
    """A validated update: None / UNCHANGED leave a field as it is."""

    role: users.Role | None
    enabled: bool | None
    tier: str | users.Unchanged | None
    budget: Budget | users.Unchanged | None


def user_changes(request: web.Request, body: dict[str, Any]) -> UserChanges:
    """Validated before anything is applied, so that the console can check a whole form first."""
    role = users.validate_role(body["role"]) if "role" in body else None
    enabled = optional_bool(body, "enabled")
    tiers = request.app[SETTINGS].rate_limit_tiers
    tier = users.validate_tier(body["tier"], tiers) if "tier" in body else users.UNCHANGED
    budget = limits.validate_budget(body["budget"]) if "budget" in body else users.UNCHANGED
    return UserChanges(role, enabled, tier, budget)


async def update(request: web.Request) -> web.Response:
    admin = await admin_only(request)
    body = await read_object(request)
    reject_unknown(body, UPDATE_FIELDS)
    user = await change_user(request, admin, _target(request, admin), user_changes(request, body))
    return web.json_response(user.to_json())


async def change_user(
    request: web.Request, admin: users.User, target: str, changes: UserChanges
) -> users.User:
    """Apply an update (the last active ADMIN stays one) and tell the gateways."""
    async with request.app[POOL].acquire() as conn:
        user = await users.update_user(
            conn,
            admin.actor(source(request)),
            target,
            role=changes.role,
            enabled=changes.enabled,
            tier=changes.tier,
            budget=changes.budget,
        )
    await invalidation.publish(request.app[REDIS], "user", user.id)
    return user


async def delete(request: web.Request) -> web.Response:
    admin = await admin_only(request)
    await remove_user(request, admin, _target(request, admin))
    return web.Response(status=204)


async def remove_user(request: web.Request, admin: users.User, target: str) -> None:
    async with request.app[POOL].acquire() as conn:
        await users.delete_user(conn, admin.actor(source(request)), target)
    await invalidation.publish(request.app[REDIS], "user", target)


async def change_password(request: web.Request) -> web.Response:
    """Self-service needs the current password; an ADMIN may reset anyone's without it."""
    me = await authenticated(request)
    target = _target(request, me)
    body = await read_object(request)
    reject_unknown(body, PASSWORD_FIELDS)
    await set_password(request, me, target, body)
    return web.Response(status=204)


async def set_password(
    request: web.Request, me: users.User, target: str, body: dict[str, Any]
) -> None:
    """`new_password` for `target`; for oneself `current_password` must be right too."""
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


def add_routes(app: web.Application) -> None:
    app.router.add_post("/users", create, name="users.create")
    app.router.add_get("/users", list_, name="users.list")
    app.router.add_get("/users/{id}", show, name="users.show")
    app.router.add_put("/users/{id}", update, name="users.update")
    app.router.add_delete("/users/{id}", delete, name="users.delete")
    app.router.add_put("/users/{id}/password", change_password, name="users.password")
