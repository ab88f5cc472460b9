"""Upstream signals: what a provider's answer says about the key it was sent with (pure).

`classify(service, status, headers, body)` turns an answer into a Verdict, from one table of
rules per service (first match wins), then the rules every service shares: 429 rate limited,
401 invalid. The body is the answer's first bytes when small enough to judge (forward.py reads
at most JUDGE_BODY_BYTES, already decompressed by aiohttp), or None when it was not read; a
rule that needs the body then does not match and the status decides.

Only error answers are judged, and 200 answers of the services that report errors inside a
200 body (Google Maps): any other 2xx or 3xx is OK without looking at it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from gateway.cooldown import DEFAULT_S, MAX_S, asked_wait_s, limit_reset_s
from gateway.quota import window

# The most of an answer's body read to judge it; a longer body is judged by its status.
JUDGE_BODY_BYTES: Final = 64 * 1024
# An account out of credit (OpenAI `insufficient_quota`, Google `OVER_DAILY_LIMIT`) that names
# no wait and whose key has no quota window of its own: tried again after this long. Google
# resets daily quotas at midnight Pacific time and also reports billing trouble this way, and
# a credit top-up can come any time: an hourly re-try costs one refused call.
QUOTA_REST_S: Final = 3600.0
# Per-second limiters (Stripe, Google's queries per second): a short rest is enough.
SHORT_REST_S: Final = 2.0


class Signal(StrEnum):
    OK = "ok"
    RATE_LIMITED = "rate"  # rest the key, try another
    QUOTA_EXHAUSTED = "quota"  # rest the key long, try another
    INVALID_KEY = "invalid"  # rest the key, mark it invalid, try another
    DENIED = "denied"  # this key may not do this (API not enabled): try another, no rest
    NOT_THE_KEYS_FAULT = "relay"  # the request's own fault or the upstream's: relay it


BENCHING: Final = frozenset({Signal.RATE_LIMITED, Signal.QUOTA_EXHAUSTED, Signal.INVALID_KEY})
FAILING_OVER: Final = BENCHING | {Signal.DENIED}


@dataclass(frozen=True, slots=True)
class Verdict:
    signal: Signal
    seconds: float | None = None  # the rest the upstream asked for; None: see `rest_s`

    @property
    def fails_over(self) -> bool:
        """Another key may serve this request (when the body can be sent again)."""
        return self.signal in FAILING_OVER

    @property
    def benches(self) -> bool:
        """The key rests (and, if invalid, is marked so), whether or not another key serves."""
        return self.signal in BENCHING


OK: Final = Verdict(Signal.OK)


@dataclass(frozen=True, slots=True)
class Rule:
    """Matches an answer by status (None: any), provider code (None: any, even no body) and
    whether its message says the key is invalid (None: either way; False: a readable message
    that does not)."""

    signal: Signal
    status: int | None = None
    code: str | None = None
    says_invalid: bool | None = None
    rest_s: float | None = None  # the rest when the upstream names none

    def matches(self, status: int, codes: frozenset[str], message: str | None) -> bool:
        if self.status is not None and status != self.status:
            return False
        if self.code is not None and self.code not in codes:
            return False
        if self.says_invalid is None:
            return True
        return message is not None and _says_invalid(message) == self.says_invalid


@dataclass(frozen=True, slots=True)
class Provider:
    rules: tuple[Rule, ...]
    read_statuses: frozenset[int] = frozenset()  # answers whose body is read to judge them
    # A 200 body is parsed only when it holds one of these (a cheap scan of every 200).
    markers: tuple[bytes, ...] = ()


# What every service shares, after its own rules (and for custom services, alone).
COMMON: Final = (
    Rule(Signal.RATE_LIMITED, status=429),
    Rule(Signal.INVALID_KEY, status=401),
)
CLIENT_ERRORS: Final = frozenset(range(400, 500))
GOOGLE_MARKERS: Final = (
    b"OVER_QUERY_LIMIT",
    b"OVER_DAILY_LIMIT",
    b"REQUEST_DENIED",
    b"RESOURCE_EXHAUSTED",
    b"PERMISSION_DENIED",
    b"API_KEY_INVALID",
)

PROVIDERS: Final[Mapping[str, Provider]] = {
    "openai": Provider(
        rules=(
            # The account is out of credit (both `type` and `code` say so).
            Rule(Signal.QUOTA_EXHAUSTED, status=429, code="insufficient_quota"),
            # A 401 is the key's fault only when it says the key is wrong. Others (a client's
            # own OpenAI-Organization/-Project header that does not match the key, an unknown
            # organization) are not: a client must not be able to get keys marked invalid.
            # An answer that cannot be read falls back to the status (401: invalid).
            Rule(Signal.INVALID_KEY, status=401, code="invalid_api_key"),
            Rule(Signal.NOT_THE_KEYS_FAULT, status=401, says_invalid=False),
            # 403 (e.g. `unsupported_country_region_territory`, about the caller's address)
            # is invalid only when the answer says the key is.
            Rule(Signal.INVALID_KEY, status=403, code="invalid_api_key"),
            Rule(Signal.INVALID_KEY, status=403, says_invalid=True),
            # 429 `rate_limit_exceeded`: the common rule.
        ),
        read_statuses=frozenset({401, 403, 429}),
    ),
    "stripe": Provider(
        rules=(
            # Contention on one object (a customer updated by concurrent requests): another
            # key would meet the same lock; the SDK retries it itself.
            Rule(Signal.NOT_THE_KEYS_FAULT, status=429, code="lock_timeout"),
            Rule(Signal.RATE_LIMITED, status=429, rest_s=SHORT_REST_S),  # code `rate_limit`
            # A restricted key lacking a permission, or without access to a Stripe-Account:
            # another key may have it; the key itself is valid.
            Rule(Signal.DENIED, status=403),
        ),
        read_statuses=frozenset({429}),
    ),
    "googlemaps": Provider(
        rules=(
            Rule(Signal.RATE_LIMITED, code="OVER_QUERY_LIMIT", rest_s=SHORT_REST_S),
            Rule(Signal.RATE_LIMITED, code="RESOURCE_EXHAUSTED", rest_s=SHORT_REST_S),
            Rule(Signal.QUOTA_EXHAUSTED, code="OVER_DAILY_LIMIT"),
            Rule(Signal.INVALID_KEY, code="API_KEY_INVALID"),
            Rule(Signal.INVALID_KEY, code="REQUEST_DENIED", says_invalid=True),
            # The key's project lacks this API, or the key's restrictions refuse this call:
            # the key serves its other APIs, so it is not rested; another key may serve this.
            Rule(Signal.DENIED, code="REQUEST_DENIED"),
            Rule(Signal.DENIED, code="PERMISSION_DENIED"),
        ),
        read_statuses=frozenset({200}) | CLIENT_ERRORS,
        markers=GOOGLE_MARKERS,
    ),
    "openweather": Provider(
        rules=(
            Rule(Signal.INVALID_KEY, status=401, says_invalid=True),
            # 401 also means "your plan does not include this API" (One Call 3.0).
            Rule(Signal.DENIED, status=401, says_invalid=False),
        ),
        read_statuses=frozenset({401}),
    ),
}
CUSTOM: Final = Provider(rules=())
# Services whose 200 answers may carry an error (the only 2xx answers ever judged).
SIGNALS_IN_200: Final = frozenset(s for s, p in PROVIDERS.items() if 200 in p.read_statuses)


def judged(service: str, status: int) -> bool:
    """Whether an answer can say anything about the key (cheap: called for every answer)."""
    return status >= 400 or (status == 200 and service in SIGNALS_IN_200)


def reads_body(service: str, status: int, content_type: str) -> bool:
    """Whether `classify` looks at this answer's body: only for the statuses the service
    signals in, and for a textual body (no image, no download)."""
    if status not in PROVIDERS.get(service, CUSTOM).read_statuses:
        return False
    return not content_type or any(t in content_type for t in ("json", "xml", "text"))


def classify(service: str, status: int, headers: Mapping[str, str], body: bytes | None) -> Verdict:
    """What the answer says about the key. `body`: the whole body if it was read, else None."""
    if not judged(service, status):
        return OK
    provider = PROVIDERS.get(service, CUSTOM)
    if status < 400 and (body is None or not any(m in body for m in provider.markers)):
        return OK  # a 200 without an error in it: the common case, no parsing
    codes, message = _read(body) if body else (frozenset(), None)
    for rule in (*provider.rules, *COMMON):
        if rule.matches(status, codes, message):
            return _verdict(rule, headers)
    return OK if status < 400 else Verdict(Signal.NOT_THE_KEYS_FAULT)


def rest_s(verdict: Verdict, period: str | None, now: datetime | None = None) -> float:
    """How long a benched key rests: what the upstream asked for; else, for an exhausted
    account, until the key's own quota window (`period`) ends, or QUOTA_REST_S without one;
    else DEFAULT_S. Capped at MAX_S."""
    if verdict.seconds is not None:
        return min(verdict.seconds, MAX_S)
    if verdict.signal is Signal.QUOTA_EXHAUSTED:
        if period is None:
            return QUOTA_REST_S
        now = now or datetime.now(UTC)
        return min(max((window(period, now).end - now).total_seconds(), 1.0), MAX_S)
    return DEFAULT_S


def _verdict(rule: Rule, headers: Mapping[str, str]) -> Verdict:
    if rule.signal not in (Signal.RATE_LIMITED, Signal.QUOTA_EXHAUSTED):
        return Verdict(rule.signal)
    asked = asked_wait_s(headers)
    if asked is None and rule.signal is Signal.RATE_LIMITED:
        asked = limit_reset_s(headers)
    return Verdict(rule.signal, asked if asked is not None else rule.rest_s)


INVALID_PHRASES: Final = (
    "invalid api key",
    "incorrect api key",
    "api key is invalid",
    "api key not valid",
    "api key is expired",
    "api key expired",
    "expired api key",
)
_XML_FIELD = re.compile(rb"<(status|error_message)>([^<]{0,1000})</\1>")


def _says_invalid(message: str) -> bool:
    lowered = message.lower()
    return any(phrase in lowered for phrase in INVALID_PHRASES)


def _read(body: bytes) -> tuple[frozenset[str], str | None]:
    """The error codes and message of a provider's error body, in any of the shapes used:
    `{"error": {"code", "type", "status", "message", "details": [{"reason"}]}}` (OpenAI,
    Stripe, Google Cloud), `{"status", "error_message"}` (Google Maps, also as XML),
    `{"cod", "message"}` (OpenWeather). Nothing for a body that is none of these."""
    if body.lstrip()[:1] == b"<":
        fields = {m[1]: m[2].decode(errors="replace") for m in _XML_FIELD.finditer(body)}
        codes = frozenset({fields[b"status"]} if b"status" in fields else ())
        return codes, fields.get(b"error_message")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested absurdly deep
        return frozenset(), None
    if not isinstance(doc, dict):
        return frozenset(), None
    error = doc.get("error")
    inner: dict[str, Any] = error if isinstance(error, dict) else {}
    found = [doc.get("status"), doc.get("cod"), *(inner.get(k) for k in ("code", "type"))]
    found.append(inner.get("status"))
    details = inner.get("details")
    if isinstance(details, list):
        found += [d.get("reason") for d in details if isinstance(d, dict)]
    codes = frozenset(str(c) for c in found if isinstance(c, str | int) and not isinstance(c, bool))
    message = next(
        (
            m
            for m in (inner.get("message"), doc.get("error_message"), doc.get("message"))
            if isinstance(m, str)
        ),
        error if isinstance(error, str) else None,
    )
    return codes, message
