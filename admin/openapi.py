"""The OpenAPI 3.1 document of the admin API (served at `/openapi.json`)."""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

J = dict[str, Any]

STR: Final[J] = {"type": "string"}
INT: Final[J] = {"type": "integer"}
BOOL: Final[J] = {"type": "boolean"}
TIME: Final[J] = {"type": "string", "format": "date-time"}
ID: Final[J] = {"type": "string", "format": "uuid"}
RATE_LIMIT: Final[J] = {
    "type": ["integer", "null"],
    "minimum": 0,
    "description": "Requests per minute for this token (ADMIN only; 0: unlimited); "
    "null: its owner's tier.",
}


def _ref(name: str) -> J:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: J, required: tuple[str, ...] = (), extra: bool = False) -> J:
    schema: J = {"type": "object", "properties": props, "additionalProperties": extra}
    if required:
        schema["required"] = list(required)
    return schema


def _list_of(name: str) -> J:
    return _obj({"items": {"type": "array", "items": _ref(name)}, "total": INT}, ("items", "total"))


SCHEMAS: Final[J] = {
    "Error": _obj(
        {
            "error": _obj(
                {"code": STR, "message": STR, "request_id": STR},
                ("code", "message", "request_id"),
                extra=True,
            )
        },
        ("error",),
    ),
    "Login": _obj({"username": STR, "password": STR}, ("username", "password")),
    "Session": _obj(
        {"token": STR, "expires_at": TIME, "user": _obj({"id": ID, "username": STR, "role": STR})},
        ("token", "expires_at", "user"),
    ),
    "Metadata": _obj(
        {
            "type": STR,
            "quota": {"type": "integer", "minimum": 0},
            "quotaPeriod": {
                "enum": ["minute", "hour", "hourly", "daily", "day", "monthly", "month"]
            },
            "weight": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000000},
            "maxConcurrency": {"type": "integer", "minimum": 1, "maximum": 1000000},
        },
        extra=True,
    ),
    "Key": _obj(
        {
            "id": ID,
            "owner_id": ID,
            "service": STR,
            "tier": {"enum": ["free", "paid"]},
            "name": STR,
            "priority": INT,
            "enabled": BOOL,
            "status": STR,
            "masked": STR,
            "metadata": _ref("Metadata"),
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "NewKey": _obj(
        {
            "key": {"type": "string", "minLength": 1},
            "service": STR,
            "tier": {"enum": ["free", "paid"]},
            "name": STR,
            "priority": INT,
            "enabled": BOOL,
            "metadata": _ref("Metadata"),
        },
        ("key",),
    ),
    "KeyChange": _obj(
        {
            "key": STR,
            "tier": {"enum": ["free", "paid"]},
            "name": STR,
            "priority": INT,
            "enabled": BOOL,
            "metadata": _ref("Metadata"),
            "status": {"enum": ["active"]},
        }
    ),
    "Service": _obj(
        {
            "slug": STR,
            "name": STR,
            "base_url": STR,
            "builtin": BOOL,
            "auth": _obj(
                {
                    "type": {"enum": ["bearer", "basic", "header", "query"]},
                    "name": {"type": ["string", "null"]},
                }
            ),
            "hosts": {"type": "array", "items": STR},
            "strategy": _ref("Strategy"),
            "cost_model": _ref("CostModel"),
        }
    ),
    "Strategy": {
        "enum": ["priority", "round_robin", "least_used", "weighted"],
        "description": "How keys of the same tier and priority share requests: the oldest "
        "first, in turn, the one with the fewest requests in its quota window, or at random "
        "by metadata.weight.",
    },
    "CostModel": {
        "type": ["object", "null"],
        "properties": {
            "per_call": STR,
            "per_million_tokens": {
                "type": "object",
                "additionalProperties": _obj({"input": STR, "output": STR}),
            },
            "hold": STR,
        },
        "additionalProperties": False,
        "description": "Decimal amounts (strings or numbers); null: requests cost nothing.",
    },
    "NewService": _obj(
        {
            "slug": STR,
            "name": STR,
            "base_url": STR,
            "auth": _obj(
                {"type": {"enum": ["bearer", "basic", "header", "query"]}, "name": STR}, ("type",)
            ),
            "hosts": {"type": "array", "items": STR},
            "strategy": _ref("Strategy"),
            "cost_model": _ref("CostModel"),
        },
        ("slug", "base_url", "auth"),
    ),
    "ServiceChange": _obj(
        {
            "name": STR,
            "base_url": STR,
            "hosts": {"type": "array", "items": STR},
            "auth": _obj(
                {"type": {"enum": ["bearer", "basic", "header", "query"]}, "name": STR}, ("type",)
            ),
            "strategy": _ref("Strategy"),
            "cost_model": _ref("CostModel"),
        }
    ),
    "Token": _obj(
        {
            "id": ID,
            "owner_id": ID,
            "name": STR,
            "services": {"type": "array", "items": STR},
            "hint": STR,
            "created_at": TIME,
            "expires_at": {"type": ["string", "null"]},
            "revoked_at": {"type": ["string", "null"]},
            "budget": _ref("Budget"),
            "rate_limit": RATE_LIMIT,
            "token": STR,
        }
    ),
    "Budget": {
        "type": ["object", "null"],
        "properties": {
            "amount": {"type": ["string", "number"]},
            "period": {"enum": ["minute", "hour", "daily", "monthly"]},
        },
        "required": ["amount"],
        "additionalProperties": False,
        "description": "At most `amount` spent per UTC `period` (default monthly); null: none.",
    },
    "TokenChange": _obj({"name": STR, "budget": _ref("Budget"), "rate_limit": RATE_LIMIT}),
    "NewToken": _obj(
        {
            "name": STR,
            "services": {"type": "array", "items": STR, "minItems": 1},
            "expires_at": {"type": ["string", "null"], "format": "date-time"},
            "budget": _ref("Budget"),
            "rate_limit": RATE_LIMIT,
        },
        ("name", "services"),
    ),
    "User": _obj(
        {
            "id": ID,
            "username": STR,
            "role": {"enum": ["USER", "ADMIN"]},
            "enabled": BOOL,
            "tier": STR,
            "budget": _ref("Budget"),
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "NewUser": _obj(
        {
            "username": STR,
            "password": {"type": "string", "minLength": 12},
            "role": {"enum": ["USER", "ADMIN"]},
        },
        ("username", "password"),
    ),
    "UserChange": _obj(
        {
            "role": {"enum": ["USER", "ADMIN"]},
            "enabled": BOOL,
            "tier": {
                "type": ["string", "null"],
                "description": "A tier of RATE_LIMIT_TIERS; null: by role (admin or free).",
            },
            "budget": _ref("Budget"),
        }
    ),
    "PasswordChange": _obj(
        {"current_password": STR, "new_password": {"type": "string", "minLength": 12}},
        ("new_password",),
    ),
    "AuditRecord": _obj(
        {
            "seq": INT,
            "at": TIME,
            "actor_id": {"type": ["string", "null"]},
            "actor": STR,
            "action": STR,
            "target_type": STR,
            "target_id": {"type": ["string", "null"]},
            "source": STR,
            "details": {"type": "object"},
            "hash": STR,
        }
    ),
    "AuditVerdict": _obj(
        {
            "ok": BOOL,
            "checked": INT,
            "head_seq": INT,
            "head_hash": STR,
            "breaks": {"type": "array", "items": _obj({"seq": INT, "problem": STR})},
        }
    ),
    "Health": _obj(
        {
            "status": {"enum": ["ok", "degraded"]},
            "checks": _obj({"postgres": STR, "redis": STR, "vault": STR}),
        }
    ),
    # Analytics: counts are integers, costs decimal strings ("12.34"), times ISO 8601 UTC.
    "Overview": _obj(
        {
            "from": TIME,
            "to": TIME,
            "totals": _obj({"requests": INT, "errors": INT, "fallbacks": INT, "cost": STR}),
            "by_service": {
                "type": "array",
                "items": _obj(
                    {"service": STR, "requests": INT, "errors": INT, "fallbacks": INT, "cost": STR}
                ),
            },
            "by_key": {
                "type": "array",
                "items": _obj(
                    {
                        "key_id": ID,
                        "service": STR,
                        "name": {"type": ["string", "null"]},
                        "tier": {"type": ["string", "null"]},
                        "deleted": BOOL,
                        "requests": INT,
                        "errors": INT,
                        "fallbacks": INT,
                        "cost": STR,
                        "quota": {"type": ["integer", "null"]},
                        "period": {"type": ["string", "null"]},
                        "quota_used": {"type": ["integer", "null"]},
                        "quota_left": {"type": ["integer", "null"]},
                        "resets_at": {"type": ["string", "null"], "format": "date-time"},
                    }
                ),
            },
            "quota_state": {"enum": ["ok", "unavailable"]},
        },
        ("totals", "by_service", "by_key"),
    ),
    "Usage": _obj(
        {
            "granularity": {"enum": ["hour", "day", "month"]},
            "from": TIME,
            "to": TIME,
            "series": {
                "type": "array",
                "items": _obj(
                    {"ts": TIME, "requests": INT, "errors": INT, "fallbacks": INT, "cost": STR}
                ),
            },
        },
        ("granularity", "series"),
    ),
}
ANALYTICS_FILTERS: Final = [
    {"name": "from", "in": "query", "schema": TIME},
    {"name": "to", "in": "query", "schema": TIME},
    {"name": "service", "in": "query", "schema": STR},
    {"name": "key", "in": "query", "schema": ID},
    {"name": "user", "in": "query", "schema": ID},
]
TOP_KEYS: Final[J] = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
}
GRANULARITY: Final[J] = {
    "name": "granularity",
    "in": "query",
    "schema": {"enum": ["hour", "day", "month"]},
}

ERRORS: Final[J] = {
    str(code): {"description": text, "content": {"application/json": {"schema": _ref("Error")}}}
    for code, text in (
        (400, "Bad request"),
        (401, "Not authenticated"),
        (403, "Forbidden"),
        (404, "Not found"),
        (409, "Conflict"),
        (413, "Body too large"),
        (415, "Not JSON"),
        (422, "Invalid field"),
        (429, "Throttled"),
        (503, "A dependency is down or the vault is sealed"),
    )
}
PAGING: Final = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
    {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}},
]


