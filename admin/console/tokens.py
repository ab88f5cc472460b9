"""Console pages for wallet tokens: the list, the form that issues one (the token shown this
once, with client snippets), a token's details, and revocation.

Issuing and revoking call the same functions as `/tokens` (admin/tokens_api.py), so
validation, the owner scope (another user's token is a 404), auditing and the gateways'
cache invalidation are the API's own. The token exists in plaintext only in the one 201
response that issues it (sent with `Cache-Control: no-store`); every other page shows its
hint (`AIzaWT_…` and the last four characters), as the API does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final, Literal

from aiohttp import web
from multidict import MultiDictProxy

from admin import tokens_api
from admin.auth import owner_scope
from admin.body import pagination
from admin.console import page, session, snippets
from gateway import limits, services, tokens, users
from gateway.appkeys import POOL, SETTINGS
from gateway.errors import (
    BadRequest,
    Conflict,
    NotFound,
    UnknownService,
    ValidationFailed,
    WalletError,
)
from gateway.ids import parse_id
from gateway.users import User

BASE: Final = f"{page.PREFIX}/tokens"
PER_PAGE: Final = 25
MAX_SERVICES_SHOWN: Final = 1000
# What the form shows again, next to a field, instead of an error page.
FORM_ERRORS: Final = (ValidationFailed, BadRequest, UnknownService, Conflict)
FIELDS: Final = ("name", "expires_at", "budget", "budget_period", "rate_limit")
# The budget periods without their aliases, the default (monthly) first.
BUDGET_PERIODS: Final = tuple(reversed(dict.fromkeys(limits.BUDGET_PERIODS.values())))
BADGES: Final = {"active": "ok", "revoked": "bad", "expired": "warn"}
# validate_budget names the inner field it refuses; the form has one input for each.
ERROR_FIELDS: Final = {"budget.amount": "budget", "budget.period": "budget_period"}
Status = Literal["active", "revoked", "expired"]
Form = MultiDictProxy[Any]


def token_status(record: tokens.TokenRecord, now: datetime) -> Status:
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    return "active"


def body_from_form(typed: dict[str, Any]) -> dict[str, Any]:
    """The form's fields as the JSON values `POST /tokens` takes (empty optional fields are
    null), for `tokens_api.issue_token` to check as it checks the API's."""
    body: dict[str, Any] = {
        "name": typed["name"],
        "services": typed["services"],
        # A datetime-local input sends `2030-01-31T12:00`: ISO 8601, read as UTC.
        "expires_at": typed["expires_at"].strip() or None,
        "budget": None,
        "rate_limit": None,
    }
    if typed["budget"].strip():
        body["budget"] = {"amount": typed["budget"].strip()}
        if typed["budget_period"]:  # otherwise the API's default
            body["budget"]["period"] = typed["budget_period"]
    if typed["rate_limit"].strip():
        body["rate_limit"] = page.form_number(typed["rate_limit"])
    return body


def _errors(exc: WalletError) -> dict[str, str]:
    if isinstance(exc, UnknownService):
        return {"services": exc.message}
    return {ERROR_FIELDS.get(k, k): v for k, v in page.field_errors(exc).items()}


async def _owners(request: web.Request, records: list[tokens.TokenRecord]) -> dict[str, str]:
    """Usernames of the tokens' owners (an ADMIN sees everyone's tokens)."""
    names: dict[str, str] = {}
    async with request.app[POOL].acquire() as conn:
        for owner_id in dict.fromkeys(r.owner_id for r in records):
            try:
                names[owner_id] = (await users.get_user(conn, owner_id)).username
            except NotFound:
                names[owner_id] = "(deleted)"
    return names


# --- the list ---


async def list_page(request: web.Request) -> web.Response:
    user = await page.user(request)
    _, offset = pagination(request)
    async with request.app[POOL].acquire() as conn:
        items, total = await tokens.list_tokens(conn, owner_scope(user), PER_PAGE, offset)
    now = datetime.now(UTC)
    context = {
        "tokens": [(t, token_status(t, now)) for t in items],
        "owners": await _owners(request, items) if user.is_admin else {},
        "total": total,
        "limit": PER_PAGE,
        "offset": offset,
        "query": {},
        "badges": BADGES,
    }
    return page.render(request, "tokens.html", context)


# --- issuing a token ---


async def _new_page(
    request: web.Request,
    user: User,
    typed: dict[str, Any],
    errors: dict[str, str],
    status: int = 200,
) -> web.Response:
    async with request.app[POOL].acquire() as conn:
        known, _ = await services.list_services(conn, MAX_SERVICES_SHOWN, 0)
    context = {
        "typed": typed,
        "errors": errors,
        "services": known,
        "period_options": [(p, p) for p in BUDGET_PERIODS],
        "can_rate_limit": user.is_admin,
    }
    return page.render(request, "token_new.html", context, status=status)


async def new_form(request: web.Request) -> web.Response:
    user = await page.user(request)
    typed: dict[str, Any] = {name: "" for name in FIELDS}
    typed["budget_period"] = "monthly"
    typed["services"] = []
    typed["once"] = session.once_token()
    return await _new_page(request, user, typed, {})


async def issue(request: web.Request) -> web.Response:
    user = await page.user(request)
    form = await request.post()
    typed: dict[str, Any] = {name: page.form_text(form, name) for name in FIELDS}
    typed["services"] = [s for s in form.getall("services", []) if isinstance(s, str)]
    typed["once"] = page.form_text(form, session.ONCE_FIELD)
    # A reload of the page that showed the token posts this form again: it must not issue a
    # second live token that nobody copied.
    if not await session.claim_once(request, typed["once"]):
        raise Conflict(
            "this form was already sent: its token was shown once, on the page that answered "
            "it. Create a new token if that one was not copied (and revoke the other)."
        )
    try:
        record, token = await tokens_api.issue_token(request, user, body_from_form(typed))
    except FORM_ERRORS as exc:
        await session.release_once(request, typed["once"])
        return await _new_page(
            request, user, typed, _errors(exc), 409 if isinstance(exc, Conflict) else 422
        )
    context = {
        "token": record,
        "secret": token.reveal(),  # this response only: never stored, never shown again
        "snippets": snippets.for_token(
            request.app[SETTINGS].gateway_url, token.reveal(), record.services
        ),
    }
    return page.render(request, "token_created.html", context, status=201)


# --- one token ---


async def detail(request: web.Request) -> web.Response:
    user = await page.user(request)
    async with request.app[POOL].acquire() as conn:
        record = await tokens.get_token(conn, owner_scope(user), request.match_info["id"])
    context = {
        "token": record,
        "status": token_status(record, datetime.now(UTC)),
        "owner": (await _owners(request, [record]))[record.owner_id],
        "badges": BADGES,
    }
    return page.render(request, "token.html", context)


async def revoke(request: web.Request) -> web.Response:
    user = await page.user(request)
    token_id = request.match_info["id"]
    await tokens_api.revoke_token(request, user, token_id)
    return page.redirect(
        f"{BASE}/{parse_id(token_id, 'token')}", "Token revoked: every gateway refuses it now."
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get(BASE, list_page, name="ui.tokens")
    app.router.add_get(f"{BASE}/new", new_form, name="ui.tokens.new")
    app.router.add_post(f"{BASE}/new", issue, name="ui.tokens.issue")
    app.router.add_get(BASE + "/{id}", detail, name="ui.tokens.detail")
    app.router.add_post(BASE + "/{id}/revoke", revoke, name="ui.tokens.revoke")
