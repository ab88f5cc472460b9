"""Reading client input: JSON bodies, pagination and field checks, with clear 4xx errors."""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

from gateway.errors import InvalidJson, UnsupportedMediaType, ValidationFailed

DEFAULT_LIMIT: Final = 50
JSON_TYPES: Final = ("application/json", "application/x-www-form-urlencoded", "")
MAX_LIMIT: Final = 500


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; 415/400/422 otherwise (413 comes from aiohttp)."""
    # curl -d labels bodies application/x-www-form-urlencoded by default; the body itself is
    # still parsed as JSON or refused, so accepting that label only spares a confusing 415.
    content_type = request.content_type
    if content_type not in JSON_TYPES and not content_type.endswith("+json"):
        raise UnsupportedMediaType("send a JSON body with Content-Type: application/json")
    raw = await request.read()
    if not raw.strip():
        raise InvalidJson("the request body is empty; a JSON object is expected")
    try:
        value = json.loads(raw)
        # A lone surrogate (`"\ud800"`) parses but is not text: nothing downstream (hashing,
        # argon2, PostgreSQL) can encode it. UnicodeEncodeError is a ValueError.
        json.dumps(value, ensure_ascii=False).encode()
    except (ValueError, RecursionError):
        raise InvalidJson("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValidationFailed("body", "must be a JSON object")
    return value


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    # isascii: str.isdigit() also accepts digits int() refuses, such as "³".
    if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) <= hi:
        raise ValidationFailed(name, f"must be a whole number from {lo} to {hi}")
    return int(raw)


def pagination(request: web.Request) -> tuple[int, int]:
    return (
        _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT),
        _int_param(request, "offset", 0, 0, 10**9),
    )


def optional_str(body: dict[str, Any], name: str, max_len: int = 200) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise ValidationFailed(name, f"must be a non-empty string of at most {max_len} chars")
    return value.strip()


def optional_bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ValidationFailed(name, "must be true or false")
    return value


def reject_unknown(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationFailed(unknown[0], f"unknown field; allowed: {', '.join(sorted(allowed))}")


def list_response(items: list[dict[str, Any]], total: int) -> web.Response:
    return web.json_response({"items": items, "total": total})
