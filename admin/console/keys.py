"""Console pages for stored keys: the list (filters, pages), add (with format detection),
detail and edit, rotate, disable/enable, and delete after a confirmation.

Every action calls the same functions as `/keys` (admin/keys_api.py), so validation, the
owner scope (another user's key is a 404 that names nothing), auditing and gateway
invalidation are the API's own. This module only turns form fields into those functions'
values and their errors back into a form. A key's secret is never rendered: pages show its
mask, and a form shown again after an error leaves the key field empty, and any other field
that held the typed key.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web
from multidict import MultiDictProxy
from redis.exceptions import RedisError

from admin import keys_api
from admin.body import pagination
from admin.console import page
from gateway import services, users
from gateway.appkeys import POOL, REDIS, SETTINGS
from gateway.errors import (
    REDIS_DOWN,
    BadRequest,
    Conflict,
    UnknownService,
    ValidationFailed,
    WalletError,
)
from gateway.keys import STATUSES, TIERS, KeyRecord
from gateway.monitoring import QuotaReading, quota_limit, read_quotas
from gateway.users import User

BASE: Final = f"{page.PREFIX}/keys"
PER_PAGE: Final = 25
FILTERS: Final = ("service", "tier", "status")
QUOTA_READ_TIMEOUT_S: Final = 2.0
# What a form shows again, next to a field, instead of an error page.
FORM_ERRORS: Final = (ValidationFailed, BadRequest, UnknownService, Conflict)
BADGES: Final = {"active": "ok", "invalid": "bad", "cooldown": "warn", "exhausted": "warn"}
STATUS_HELP: Final = {
    "active": "in use",
    "invalid": "the upstream refused this key; rotate it, or mark it active again",
    "cooldown": "resting after the upstream's rate limit",
    "exhausted": "its quota is used up for this window",
}
KEY_NOT_SHOWN: Final = "For safety the key you typed is not shown again: paste it again."
Form = MultiDictProxy[Any]


def _metadata(raw: str) -> object:
    """The metadata textarea as JSON (None when empty); its fields are checked by the API."""
    if not raw.strip():
        return None
    try:
        value = json.loads(raw)
        # As admin.body.read_object: a lone surrogate parses but is not storable text.
        json.dumps(value, ensure_ascii=False).encode()
    except (ValueError, RecursionError):
        raise ValidationFailed("metadata", 'must be a JSON object, e.g. {"quota": 1000}') from None
    return value


def _errors(exc: WalletError) -> dict[str, str]:
    """`{field: message}` for a form: metadata's inner fields under `metadata`, and a duplicate
    (the only Conflict here) or the service detection's answer next to their field."""
    if isinstance(exc, Conflict):
        return {"key": exc.message}
    if isinstance(exc, BadRequest | UnknownService):
        return {"service": exc.message}
    errors = page.field_errors(exc)
    for field in [f for f in errors if f.startswith("metadata.")]:
        errors["metadata"] = f"{field.removeprefix('metadata.')}: {errors.pop(field)}"
    return errors


def _status(exc: WalletError) -> int:
    return 409 if isinstance(exc, Conflict) else 422


def _scrub(typed: dict[str, Any], secret: str) -> dict[str, Any]:
    """What the user typed, minus any field holding the key (a name or metadata may carry it)."""
    secret = secret.strip()
    if not secret:
        return typed
    return {k: "" if isinstance(v, str) and secret in v else v for k, v in typed.items()}


async def _services(request: web.Request) -> list[services.Service]:
    async with request.app[POOL].acquire() as conn:
        found, _ = await services.list_services(conn, 1000, 0)
    return found


def _choices(values: tuple[str, ...], blank: str) -> list[tuple[str, str]]:
    return [("", blank), *((v, v) for v in values)]


async def _owners(request: web.Request, user: User, records: list[KeyRecord]) -> dict[str, str]:
    """`{owner id: username}` for the keys shown, looked up once per page; empty for a USER,
    who sees only their own keys and no owner."""
    if not user.is_admin or not records:
        return {}
    async with request.app[POOL].acquire() as conn:
        return await users.usernames(conn, (r.owner_id for r in records))


# --- the list ---


async def list_page(request: web.Request) -> web.Response:
    user = await page.user(request)
    _, offset = pagination(request)
    query = {name: request.query.get(name, "") for name in FILTERS}
    errors: dict[str, str] = {}
    try:
        items, total = await keys_api.find_keys(request, user, query, PER_PAGE, offset)
    except ValidationFailed as exc:
        items, total, errors = [], 0, _errors(exc)
    known = await _services(request)
    free_quota = request.app[SETTINGS].default_free_quota
    context = {
        "keys": items,
        "show_owner": user.is_admin,
        "owners": await _owners(request, user, items),
        "quotas": {k.id: quota_limit(k.id, k.tier, k.metadata, free_quota) for k in items},
        "total": total,
        "limit": PER_PAGE,
        "offset": offset,
        "query": {name: value for name, value in query.items() if value},
        "filters": query,
        "errors": errors,
        "service_options": [("", "Any service"), *((s.slug, s.name) for s in known)],
        "tier_options": _choices(TIERS, "Any tier"),
        "status_options": _choices(STATUSES, "Any status"),
        "badges": BADGES,
    }
    return page.render(request, "keys_list.html", context)


