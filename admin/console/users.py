"""Console pages for accounts (ADMIN only): list, create, edit (role, enabled, rate tier,
budget), reset a password, delete. Every rule, the last active ADMIN's included, is applied
by the functions behind `/users` (admin/users_api.py).

A password never goes back into a page: forms shown again keep what was typed except it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from aiohttp import web
from multidict import MultiDictProxy

from admin import users_api
from admin.body import pagination
from admin.console import page
from admin.console.page import PREFIX
from gateway import users
from gateway.appkeys import POOL, SETTINGS
from gateway.errors import Conflict, Forbidden, ValidationFailed
from gateway.users import ROLES, User

NEW_FIELDS: Final = ("username", "password", "role", "tier")
EDIT_FIELDS: Final = ("role", "enabled", "tier", "budget", "budget_period")
PASSWORD_FIELDS: Final = ("new_password", "current_password")
SECRET_FIELDS: Final = frozenset({"password", *PASSWORD_FIELDS})
PERIODS: Final = ("minute", "hour", "daily", "monthly")
ERROR_FIELDS: Final = {"budget.amount": "budget", "budget.period": "budget_period"}
NO_CHANGES: Final = users_api.UserChanges(None, None, users.UNCHANGED, users.UNCHANGED)
Form = Mapping[str, str]


async def list_(request: web.Request) -> web.Response:
    await page.admin(request)
    limit, offset = pagination(request)
    async with request.app[POOL].acquire() as conn:
        items, total = await users.list_users(conn, limit, offset)
    context = {"users": items, "total": total, "limit": limit, "offset": offset}
    return page.render(request, "users.html", context)


async def new_form(request: web.Request) -> web.Response:
    await page.admin(request)
    return _new_page(request, {"role": "USER"}, {})


async def create(request: web.Request) -> web.Response:
    admin = await page.admin(request)
    form = _strings(await request.post(), NEW_FIELDS)
    body: dict[str, Any] = {**form, "tier": form.get("tier") or None}
    try:
        created = await users_api.add_user(request, admin, body)
    except (ValidationFailed, Conflict) as exc:
        return _new_page(request, form, _errors(exc, "username"), status=exc.status)
    return page.redirect(f"{PREFIX}/users", f"User {created.username} created.")


async def edit_form(request: web.Request) -> web.Response:
    await page.admin(request)
    user = await _user(request)
    return _edit_page(request, user, _values(user), {})


async def edit(request: web.Request) -> web.Response:
    """The edit form and the password form both post here; each sends only its own fields,
    and a field left out stays as it is."""
    admin = await page.admin(request)
    user = await _user(request)
    posted = await request.post()
    form = _strings(posted, EDIT_FIELDS + PASSWORD_FIELDS)
    if "enabled" in form:  # a hidden "off" comes before the checkbox: see _edit_body
        form["enabled"] = "on" if "on" in posted.getall("enabled") else ""
    done: list[str] = []
    try:
        # The whole edit is validated before the password changes, the password before the
        # edit is applied: a refused form changes nothing (but for the last-ADMIN rule).
        changes = users_api.user_changes(request, _edit_body(form, user))
        if "new_password" in form:
            await _reset_password(request, admin, user, form)
            done.append("password reset")
        if changes != NO_CHANGES:
            user = await users_api.change_user(request, admin, user.id, changes)
            done.append("saved")
    except (ValidationFailed, Conflict) as exc:
        typed = {**_values(user), **form}
        return _edit_page(request, user, typed, _errors(exc), status=exc.status)
    if user.id == admin.id and not (user.is_admin and user.enabled):
        return page.redirect(f"{PREFIX}/", "You are no longer an ADMIN.")
    notice = f"User {user.username}: {', '.join(done)}." if done else "Nothing changed."
    return page.redirect(f"{PREFIX}/users", notice)


async def _reset_password(request: web.Request, admin: User, user: User, form: Form) -> None:
    """An ADMIN resets anyone's password; their own needs their current one (as the API)."""
    body = {k: v for k, v in form.items() if k in PASSWORD_FIELDS}
    try:
        await users_api.set_password(request, admin, user.id, body)
    except Forbidden as exc:  # the current password is wrong
        raise ValidationFailed("current_password", "is wrong") from exc


