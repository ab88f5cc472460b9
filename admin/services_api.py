"""`/services`: the catalog of upstreams (any user reads; ADMIN adds and changes)."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web
from yarl import URL

from admin.auth import admin_only, authenticated, source
from admin.body import list_response, optional_str, pagination, read_object, reject_unknown
from gateway import invalidation, services
from gateway.appkeys import POOL, REDIS, SETTINGS
from gateway.costs import validate_cost_model
from gateway.errors import ValidationFailed
from gateway.users import User

CREATE_FIELDS: Final = {"slug", "name", "base_url", "auth", "hosts", "strategy", "cost_model"}
UPDATE_FIELDS: Final = {"name", "base_url", "auth", "hosts", "strategy", "cost_model"}


async def list_(request: web.Request) -> web.Response:
    await authenticated(request)
    limit, offset = pagination(request)
    async with request.app[POOL].acquire() as conn:
        items, total = await services.list_services(conn, limit, offset)
    return list_response([s.to_json() for s in items], total)


async def show(request: web.Request) -> web.Response:
    await authenticated(request)
    async with request.app[POOL].acquire() as conn:
        service = await services.get_service(conn, request.match_info["slug"])
    return web.json_response(service.to_json())


def _changes(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """The validated fields of a create or update body (JSON-shaped values: `auth` an object,
    `hosts` a list, `cost_model` an object), as `Service` attribute changes."""
    allow_insecure = request.app[SETTINGS].allow_insecure_upstreams
    changes: dict[str, Any] = {}
    if "name" in body:
        name = optional_str(body, "name")
        if name is None:
            raise ValidationFailed("name", "must be a non-empty string")
        changes["name"] = name
    if "base_url" in body:
        changes["base_url"] = services.validate_base_url(
            body["base_url"], allow_insecure=allow_insecure
        )
    if "auth" in body:
        changes["auth_type"], changes["auth_name"] = services.validate_auth(body["auth"])
    if "hosts" in body:
        changes["hosts"] = services.validate_hosts(body["hosts"])
    if "strategy" in body:
        changes["strategy"] = services.validate_strategy(body["strategy"])
    if "cost_model" in body:
        changes["cost_model"] = validate_cost_model(body["cost_model"])
    return changes


async def create(request: web.Request) -> web.Response:
    user = await admin_only(request)
    body = await read_object(request)
    reject_unknown(body, CREATE_FIELDS)
    created = await add_service(request, user, body)
    return web.json_response(created.to_json(), status=201)


async def add_service(request: web.Request, user: User, body: dict[str, Any]) -> services.Service:
    """Validate and create a service, and tell the gateways (the API and the console)."""
    slug = services.validate_slug(body.get("slug"))
    for required in ("base_url", "auth"):
        if required not in body:
            raise ValidationFailed(required, "is required")
    changes = _changes(request, body)
    default_hosts = (URL(changes["base_url"]).host or "",)
    service = services.Service(
        slug,
        changes.get("name", slug),
        changes["base_url"],
        changes["auth_type"],
        changes["auth_name"],
        changes.get("hosts", default_hosts),
        strategy=changes.get("strategy", "priority"),
        cost_model=changes.get("cost_model"),
    )
    async with request.app[POOL].acquire() as conn:
        created = await services.create_service(
            conn, user.actor(source(request)), service, hosts_given="hosts" in changes
        )
    await invalidation.publish(request.app[REDIS], "service", created.slug)
    return created


async def update(request: web.Request) -> web.Response:
    user = await admin_only(request)
    body = await read_object(request)
    reject_unknown(body, UPDATE_FIELDS)
    updated = await change_service(request, user, request.match_info["slug"], body)
    return web.json_response(updated.to_json())


async def change_service(
    request: web.Request, user: User, slug: str, body: dict[str, Any]
) -> services.Service:
    changes = _changes(request, body)
    async with request.app[POOL].acquire() as conn:
        updated = await services.update_service(conn, user.actor(source(request)), slug, changes)
    await invalidation.publish(request.app[REDIS], "service", updated.slug)
    return updated


async def delete(request: web.Request) -> web.Response:
    user = await admin_only(request)
    await remove_service(request, user, request.match_info["slug"])
    return web.Response(status=204)


async def remove_service(request: web.Request, user: User, slug: str) -> None:
    async with request.app[POOL].acquire() as conn:
        await services.delete_service(conn, user.actor(source(request)), slug)
    await invalidation.publish(request.app[REDIS], "service", slug)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/services", list_, name="services.list")
    app.router.add_post("/services", create, name="services.create")
    app.router.add_get("/services/{slug}", show, name="services.show")
    app.router.add_put("/services/{slug}", update, name="services.update")
    app.router.add_delete("/services/{slug}", delete, name="services.delete")