# --- adding a key ---


NEW_KEY_DEFAULTS: Final = {
    "service": "",
    "tier": "paid",
    "name": "",
    "priority": "0",
    "enabled": True,
    "metadata": "",
}


async def _new_page(
    request: web.Request,
    typed: dict[str, Any],
    errors: dict[str, str],
    candidates: list[str] | None = None,
    status: int = 200,
) -> web.Response:
    known = await _services(request)
    if candidates:
        # The key's format fits several services (or none): offer only those to choose from.
        # The blank first option is a prompt: sent as is, it asks again.
        names = {s.slug: s.name for s in known}
        choose = ("", "Choose the key's service")
        service_options = [choose, *((c, f"{names.get(c, c)} ({c})") for c in candidates)]
        errors = {**errors, "service": choose_message(candidates, set(names))}
    else:
        detect = ("", "Detect from the key's format")
        service_options = [detect, *((s.slug, f"{s.name} ({s.slug})") for s in known)]
    context = {
        "typed": typed,
        "errors": errors,
        "service_options": service_options,
        "tier_options": [(t, t) for t in TIERS],
        "key_note": KEY_NOT_SHOWN if errors else "",
    }
    return page.render(request, "keys_new.html", context, status=status)


def choose_message(candidates: list[str], known: set[str]) -> str:
    """The form's words for the API's "say which with `service`" (the service slugs it offers
    to choose from): every `known` service when the format fits none, else those it fits."""
    if set(candidates) >= known:
        return "The key's format does not say which service it is for: choose one."
    return f"The key's format fits several services ({', '.join(candidates)}): choose one."


async def new_form(request: web.Request) -> web.Response:
    await page.user(request)
    return await _new_page(request, dict(NEW_KEY_DEFAULTS), {})