async def delete_form(request: web.Request) -> web.Response:
    await page.admin(request)
    user = await _user(request)
    return page.render(request, "user_delete.html", {"user": user, "errors": {}})


async def delete(request: web.Request) -> web.Response:
    admin = await page.admin(request)
    user = await _user(request)
    try:
        await users_api.remove_user(request, admin, user.id)
    except Conflict as exc:  # the last active ADMIN
        context = {"user": user, "errors": page.field_errors(exc)}
        return page.render(request, "user_delete.html", context, status=exc.status)
    return page.redirect(f"{PREFIX}/users", f"User {user.username} deleted.")


async def _user(request: web.Request) -> User:
    async with request.app[POOL].acquire() as conn:
        return await users.get_user(conn, request.match_info["id"])


def _strings(posted: MultiDictProxy[Any], names: tuple[str, ...]) -> dict[str, str]:
    values = {name: posted.get(name) for name in names}
    return {name: value for name, value in values.items() if isinstance(value, str)}


def _edit_body(form: Form, current: User) -> dict[str, Any]:
    """The edit form as the API's body: the fields it sent that differ from `current` (so the
    audit log names what really changed). The form sends a hidden `enabled=off` before the
    checkbox, so that "unchecked" and "not sent" differ."""
    body: dict[str, Any] = {}
    if "role" in form:
        body["role"] = form["role"]
    if "enabled" in form:
        body["enabled"] = form["enabled"] == "on"
    if "tier" in form:
        body["tier"] = form["tier"] or None
    if "budget" in form:
        amount = form["budget"].strip()
        period = form.get("budget_period") or "monthly"
        body["budget"] = {"amount": amount, "period": period} if amount else None
    now = {**current.to_json(), "tier": current.tier}
    return {name: value for name, value in body.items() if value != now[name]}


def _values(user: User) -> dict[str, str]:
    return {
        "role": user.role,
        "enabled": "on" if user.enabled else "",
        "tier": user.tier or "",
        "budget": user.budget.to_json()["amount"] if user.budget else "",
        "budget_period": user.budget.period if user.budget else "monthly",
    }


def _errors(exc: ValidationFailed | Conflict, conflict_field: str = "form") -> dict[str, str]:
    if isinstance(exc, Conflict):
        return {conflict_field: exc.message}
    ((field, message),) = page.field_errors(exc).items()
    return {ERROR_FIELDS.get(field, field): message}


def _choices(request: web.Request) -> dict[str, Any]:
    tiers = request.app[SETTINGS].rate_limit_tiers
    return {
        "roles": [(role, role) for role in ROLES],
        "tiers": [("", "the role's default")]
        + [(name, f"{name} ({tiers[name] or 'unlimited'} per minute)") for name in sorted(tiers)],
        "periods": [(period, period) for period in PERIODS],
    }


def _new_page(
    request: web.Request, form: Form, errors: Mapping[str, str], *, status: int = 200
) -> web.Response:
    shown = {name: form.get(name, "") for name in NEW_FIELDS if name not in SECRET_FIELDS}
    context = {"form": shown, "errors": errors, **_choices(request)}
    return page.render(request, "user_new.html", context, status=status)


def _edit_page(
    request: web.Request,
    user: User,
    form: Form,
    errors: Mapping[str, str],
    *,
    status: int = 200,
) -> web.Response:
    shown = {name: form.get(name, "") for name in EDIT_FIELDS}
    me = request[page.CONSOLE_USER]
    context = {"user": user, "form": shown, "errors": errors, "is_me": user.id == me.id}
    return page.render(request, "user.html", {**context, **_choices(request)}, status=status)


def add_routes(app: web.Application) -> None:
    base = f"{PREFIX}/users"
    app.router.add_get(base, list_, name="ui.users")
    app.router.add_get(f"{base}/new", new_form, name="ui.users.new")
    app.router.add_post(f"{base}/new", create, name="ui.users.create")
    app.router.add_get(f"{base}/{{id}}", edit_form, name="ui.users.edit")
    app.router.add_post(f"{base}/{{id}}", edit, name="ui.users.update")
    app.router.add_get(f"{base}/{{id}}/delete", delete_form, name="ui.users.delete")
    app.router.add_post(f"{base}/{{id}}/delete", delete, name="ui.users.remove")
