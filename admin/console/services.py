"""Console pages for the service catalog: everyone signed in reads it; an ADMIN adds, edits
and deletes services through the functions behind `/services` (admin/services_api.py), so
every rule and every validation message is the API's own.

The form turns its fields into the API's JSON body: `auth_type`/`auth_name` into `auth`,
`hosts` one per line into a list, and `per_call`, `hold` and `token_prices` (one model a
line: `name input output`) into `cost_model`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web

from admin import services_api
from admin.body import pagination
from admin.console import page
from admin.console.page import PREFIX
from gateway import services
from gateway.appkeys import POOL
from gateway.errors import Conflict, ValidationFailed
from gateway.selection import STRATEGIES
from gateway.services import AUTH_TYPES, Service

FIELDS: Final = (
    "slug",
    "name",
    "base_url",
    "auth_type",
    "auth_name",
    "hosts",
    "strategy",
    "per_call",
    "hold",
    "token_prices",
)
# Where the API's error fields are shown on this form.
ERROR_FIELDS: Final = {
    "auth": "auth_type",
    "auth.type": "auth_type",
    "auth.name": "auth_name",
    "cost_model.per_call": "per_call",
    "cost_model.hold": "hold",
}
PRICES_ERROR: Final = "cost_model.per_million_tokens"
STRATEGY_HELP: Final = {
    "priority": "priority: oldest key first",
    "round_robin": "round_robin: take turns",
    "least_used": "least_used: fewest calls in flight",
    "weighted": "weighted: random by metadata.weight",
}


async def list_(request: web.Request) -> web.Response:
    await page.user(request)
    limit, offset = pagination(request)
    async with request.app[POOL].acquire() as conn:
        items, total = await services.list_services(conn, limit, offset)
    context = {"services": items, "total": total, "limit": limit, "offset": offset}
    return page.render(request, "services.html", context)


async def new_form(request: web.Request) -> web.Response:
    await page.admin(request)
    return _form_page(request, {"strategy": "priority"}, {}, None)


async def create(request: web.Request) -> web.Response:
    admin = await page.admin(request)
    form = await _read(request)
    try:
        created = await services_api.add_service(request, admin, _body(form, None))
    except (ValidationFailed, Conflict) as exc:
        return _form_page(request, form, _errors(exc, "slug"), None, status=exc.status)
    return page.redirect(f"{PREFIX}/services", f"Service {created.slug} created.")


async def edit_form(request: web.Request) -> web.Response:
    await page.admin(request)
    service = await _service(request)
    return _form_page(request, _values(service), {}, service)


async def edit(request: web.Request) -> web.Response:
    admin = await page.admin(request)
    service = await _service(request)
    form = await _read(request)
    try:
        body = _body(form, service)
        if body:
            await services_api.change_service(request, admin, service.slug, body)
    except (ValidationFailed, Conflict) as exc:
        return _form_page(request, form, _errors(exc, "form"), service, status=exc.status)
    notice = f"Service {service.slug} saved." if body else "Nothing changed."
    return page.redirect(f"{PREFIX}/services", notice)


async def delete_form(request: web.Request) -> web.Response:
    await page.admin(request)
    service = await _service(request)
    return page.render(request, "service_delete.html", {"service": service, "errors": {}})


async def delete(request: web.Request) -> web.Response:
    admin = await page.admin(request)
    service = await _service(request)
    try:
        await services_api.remove_service(request, admin, service.slug)
    except Conflict as exc:  # built in, or keys still use it
        context = {"service": service, "errors": page.field_errors(exc)}
        return page.render(request, "service_delete.html", context, status=exc.status)
    return page.redirect(f"{PREFIX}/services", f"Service {service.slug} deleted.")


async def _service(request: web.Request) -> Service:
    async with request.app[POOL].acquire() as conn:
        return await services.get_service(conn, request.match_info["slug"])


async def _read(request: web.Request) -> dict[str, str]:
    posted = await request.post()
    values = {name: posted.get(name) for name in FIELDS}
    return {name: value for name, value in values.items() if isinstance(value, str)}


def _form_page(
    request: web.Request,
    form: Mapping[str, str],
    errors: Mapping[str, str],
    service: Service | None,
    *,
    status: int = 200,
) -> web.Response:
    context = {
        "form": {name: form.get(name, "") for name in FIELDS},
        "errors": errors,
        "service": service,
        "auth_types": [(kind, kind) for kind in AUTH_TYPES],
        "strategies": [(name, STRATEGY_HELP.get(name, name)) for name in STRATEGIES],
    }
    return page.render(request, "service_form.html", context, status=status)


def _values(service: Service) -> dict[str, str]:
    """An existing service as the form shows it."""
    model = service.cost_model or {}
    prices = model.get("per_million_tokens") or {}
    return {
        "slug": service.slug,
        "name": service.name,
        "base_url": service.base_url,
        "auth_type": service.auth_type,
        "auth_name": service.auth_name or "",
        "hosts": "\n".join(service.hosts),
        "strategy": service.strategy,
        "per_call": str(model.get("per_call", "")),
        "hold": str(model.get("hold", "")),
        "token_prices": "\n".join(f"{m} {p['input']} {p['output']}" for m, p in prices.items()),
    }


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _cost_model(form: Mapping[str, str]) -> dict[str, Any] | None:
    """The form's cost fields as the API's `cost_model` object (checked by the API's own
    validate_cost_model); None when they are all empty."""
    model: dict[str, Any] = {}
    for part in ("per_call", "hold"):
        if form.get(part, "").strip():
            model[part] = form[part].strip()
    prices: dict[str, dict[str, str]] = {}
    for number, line in enumerate(_lines(form.get("token_prices", "")), 1):
        words = line.split()
        if len(words) != 3:
            raise ValidationFailed(
                "token_prices", f"line {number}: write `model input-price output-price`"
            )
        prices[words[0]] = {"input": words[1], "output": words[2]}
    if prices:
        model["per_million_tokens"] = prices
    return model or None


def _body(form: Mapping[str, str], current: Service | None) -> dict[str, Any]:
    """The form as the API's body. Creating (`current` None), empty optional fields are left
    out so the API's defaults apply; editing, only the fields that differ are sent, so the
    audit log names what really changed."""
    auth_name = form.get("auth_name", "").strip()
    body: dict[str, Any] = {
        "name": form.get("name", "").strip(),
        "base_url": form.get("base_url", ""),
        "auth": {"type": form.get("auth_type", ""), "name": auth_name or None},
        "hosts": _lines(form.get("hosts", "")),
        "strategy": form.get("strategy", ""),
        "cost_model": _cost_model(form),
    }
    if current is None:
        optional = ("name", "hosts", "cost_model")
        body = {k: v for k, v in body.items() if k not in optional or v}
        return {"slug": form.get("slug", "").strip(), **body}
    now = current.to_json()
    return {k: v for k, v in body.items() if v != now[k]}


def _errors(exc: ValidationFailed | Conflict, conflict_field: str) -> dict[str, str]:
    """The error next to this form's field. A Conflict names no field: a claimed host is
    reported as `host '...' is already claimed`, anything else is about `conflict_field`."""
    if isinstance(exc, Conflict):
        field = "hosts" if exc.message.startswith("host ") else conflict_field
        return {field: exc.message}
    ((field, message),) = page.field_errors(exc).items()
    if field.startswith(PRICES_ERROR):
        model = field.removeprefix(PRICES_ERROR).lstrip(".")
        return {"token_prices": f"{model}: {message}" if model else message}
    shown = ERROR_FIELDS.get(field, field)
    return {shown if shown in FIELDS else "form": message}


def add_routes(app: web.Application) -> None:
    base = f"{PREFIX}/services"
    app.router.add_get(base, list_, name="ui.services")
    # Before `{slug}`: "new" would otherwise be read as a slug.
    app.router.add_get(f"{base}/new", new_form, name="ui.services.new")
    app.router.add_post(f"{base}/new", create, name="ui.services.create")
    app.router.add_get(f"{base}/{{slug}}", edit_form, name="ui.services.edit")
    app.router.add_post(f"{base}/{{slug}}", edit, name="ui.services.update")
    app.router.add_get(f"{base}/{{slug}}/delete", delete_form, name="ui.services.delete")
    app.router.add_post(f"{base}/{{slug}}/delete", delete, name="ui.services.remove")