def _new_fields(secret: str, typed: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {"key": secret, "enabled": typed["enabled"]}
    for name in ("service", "tier"):  # "": detect the service; the API's default tier
        if typed[name]:
            fields[name] = typed[name]
    if typed["name"].strip():
        fields["name"] = typed["name"]
    if typed["priority"].strip():
        fields["priority"] = page.form_number(typed["priority"])
    fields["metadata"] = _metadata(typed["metadata"])
    return fields


async def add(request: web.Request) -> web.Response:
    user = await page.user(request)
    form = await request.post()
    typed: dict[str, Any] = {name: page.form_text(form, name) for name in NEW_KEY_DEFAULTS}
    typed["enabled"] = page.form_text(form, "enabled") == "on"
    secret = page.form_text(form, "key")
    try:
        record = await keys_api.add_key(request, user, _new_fields(secret, typed))
    except FORM_ERRORS as exc:
        candidates = exc.details.get("candidates") if isinstance(exc, BadRequest) else None
        return await _new_page(
            request,
            _scrub(typed, secret),
            _errors(exc),
            candidates if isinstance(candidates, list) else None,
            _status(exc),
        )
    return page.redirect(f"{BASE}/{record.id}", f"Key added to {record.service}.")


# --- one key: detail, edit, rotate, enable/disable, delete ---


def _edit_values(record: KeyRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "tier": record.tier,
        "priority": str(record.priority),
        "enabled": record.enabled,
        "metadata": json.dumps(record.metadata, indent=2) if record.metadata else "",
    }


async def _quota(request: web.Request, record: KeyRecord) -> dict[str, Any]:
    """The key's quota as the gateway reads it, and its current window (None when it has no
    quota, or Redis does not answer: the page still shows)."""
    limit = quota_limit(
        record.id, record.tier, record.metadata, request.app[SETTINGS].default_free_quota
    )
    reading: QuotaReading | None = None
    if limit.quota is not None:
        try:
            async with asyncio.timeout(QUOTA_READ_TIMEOUT_S):
                (reading,) = await read_quotas(
                    request.app[REDIS], [(record.service, limit)], datetime.now(UTC)
                )
        except (*REDIS_DOWN, RedisError, OSError, TimeoutError):
            reading = None
    return {"limit": limit, "reading": reading}


async def _detail_page(
    request: web.Request,
    user: User,
    record: KeyRecord,
    edit: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
) -> web.Response:
    owners = await _owners(request, user, [record])
    context = {
        "key": record,
        "show_owner": user.is_admin,
        "owner": owners.get(record.owner_id, ""),
        "edit": edit if edit is not None else _edit_values(record),
        "errors": errors or {},
        "tier_options": [(t, t) for t in TIERS],
        "quota": await _quota(request, record),
        "badges": BADGES,
        "status_help": STATUS_HELP,
        "metadata_json": json.dumps(record.metadata, indent=2, sort_keys=True),
        "key_note": KEY_NOT_SHOWN if errors and "key" in errors else "",
    }
    return page.render(request, "keys_detail.html", context, status=status)


async def _owned(request: web.Request) -> tuple[User, KeyRecord]:
    """The signed-in user and the key in the path, or the 404 page (for another user's key
    too, before anything is read from the form)."""
    user = await page.user(request)
    return user, await keys_api.owned_key(request, user, request.match_info["id"])


async def detail(request: web.Request) -> web.Response:
    user, record = await _owned(request)
    return await _detail_page(request, user, record)


async def rotated_address(request: web.Request) -> web.Response:
    """A failed rotation shows the key's page at /rotate (a POST's answer); opening that
    address again (a bookmark, Enter in the address bar) leads back to the key's page."""
    _, record = await _owned(request)
    return page.redirect(f"{BASE}/{record.id}")


def _edit_changes(record: KeyRecord, typed: dict[str, Any]) -> dict[str, Any]:
    """Only the fields that differ from the stored key: the audit record names real changes."""
    wanted = {
        "name": typed["name"],
        "tier": typed["tier"],
        "priority": page.form_number(typed["priority"]),
        "enabled": typed["enabled"],
        "metadata": _metadata(typed["metadata"]),
    }
    current = {**record.to_json(), "metadata": record.metadata or None}
    return {name: value for name, value in wanted.items() if value != current[name]}


async def edit(request: web.Request) -> web.Response:
    user, record = await _owned(request)
    form = await request.post()
    typed: dict[str, Any] = {
        name: page.form_text(form, name) for name in ("name", "tier", "priority")
    }
    typed["metadata"] = page.form_text(form, "metadata")
    typed["enabled"] = page.form_text(form, "enabled") == "on"
    try:
        changes = _edit_changes(record, typed)
        if not changes:
            return page.redirect(f"{BASE}/{record.id}", "Nothing to change.")
        await keys_api.change_key(request, user, record.id, changes)
    except FORM_ERRORS as exc:
        return await _detail_page(request, user, record, typed, _errors(exc), _status(exc))
    return page.redirect(f"{BASE}/{record.id}", "Saved.")


async def rotate(request: web.Request) -> web.Response:
    user, record = await _owned(request)
    form = await request.post()
    try:
        updated = await keys_api.change_key(
            request, user, record.id, {"key": page.form_text(form, "key")}
        )
    except FORM_ERRORS as exc:
        return await _detail_page(request, user, record, None, _errors(exc), _status(exc))
    return page.redirect(f"{BASE}/{record.id}", f"New secret stored ({updated.masked}).")


async def _set(request: web.Request, changes: dict[str, Any], notice: str) -> web.Response:
    user, record = await _owned(request)
    await keys_api.change_key(request, user, record.id, changes)
    return page.redirect(f"{BASE}/{record.id}", notice)


async def disable(request: web.Request) -> web.Response:
    return await _set(request, {"enabled": False}, "Disabled: the gateway no longer uses it.")


async def enable(request: web.Request) -> web.Response:
    return await _set(request, {"enabled": True}, "Enabled.")


async def activate(request: web.Request) -> web.Response:
    return await _set(request, {"status": "active"}, "Marked active: the gateway may use it.")


async def delete_form(request: web.Request) -> web.Response:
    _, record = await _owned(request)
    return page.render(request, "keys_delete.html", {"key": record})


async def delete(request: web.Request) -> web.Response:
    user, record = await _owned(request)
    await keys_api.remove_key(request, user, record.id)
    return page.redirect(BASE, "Key deleted.")


def add_routes(app: web.Application) -> None:
    app.router.add_get(BASE, list_page, name="ui.keys")
    app.router.add_get(f"{BASE}/new", new_form, name="ui.keys.new")
    app.router.add_post(f"{BASE}/new", add, name="ui.keys.add")
    app.router.add_get(BASE + "/{id}", detail, name="ui.keys.detail")
    app.router.add_post(BASE + "/{id}", edit, name="ui.keys.edit")
    app.router.add_post(BASE + "/{id}/rotate", rotate, name="ui.keys.rotate")
    app.router.add_get(BASE + "/{id}/rotate", rotated_address, name="ui.keys.rotate.address")
    app.router.add_post(BASE + "/{id}/disable", disable, name="ui.keys.disable")
    app.router.add_post(BASE + "/{id}/enable", enable, name="ui.keys.enable")
    app.router.add_post(BASE + "/{id}/activate", activate, name="ui.keys.activate")
    app.router.add_get(BASE + "/{id}/delete", delete_form, name="ui.keys.delete")
    app.router.add_post(BASE + "/{id}/delete", delete, name="ui.keys.delete.submit")
