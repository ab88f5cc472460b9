"""`/keys`: add, list, show, change, rotate and delete stored API keys (masked only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from admin.auth import authenticated, owner_scope, source
from admin.body import (
    list_response,
    optional_bool,
    optional_str,
    pagination,
    read_object,
    reject_unknown,
)
from gateway import cooldown, invalidation, keyformat, keys, services
from gateway.appkeys import POOL, REDIS, VAULT
from gateway.errors import BadRequest, ValidationFailed
from gateway.ids import parse_id
from gateway.secret import Secret
from gateway.users import User
from gateway.vault import mask

CREATE_FIELDS: Final = {"key", "service", "tier", "name", "priority", "enabled", "metadata"}
UPDATE_FIELDS: Final = {
    "key",
    "tier",
    "name",
    "priority",
    "enabled",
    "metadata",
    "status",
    "service",
}


async def _resolve_service(request: web.Request, given: object, secret: Secret[str]) -> str:
    async with request.app[POOL].acquire() as conn:
        if given is not None:
            if not isinstance(given, str):
                raise ValidationFailed("service", "must be a service slug")
            return (await services.get_service(conn, given)).slug
        known, _ = await services.list_services(conn, 1000, 0)
    slugs = {s.slug for s in known}
    found = [c for c in keyformat.candidates(secret.reveal()) if c in slugs]
    if len(found) == 1:
        return found[0]
    if found:
        raise BadRequest(
            f"the key's format matches several services ({', '.join(found)}); "
            "say which with `service`",
            details={"candidates": found},
        )
    raise BadRequest(
        "the key's format does not identify its service; say which with "
        f"`service` (one of: {', '.join(sorted(slugs))})",
        details={"candidates": sorted(slugs)},
    )


async def add_key(request: web.Request, user: User, body: dict[str, Any]) -> keys.KeyRecord:
    """Store a new key for `user` from parsed fields and tell every gateway: `POST /keys` and
    the console's add form. The service is detected from the key's format when not given."""
    reject_unknown(body, CREATE_FIELDS)
    secret = keys.validate_secret(body.get("key"))
    service = await _resolve_service(request, body.get("service"), secret)
    new = keys.NewKey(
        owner_id=user.id,
        service=service,
        secret=secret,
        tier=keys.validate_tier(body.get("tier", "paid")),
        name=optional_str(body, "name") or f"{service} {mask(secret)}",
        priority=keys.validate_priority(body.get("priority", 0)),
        enabled=optional_bool(body, "enabled") is not False,
        metadata=keys.validate_metadata(body.get("metadata"), secret),
    )
    if secret.reveal() in new.name:
        raise ValidationFailed("name", "must not contain the key itself")
    async with request.app[POOL].acquire() as conn:
        record = await keys.create_key(conn, request.app[VAULT], user.actor(source(request)), new)
    await invalidation.publish(request.app[REDIS], "key", record.id)
    return record


async def create(request: web.Request) -> web.Response:
    user = await authenticated(request)
    body = await read_object(request)
    record = await add_key(request, user, body)
    return web.json_response(record.to_json(), status=201)


def _filter(query: Mapping[str, str], name: str, allowed: tuple[str, ...] | None) -> str | None:
    value = query.get(name) or None
    if value is not None and allowed is not None and value not in allowed:
        raise ValidationFailed(name, f"must be one of {', '.join(allowed)}")
    return value


async def find_keys(
    request: web.Request, user: User, query: Mapping[str, str], limit: int, offset: int
) -> tuple[list[keys.KeyRecord], int]:
    """The keys `user` may see, filtered by `service`, `tier` and `status` in `query`, and
    their total: `GET /keys` and the console's list."""
    async with request.app[POOL].acquire() as conn:
        return await keys.list_keys(
            conn,
            owner_scope(user),
            service=_filter(query, "service", None),
            tier=_filter(query, "tier", keys.TIERS),
            status=_filter(query, "status", keys.STATUSES),
            limit=limit,
            offset=offset,
        )


