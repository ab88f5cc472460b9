"""Credential handling (pure): find the wallet token a client presented, strip it and every
client credential from the request, and put the real key where the service expects it.

Nothing the client sent in a credential slot ever reaches the upstream: the outbound headers
and query are rebuilt here, and this is the only module that writes a key into them.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.secret import Secret
from gateway.tokens import PREFIX

REDACTED: Final = "[redacted]"
REDACTED_BYTES: Final = REDACTED.encode()
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers the gateway sets itself (aiohttp negotiates encoding and decompresses).
REQUEST_DROP: Final = HOP_BY_HOP | {"host", "accept-encoding"}
# Headers that describe the client or the gateway, never forwarded.
CLIENT_ONLY: Final = frozenset(
    {
        "authorization",
        "cookie",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-port",
        "x-real-ip",
        "x-service-hint",
        "x-wallet-token",
    }
)
_NOT_FORWARDED: Final = REQUEST_DROP | CLIENT_ONLY
# Response headers never relayed to the client (hop-by-hop, or describing a body we re-encode).
RESPONSE_DROP: Final = HOP_BY_HOP | {"content-encoding", "content-length", "set-cookie"}


@dataclass(frozen=True)
class AuthSlot:
    """Where a service takes its key: `bearer`, `basic`, a named `header` or `query` param."""

    type: str
    name: str | None


@functools.lru_cache(maxsize=1024)
def auth_slot(auth_type: str, auth_name: str | None) -> AuthSlot:
    """The AuthSlot of a service's auth scheme, made once (it is the same for every request)."""
    return AuthSlot(auth_type, auth_name)


def _basic_parts(value: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    user, _, password = decoded.partition(":")
    return user, password


def _is_token(value: str) -> bool:
    return value.startswith(PREFIX)


def _carries_token(value: str) -> bool:
    """Anywhere in a header or query value: a wallet token is never sent upstream."""
    return PREFIX in value


def _basic_value(secret: str) -> str:
    pair = secret if ":" in secret else f"{secret}:"
    return base64.b64encode(pair.encode()).decode()


def key_forms(secret: str) -> tuple[str, ...]:
    """Every form in which a key is written into an upstream request, longest first: as is
    (bearer, named header), percent-encoded (query) and base64 (basic auth). An upstream
    that echoes its request back echoes one of these."""
    forms = {secret, quote(secret, safe=""), _basic_value(secret)} if secret else set()
    return tuple(sorted(forms, key=len, reverse=True))


def redact(value: str, forms: tuple[str, ...]) -> str:
    """`value` with every form of the key (see `key_forms`) replaced by REDACTED."""
    for form in forms:
        if form in value:
            value = value.replace(form, REDACTED)
    return value


def redact_bytes(data: bytes, forms: tuple[str, ...]) -> bytes:
    for form in forms:
        needle = form.encode()
        if needle in data:
            data = data.replace(needle, REDACTED_BYTES)
    return data


def find_token(
    headers: Mapping[str, str], query: Iterable[tuple[str, str]], slot: AuthSlot
) -> Secret[str] | None:
    """The wallet token from `X-Wallet-Token`, `Authorization` (bearer or basic), the service's
    own header, or any query parameter; None when no wallet token is present."""
    if value := headers.get("X-Wallet-Token", "").strip():
        return Secret(value)
    scheme, _, credential = headers.get("Authorization", "").strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() == "bearer" and _is_token(credential):
        return Secret(credential)
    if scheme.lower() == "basic":
        for part in _basic_parts(credential):
            if _is_token(part):
                return Secret(part)
    if slot.type == "header" and slot.name and _is_token(headers.get(slot.name, "").strip()):
        return Secret(headers[slot.name].strip())
    for _, value in query:
        if _is_token(value):
            return Secret(value)
    return None


def upstream_headers(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str], slot: AuthSlot, key: Secret[str]
) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop and client credentials, plus the real key."""
    out: CIMultiDict[str] = CIMultiDict()
    own = slot.name.lower() if slot.type == "header" and slot.name else None
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _NOT_FORWARDED or lower.startswith("x-wallet-") or lower == own:
            continue
        if _carries_token(value):
            continue
        out.add(name, value)
    secret = key.reveal()
    if slot.type == "bearer":
        out["Authorization"] = f"Bearer {secret}"
    elif slot.type == "basic":
        out["Authorization"] = "Basic " + _basic_value(secret)
    elif slot.type == "header" and slot.name:
        out[slot.name] = secret
    return out


def upstream_query(raw_query: str, slot: AuthSlot, key: Secret[str]) -> str:
    """The raw query minus any wallet token and the service's key parameter, plus the key."""
    kept = []
    for pair in raw_query.split("&") if raw_query else []:
        name, _, value = pair.partition("=")
        if _carries_token(unquote_plus(value)) or _carries_token(unquote_plus(name)):
            continue
        if slot.type == "query" and unquote_plus(name) == slot.name:
            continue
        kept.append(pair)
    if slot.type == "query" and slot.name:
        kept.append(f"{quote(slot.name, safe='')}={quote(key.reveal(), safe='')}")
    return "&".join(kept)


def response_headers(upstream: CIMultiDictProxy[str], forms: tuple[str, ...]) -> CIMultiDict[str]:
    """Upstream response headers to relay: hop-by-hop dropped, any echo of the key (in any of
    its `key_forms`) scrubbed from values, and a header whose name echoes it dropped."""
    # A text shorter than every form cannot hold one: most names and values are.
    shortest = min(map(len, forms)) if forms else 0
    lowered: tuple[str, ...] | None = None
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in RESPONSE_DROP:
            continue
        if forms and len(lower) >= shortest:
            if lowered is None:
                lowered = tuple(form.lower() for form in forms)
            if any(form in lower for form in lowered):
                continue
        out.add(name, redact(value, forms) if forms and len(value) >= shortest else value)
    return out


def response_reason(reason: str | None, forms: tuple[str, ...]) -> str | None:
    """The upstream's reason phrase with any echo of the key (any of `key_forms`) scrubbed."""
    return None if reason is None else redact(reason, forms)
