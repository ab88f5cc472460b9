"""`POST /proxy`: the JSON envelope of the original product, turned into a proxied request.

`{"endpoint": "/v1/charges", "method": "POST", "body": {...}, "headers": {...},
"query": {...}, "service": "stripe"}`; the service may come from `X-Service-Hint` instead.
`endpoint` is a path on the service, never a URL.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final
from urllib.parse import quote, urlencode

from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import BadRequest, InvalidJson, ValidationFailed
from gateway.proxy import Inbound, forward

METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
FORM: Final = "application/x-www-form-urlencoded"
# Services whose APIs take form bodies by default (Stripe's `a[b]=c` convention).
FORM_SERVICES: Final = frozenset({"stripe"})
PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"
ENVELOPE_FIELDS: Final = frozenset({"endpoint", "method", "body", "headers", "query", "service"})


class BadEndpoint(BadRequest):
    code = "bad_endpoint"


def form_pairs(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Flatten nested JSON into Stripe's form convention: `a[b]=c`, `items[0][price]=p`."""
    if isinstance(value, dict):
        pairs: list[tuple[str, str]] = []
        for k, v in value.items():
            pairs += form_pairs(v, f"{prefix}[{k}]" if prefix else str(k))
        return pairs
    if isinstance(value, list):
        pairs = []
        for i, v in enumerate(value):
            pairs += form_pairs(v, f"{prefix}[{i}]")
        return pairs
    if isinstance(value, bool):
        return [(prefix, "true" if value else "false")]
    return [(prefix, "" if value is None else str(value))]


def _endpoint(value: object) -> tuple[str, str]:
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//"):
        raise BadEndpoint("endpoint must be a path on the service, starting with a single '/'")
    if "://" in value or "\\" in value or any(ord(c) < 0x21 for c in value):
        raise BadEndpoint("endpoint must be a path on the service, not a URL")
    path, _, query = value.partition("?")
    return quote(path, safe=PATH_SAFE), query


HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
HEADER_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _headers(value: object) -> CIMultiDict[str]:
    if value is None:
        return CIMultiDict()
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValidationFailed("headers", "must be an object of string values")
    out: CIMultiDict[str] = CIMultiDict()
    for name, v in value.items():
        if not HEADER_NAME.fullmatch(name) or HEADER_CONTROL.search(v):
            raise ValidationFailed(
                "headers", "names must be HTTP tokens and values single lines of text"
            )
        # The gateway encodes the body itself: a client's length would truncate it, or leave
        # the upstream waiting for bytes that never come.
        if name.lower() == "content-length":
            continue
        out[name] = v
    return out


def _query(value: object, endpoint_query: str) -> str:
    if value is None:
        return endpoint_query
    if not isinstance(value, dict):
        raise ValidationFailed("query", "must be an object")
    pairs: list[tuple[str, str]] = []
    for k, v in value.items():
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, dict | list):
                raise ValidationFailed("query", "values must be strings, numbers or lists")
            pairs.append((k, json.dumps(item) if isinstance(item, bool) else str(item)))
    encoded = urlencode(pairs)
    return "&".join(p for p in (endpoint_query, encoded) if p)


def _body(service: str, body: object, headers: CIMultiDict[str]) -> bytes | None:
    if body is None:
        return None
    content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not content_type:
        content_type = FORM if service in FORM_SERVICES else "application/json"
        headers["Content-Type"] = content_type
    if isinstance(body, str):
        return body.encode()
    if content_type == FORM:
        return urlencode(form_pairs(body)).encode()
    return json.dumps(body).encode()


async def handle(request: web.Request) -> web.StreamResponse:
    try:
        envelope = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise InvalidJson("the /proxy body must be a JSON envelope") from None
    if not isinstance(envelope, dict):
        raise ValidationFailed("body", "must be a JSON object")
    unknown = sorted(set(envelope) - ENVELOPE_FIELDS)
    if unknown:
        raise ValidationFailed(unknown[0], "unknown envelope field")
    service = request.headers.get("X-Service-Hint") or envelope.get("service")
    if not isinstance(service, str) or not service:
        raise ValidationFailed("service", "say which service (X-Service-Hint or `service`)")
    path, endpoint_query = _endpoint(envelope.get("endpoint"))
    headers = _headers(envelope.get("headers"))
    method = envelope.get("method") or ("POST" if envelope.get("body") is not None else "GET")
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise ValidationFailed("method", f"must be one of {', '.join(sorted(METHODS))}")
    body = _body(service, envelope.get("body"), headers)
    # The token comes from the envelope's own request, never from the inner headers.
    for name in ("Authorization", "X-Wallet-Token"):
        headers.popall(name, None)
    if token := request.headers.get("X-Wallet-Token"):
        headers["X-Wallet-Token"] = token
    elif auth := request.headers.get("Authorization"):
        headers["Authorization"] = auth
    inbound = Inbound(
        service, method.upper(), path, _query(envelope.get("query"), endpoint_query), headers, body
    )
    return await forward(request, inbound)