async def list_(request: web.Request) -> web.Response:
    user = await authenticated(request)
    limit, offset = pagination(request)
    items, total = await find_keys(request, user, request.query, limit, offset)
    return list_response([k.to_json() for k in items], total)


async def owned_key(request: web.Request, user: User, key_id: str) -> keys.KeyRecord:
    """One key `user` may see; NotFound for another user's key, as for a missing one."""
    async with request.app[POOL].acquire() as conn:
        return await keys.get_key(conn, owner_scope(user), key_id)


async def show(request: web.Request) -> web.Response:
    user = await authenticated(request)
    record = await owned_key(request, user, request.match_info["id"])
    return web.json_response(record.to_json())


def _changes(body: dict[str, Any], secret: Secret[str] | None) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if "tier" in body:
        changes["tier"] = keys.validate_tier(body["tier"])
    if "name" in body:
        changes["name"] = optional_str(body, "name")
        if changes["name"] is None:
            raise ValidationFailed("name", "must be a non-empty string")
        if secret is not None and secret.reveal() in changes["name"]:
            raise ValidationFailed("name", "must not contain the key itself")
    if "priority" in body:
        changes["priority"] = keys.validate_priority(body["priority"])
    if "enabled" in body:
        if not isinstance(body["enabled"], bool):
            raise ValidationFailed("enabled", "must be true or false")
        changes["enabled"] = body["enabled"]
    if "metadata" in body:
        changes["metadata"] = keys.validate_metadata(body["metadata"], secret)
    if "status" in body:
        if body["status"] != "active":
            raise ValidationFailed("status", "can only be set back to active")
        changes["status"] = "active"
    return changes


async def change_key(
    request: web.Request, user: User, key_id: str, body: dict[str, Any]
) -> keys.KeyRecord:
    """Change a key's fields and/or replace its secret (`key`: rotation, same key record), then
    tell every gateway: `PUT /keys/{id}` and the console's edit, rotate, enable and disable."""
    reject_unknown(body, UPDATE_FIELDS)
    secret = keys.validate_secret(body["key"]) if "key" in body else None
    async with request.app[POOL].acquire() as conn:
        current = await keys.get_key(conn, owner_scope(user), key_id)
        if "service" in body and body["service"] != current.service:
            raise ValidationFailed("service", "cannot change; add the key to the other service")
        record = await keys.update_key(
            conn,
            request.app[VAULT],
            user.actor(source(request)),
            owner_scope(user),
            current.id,
            _changes(body, secret),
            secret,
        )
    await cooldown.forget(request.app[REDIS], record.id)
    await invalidation.publish(request.app[REDIS], "key", record.id)
    return record


async def update(request: web.Request) -> web.Response:
    user = await authenticated(request)
    body = await read_object(request)
    record = await change_key(request, user, request.match_info["id"], body)
    return web.json_response(record.to_json())


async def remove_key(request: web.Request, user: User, key_id: str) -> None:
    """Delete a key `user` may see and tell every gateway: `DELETE /keys/{id}` and the
    console's delete confirmation."""
    async with request.app[POOL].acquire() as conn:
        await keys.delete_key(conn, user.actor(source(request)), owner_scope(user), key_id)
    key_id = str(parse_id(key_id, "key"))  # as the gateways know it (it was found: well formed)
    await cooldown.forget(request.app[REDIS], key_id)
    await invalidation.publish(request.app[REDIS], "key", key_id)


async def delete(request: web.Request) -> web.Response:
    user = await authenticated(request)
    await remove_key(request, user, request.match_info["id"])
    return web.Response(status=204)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/keys", create, name="keys.create")
    app.router.add_get("/keys", list_, name="keys.list")
    app.router.add_get("/keys/{id}", show, name="keys.show")
    app.router.add_put("/keys/{id}", update, name="keys.update")
    app.router.add_delete("/keys/{id}", delete, name="keys.delete")