def _op(
    summary: str,
    *,
    body: str | None = None,
    ok: tuple[int, str | None] = (200, None),
    params: list[J] | None = None,
    auth: bool = True,
) -> J:
    status, schema = ok
    response: J = {"description": "Success"}
    if schema is not None:
        response["content"] = {
            "application/json": {
                "schema": _ref(schema) if not schema.startswith("#") else _list_of(schema[1:])
            }
        }
    op: J = {
        "summary": summary,
        "responses": {str(status): response, **ERRORS},
        "parameters": list(params or []),
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if not auth:
        op["security"] = []
    return op


def _path(name: str, fmt: str | None = None) -> J:
    schema: J = {"type": "string"}
    if fmt:
        schema["format"] = fmt
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(*names: str) -> list[J]:
    return [{"name": n, "in": "query", "schema": STR} for n in names]


def document() -> J:
    key_id, token_id, user_id, slug = (
        _path("id", "uuid"),
        _path("id", "uuid"),
        _path("id"),
        _path("slug"),
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "API Key Wallet admin API", "version": "0.1.0"},
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/auth/login": {"post": _op("Log in", body="Login", ok=(200, "Session"), auth=False)},
            "/keys": {
                "get": _op(
                    "List keys (masked)",
                    ok=(200, "#Key"),
                    params=PAGING + _query("service", "tier", "status"),
                ),
                "post": _op("Add a key", body="NewKey", ok=(201, "Key")),
            },
            "/keys/{id}": {
                "get": _op("Show a key", ok=(200, "Key"), params=[key_id]),
                "put": _op(
                    "Change or rotate a key", body="KeyChange", ok=(200, "Key"), params=[key_id]
                ),
                "delete": _op("Delete a key", ok=(204, None), params=[key_id]),
            },
            "/services": {
                "get": _op("List services", ok=(200, "#Service"), params=PAGING),
                "post": _op("Add a service (ADMIN)", body="NewService", ok=(201, "Service")),
            },
            "/services/{slug}": {
                "get": _op("Show a service", ok=(200, "Service"), params=[slug]),
                "put": _op(
                    "Change a service (ADMIN)",
                    body="ServiceChange",
                    ok=(200, "Service"),
                    params=[slug],
                ),
                "delete": _op("Delete a custom service (ADMIN)", ok=(204, None), params=[slug]),
            },
            "/tokens": {
                "get": _op("List tokens", ok=(200, "#Token"), params=PAGING),
                "post": _op("Create a token (shown once)", body="NewToken", ok=(201, "Token")),
            },
            "/tokens/{id}": {
                "get": _op("Show a token", ok=(200, "Token"), params=[token_id]),
                "put": _op(
                    "Change a token's name, budget or (ADMIN) rate limit",
                    body="TokenChange",
                    ok=(200, "Token"),
                    params=[token_id],
                ),
                "delete": _op("Revoke a token", ok=(204, None), params=[token_id]),
            },
            "/users": {
                "get": _op("List users (ADMIN)", ok=(200, "#User"), params=PAGING),
                "post": _op("Create a user (ADMIN)", body="NewUser", ok=(201, "User")),
            },
            "/users/{id}": {
                "get": _op(
                    "Show a user (self or ADMIN; `me` works)", ok=(200, "User"), params=[user_id]
                ),
                "put": _op(
                    "Change role, enabled, rate-limit tier or budget (ADMIN)",
                    body="UserChange",
                    ok=(200, "User"),
                    params=[user_id],
                ),
                "delete": _op("Delete a user (ADMIN)", ok=(204, None), params=[user_id]),
            },
            "/users/{id}/password": {
                "put": _op(
                    "Change a password", body="PasswordChange", ok=(204, None), params=[user_id]
                )
            },
            "/audit": {
                "get": _op(
                    "Audit records (ADMIN)",
                    ok=(200, "#AuditRecord"),
                    params=PAGING + _query("q", "action", "target_type", "target_id", "actor"),
                )
            },
            "/audit/verify": {
                "get": _op("Verify the audit chain (ADMIN)", ok=(200, "AuditVerdict"))
            },
            "/analytics/overview": {
                "get": _op(
                    "Totals, per service and per key with quota left (a USER: own usage)",
                    ok=(200, "Overview"),
                    params=[*ANALYTICS_FILTERS, TOP_KEYS],
                )
            },
            "/analytics/usage": {
                "get": _op(
                    "Usage time series (a USER: own usage)",
                    ok=(200, "Usage"),
                    params=[*ANALYTICS_FILTERS, GRANULARITY],
                )
            },
            "/monitoring/health": {"get": _op("Health", ok=(200, "Health"), auth=False)},
            "/monitoring/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [],
                    "responses": {"200": {"description": "text"}},
                }
            },
        },
    }


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document())
