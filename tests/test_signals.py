"""Provider signals: each service's way of saying "not with this key" (rate, quota, invalid,
denied) or "not the key's fault", judged from status and a small body. The classifier is a
pure function tested on a table; end to end, real SDKs call the gateway, which fails over
from a refused key A to key B (or relays the answer and benches A when there is no B)."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import googlemaps
import openai
import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from gateway.appkeys import COOLDOWNS
from gateway.cooldown import DEFAULT_S, MAX_S, limit_reset_s, reset_after_s
from gateway.signals import (
    JUDGE_BODY_BYTES,
    QUOTA_REST_S,
    SHORT_REST_S,
    Signal,
    Verdict,
    classify,
    judged,
    reads_body,
    rest_s,
)
from tests.fakes import FakeUpstream
from tests.test_failover import metric

OPENAI_A: Final = "sk-proj-" + "A" * 40
OPENAI_B: Final = "sk-proj-" + "B" * 40
STRIPE_A: Final = "sk_test_" + "A" * 24
STRIPE_B: Final = "sk_test_" + "B" * 24
MAPS_A: Final = "AIzaSy" + "A" * 33
MAPS_B: Final = "AIzaSy" + "B" * 33
WEATHER_A: Final = "a" * 32
WEATHER_B: Final = "b" * 32
HELLO: Final = [{"role": "user", "content": "hi"}]
SDK_TIMEOUT_S: Final = 10.0

INSUFFICIENT_QUOTA: Final = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}
OPENAI_RATE: Final = {
    "error": {
        "message": "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}
OPENAI_INVALID: Final = {
    "error": {
        "message": "Incorrect API key provided: sk-proj-****AAAA.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}
UNSUPPORTED_COUNTRY: Final = {
    "error": {
        "message": "Country, region, or territory not supported",
        "type": "request_forbidden",
        "param": None,
        "code": "unsupported_country_region_territory",
    }
}
MISMATCHED_ORG: Final = {
    "error": {
        "message": "OpenAI-Organization header should match organization for API key",
        "type": "invalid_request_error",
        "param": None,
        "code": "mismatched_organization",
    }
}
STRIPE_LOCK: Final = {
    "error": {
        "code": "lock_timeout",
        "message": "This object cannot be accessed right now because another API request "
        "or Stripe process is currently accessing it.",
        "type": "invalid_request_error",
    }
}
STRIPE_RATE: Final = {
    "error": {
        "code": "rate_limit",
        "message": "Request rate limit exceeded.",
        "type": "invalid_request_error",
    }
}
STRIPE_PERMISSION: Final = {
    "error": {
        "message": "The provided key 'rk_test_***AAAA' does not have the required permissions.",
        "type": "invalid_request_error",
    }
}
MAPS_OVER_QUERY: Final = {
    "error_message": "You have exceeded your rate-limit for this API.",
    "results": [],
    "status": "OVER_QUERY_LIMIT",
}
MAPS_OVER_DAILY: Final = {
    "error_message": "You have exceeded your daily request quota for this API.",
    "results": [],
    "status": "OVER_DAILY_LIMIT",
}
MAPS_INVALID: Final = {
    "error_message": "The provided API key is invalid.",
    "results": [],
    "status": "REQUEST_DENIED",
}
MAPS_NOT_ENABLED: Final = {
    "error_message": "This API project is not authorized to use this API.",
    "results": [],
    "status": "REQUEST_DENIED",
}
CLOUD_INVALID: Final = {
    "error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
        ],
    }
}
WEATHER_INVALID: Final = {
    "cod": 401,
    "message": "Invalid API key. Please see https://openweathermap.org/faq#error401 for more info.",
}
WEATHER_ONE_CALL: Final = {
    "cod": 401,
    "message": "Please note that using One Call 3.0 requires a separate subscription to the "
    "One Call by Call plan. If you have a valid subscription, see the FAQ.",
}


def js(doc: Any) -> bytes:
    return json.dumps(doc).encode()


# The classifier, per provider: (service, status, headers, body) -> (signal, seconds).

CASES: Final[list[tuple[str, int, dict[str, str], bytes | None, Signal, float | None]]] = [
    # OpenAI
    ("openai", 200, {}, js(INSUFFICIENT_QUOTA), Signal.OK, None),  # a 2xx is never read
    ("openai", 429, {}, js(INSUFFICIENT_QUOTA), Signal.QUOTA_EXHAUSTED, None),
    ("openai", 429, {"Retry-After": "120"}, js(INSUFFICIENT_QUOTA), Signal.QUOTA_EXHAUSTED, 120),
    ("openai", 429, {}, js(OPENAI_RATE), Signal.RATE_LIMITED, None),
    ("openai", 429, {"retry-after-ms": "1500"}, js(OPENAI_RATE), Signal.RATE_LIMITED, 1.5),
    (
        "openai",
        429,
        {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "20s",
            "x-ratelimit-remaining-tokens": "9000",
            "x-ratelimit-reset-tokens": "6m0s",
        },
        js(OPENAI_RATE),
        Signal.RATE_LIMITED,
        20,
    ),
    ("openai", 429, {"Retry-After": "7"}, None, Signal.RATE_LIMITED, 7),  # body not read
    ("openai", 401, {}, js(OPENAI_INVALID), Signal.INVALID_KEY, None),
    ("openai", 401, {}, None, Signal.INVALID_KEY, None),
    ("openai", 401, {}, js(MISMATCHED_ORG), Signal.NOT_THE_KEYS_FAULT, None),
    (  # a client's bogus OpenAI-Organization header: the key is not to blame
        "openai",
        401,
        {},
        js({"error": {"message": "No such organization: org-x.", "code": "invalid_organization"}}),
        Signal.NOT_THE_KEYS_FAULT,
        None,
    ),
    ("openai", 403, {}, js(UNSUPPORTED_COUNTRY), Signal.NOT_THE_KEYS_FAULT, None),
    ("openai", 403, {}, None, Signal.NOT_THE_KEYS_FAULT, None),
    ("openai", 403, {}, js(OPENAI_INVALID), Signal.INVALID_KEY, None),
    (
        "openai",
        404,
        {},
        js({"error": {"code": "model_not_found"}}),
        Signal.NOT_THE_KEYS_FAULT,
        None,
    ),
    ("openai", 500, {}, None, Signal.NOT_THE_KEYS_FAULT, None),
    # Stripe
    ("stripe", 429, {}, js(STRIPE_LOCK), Signal.NOT_THE_KEYS_FAULT, None),
    (  # Google Cloud style: a message echoing the client's input is not proof
        "googlemaps",
        400,
        {},
        js(
            {"error": {"status": "INVALID_ARGUMENT", "message": 'Unknown name "api key not valid"'}}
        ),
        Signal.NOT_THE_KEYS_FAULT,
        None,
    ),
    ("stripe", 429, {}, js(STRIPE_RATE), Signal.RATE_LIMITED, SHORT_REST_S),
    ("stripe", 429, {"Retry-After": "5"}, js(STRIPE_RATE), Signal.RATE_LIMITED, 5),
    ("stripe", 429, {}, None, Signal.RATE_LIMITED, SHORT_REST_S),
    (
        "stripe",
        401,
        {},
        js({"error": {"message": "Invalid API Key provided"}}),
        Signal.INVALID_KEY,
        None,
    ),
    ("stripe", 403, {}, js(STRIPE_PERMISSION), Signal.DENIED, None),
    ("stripe", 402, {}, js({"error": {"code": "card_declined"}}), Signal.NOT_THE_KEYS_FAULT, None),
    ("stripe", 200, {}, js({"object": "customer"}), Signal.OK, None),
    # Google Maps: errors in 200 bodies (JSON or XML), and Google Cloud-style 4xx
    ("googlemaps", 200, {}, js(MAPS_OVER_QUERY), Signal.RATE_LIMITED, SHORT_REST_S),
    ("googlemaps", 200, {}, js(MAPS_OVER_DAILY), Signal.QUOTA_EXHAUSTED, None),
    ("googlemaps", 200, {}, js(MAPS_INVALID), Signal.INVALID_KEY, None),
    ("googlemaps", 200, {}, js(MAPS_NOT_ENABLED), Signal.DENIED, None),
    (
        "googlemaps",
        200,
        {},
        js({"status": "OK", "results": [{"formatted_address": "REQUEST_DENIED Street"}]}),
        Signal.OK,
        None,
    ),
    ("googlemaps", 200, {}, js({"status": "ZERO_RESULTS", "results": []}), Signal.OK, None),
    ("googlemaps", 200, {}, None, Signal.OK, None),
    (
        "googlemaps",
        200,
        {},
        b"<GeocodeResponse><status>OVER_QUERY_LIMIT</status></GeocodeResponse>",
        Signal.RATE_LIMITED,
        SHORT_REST_S,
    ),
    (
        "googlemaps",
        200,
        {},
        b"<GeocodeResponse><status>REQUEST_DENIED</status>"
        b"<error_message>The provided API key is invalid.</error_message></GeocodeResponse>",
        Signal.INVALID_KEY,
        None,
    ),
    ("googlemaps", 400, {}, js(CLOUD_INVALID), Signal.INVALID_KEY, None),
    ("googlemaps", 400, {}, js({"status": "INVALID_REQUEST"}), Signal.NOT_THE_KEYS_FAULT, None),
    (
        "googlemaps",
        429,
        {},
        js({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}),
        Signal.RATE_LIMITED,
        SHORT_REST_S,
    ),
    ("googlemaps", 403, {}, js({"error": {"status": "PERMISSION_DENIED"}}), Signal.DENIED, None),
    # OpenWeather
    ("openweather", 429, {}, js({"cod": 429, "message": "blocked"}), Signal.RATE_LIMITED, None),
    ("openweather", 401, {}, js(WEATHER_INVALID), Signal.INVALID_KEY, None),
    ("openweather", 401, {}, js(WEATHER_ONE_CALL), Signal.DENIED, None),
    ("openweather", 401, {}, None, Signal.INVALID_KEY, None),
    (
        "openweather",
        404,
        {},
        js({"cod": "404", "message": "city not found"}),
        Signal.NOT_THE_KEYS_FAULT,
        None,
    ),
    # Any other service: the status alone, as before
    ("acme", 429, {"Retry-After": "3"}, None, Signal.RATE_LIMITED, 3),
    ("acme", 429, {}, js(INSUFFICIENT_QUOTA), Signal.RATE_LIMITED, None),
    ("acme", 401, {}, None, Signal.INVALID_KEY, None),
    ("acme", 403, {}, js(OPENAI_INVALID), Signal.NOT_THE_KEYS_FAULT, None),
    ("acme", 200, {}, js(MAPS_OVER_QUERY), Signal.OK, None),
]


@pytest.mark.parametrize(("service", "status", "headers", "body", "signal", "seconds"), CASES)
def test_classify(
    service: str,
    status: int,
    headers: dict[str, str],
    body: bytes | None,
    signal: Signal,
    seconds: float | None,
) -> None:
    verdict = classify(service, status, CIMultiDict(headers), body)
    assert verdict.signal is signal
    if seconds is None:
        assert verdict.seconds is None
    else:
        assert verdict.seconds == pytest.approx(seconds)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,  # deeper than the recursion limit
        b"\xff\xfe not utf-8",
        b"<html>Too Many Requests</html>",
        b'["a list"]',
        b'{"error": "Invalid API key"}',
        b'{"error": {"code": true, "message": 5}}',
        b"",
    ],
)
def test_odd_bodies_fall_back_to_the_status(body: bytes) -> None:
    assert classify("openai", 401, {}, body).signal is Signal.INVALID_KEY
    assert classify("openai", 403, {}, body).signal in (
        Signal.NOT_THE_KEYS_FAULT,
        Signal.INVALID_KEY,
    )
    assert classify("googlemaps", 200, {}, body).signal is Signal.OK
    assert classify("stripe", 429, {}, body).signal is Signal.RATE_LIMITED


def test_which_answers_are_looked_at() -> None:
    assert not judged("openai", 200)
    assert not judged("stripe", 201)
    assert not judged("googlemaps", 204)
    assert not judged("googlemaps", 302)
    assert judged("googlemaps", 200)
    assert judged("acme", 429)
    assert reads_body("googlemaps", 200, "application/json; charset=UTF-8")
    assert reads_body("googlemaps", 200, "application/xml")
    assert not reads_body("googlemaps", 200, "image/png")  # a static map is not read
    assert reads_body("openai", 429, "application/json")
    assert not reads_body("openai", 404, "application/json")
    assert not reads_body("stripe", 401, "application/json")  # the status says it all
    assert not reads_body("acme", 429, "application/json")


def test_how_long_a_key_rests() -> None:
    now = datetime(2026, 3, 14, 12, 59, 30, tzinfo=UTC)
    quota = Verdict(Signal.QUOTA_EXHAUSTED)
    assert rest_s(quota, None, now) == QUOTA_REST_S
    assert rest_s(quota, "hour", now) == pytest.approx(30)
    assert rest_s(quota, "minute", now) == pytest.approx(30)
    assert rest_s(quota, "daily", now) == pytest.approx(11 * 3600 + 30)
    assert rest_s(Verdict(Signal.QUOTA_EXHAUSTED, 120), "daily", now) == 120
    assert rest_s(Verdict(Signal.RATE_LIMITED), None, now) == DEFAULT_S
    assert rest_s(Verdict(Signal.RATE_LIMITED, 10.0**9), None, now) == MAX_S
    assert rest_s(Verdict(Signal.INVALID_KEY), "hour", now) == DEFAULT_S


def test_rate_limit_resets() -> None:
    both = {
        "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-requests": "20s",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert limit_reset_s(both) == pytest.approx(360)  # the spent limit's reset
    both["x-ratelimit-remaining-tokens"] = "10"
    assert limit_reset_s(both) == pytest.approx(360)  # none spent: the longest
    now = 1_800_000_000.0
    assert limit_reset_s({"x-ratelimit-reset": str(int(now) + 90)}, now) == pytest.approx(90)
    assert reset_after_s(str(int(now) - 5), now) == 0.0  # an epoch in the past
    assert reset_after_s("nan") is None
    assert limit_reset_s({}) is None
    assert limit_reset_s({"x-ratelimit-reset-requests": "soon"}) is None


# End to end: a fake provider that answers a scripted refusal to key A.

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(body, status=status, headers=headers)

    return handler


@dataclass
class Refusing(FakeUpstream):
    """A FakeUpstream (answers like the provider, for its SDK) that answers `replies[key]`
    to a request carrying that key instead."""

    replies: dict[str, Handler] = field(default_factory=dict)

    @web.middleware
    async def record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        scripted = self.replies.get(self.presented(request) or "")
        response: web.StreamResponse = await super().record(request, scripted or handler)
        return response

    def keys_seen(self) -> list[str]:
        return [self.presented_in(s) for s in self.seen]

    def presented_in(self, seen: Any) -> str:
        kind, _, name = self.auth.partition(":")
        if kind == "bearer":
            return str(seen.headers.get("Authorization", "")).removeprefix("Bearer ")
        return str(seen.query.get(name, ""))


@dataclass
class Pair:
    upstream: Refusing
    token: str
    a_id: str  # tried first
    b_id: str | None
    gateway: TestClient[Any, Any]
    admin: TestClient[Any, Any]
    jwt: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    def resting(self, key_id: str) -> float:
        return float(self.gateway.app[COOLDOWNS].resting(key_id))

    async def key_status(self, key_id: str) -> str:
        resp = await self.admin.get(f"/keys/{key_id}", headers=self.jwt)
        assert resp.status == 200
        return str((await resp.json())["status"])

    async def wait_for_status(self, key_id: str, status: str) -> None:
        for _ in range(60):  # marked in the background
            if await self.key_status(key_id) == status:
                return
            await asyncio.sleep(0.05)
        pytest.fail(f"key {key_id} never became {status}")


@pytest.fixture
def wire(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> Callable[..., Awaitable[Pair]]:
    """Point `service` at a Refusing fake that accepts A and B; store A (priority 10, so it
    is tried first) and B (unless None); return a token for the service."""

    async def wire(service: str, a: str, b: str | None, auth: str = "bearer") -> Pair:
        upstream = Refusing(b or a, auth, also=frozenset({a}))
        server = await aiohttp_server(upstream.app())
        resp = await admin_client.put(
            f"/services/{service}",
            headers=as_admin,
            json={"base_url": f"http://127.0.0.1:{server.port}"},
        )
        assert resp.status == 200, await resp.text()
        ids = []
        for key, priority in ((a, 10), (b, 0)):
            if key is None:
                continue
            resp = await admin_client.post(
                "/keys",
                headers=as_admin,
                json={"key": key, "service": service, "tier": "paid", "priority": priority},
            )
            assert resp.status == 201, await resp.text()
            ids.append((await resp.json())["id"])
        resp = await admin_client.post(
            "/tokens", headers=as_admin, json={"name": "app", "services": [service]}
        )
        assert resp.status == 201
        token = (await resp.json())["token"]
        b_id = ids[1] if b is not None else None
        return Pair(upstream, token, ids[0], b_id, gateway_client, admin_client, as_admin)

    return wire


Wire = Callable[..., Awaitable[Pair]]


def openai_client(p: Pair) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=p.url + "/openai/v1", api_key=p.token, max_retries=0, timeout=SDK_TIMEOUT_S
    )


def stripe_client(p: Pair, http: stripe.HTTPClient) -> Any:
    return stripe.StripeClient(
        p.token,
        base_addresses={"api": p.url + "/stripe"},
        max_network_retries=0,
        http_client=http,
    )


def geocode(p: Pair, address: str = "Paris") -> list[dict[str, Any]]:
    """The googlemaps SDK (synchronous: run it in a thread), retrying nothing itself."""
    client = googlemaps.Client(
        key=p.token,
        base_url=p.url + "/googlemaps",
        retry_over_query_limit=False,
        timeout=SDK_TIMEOUT_S,
    )
    try:
        results: list[dict[str, Any]] = client.geocode(address)
        return results
    finally:
        client.session.close()


def cooldowns(service: str, reason: str) -> str:
    return f'wallet_cooldowns_total{{app="gateway",reason="{reason}",service="{service}"}}'


async def test_openai_insufficient_quota_fails_over_and_rests_the_key_long(wire: Wire) -> None:
    p = await wire("openai", OPENAI_A, OPENAI_B)
    p.upstream.replies[OPENAI_A] = reply(429, INSUFFICIENT_QUOTA)
    async with openai_client(p) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO
        )
        again = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HELLO
        )

    assert raw.parse().choices[0].message.content == "hello"
    assert raw.headers["X-Wallet-Key-Id"] == p.b_id
    assert raw.headers["X-Wallet-Fallbacks"] == "1"
    # The same body went to both keys; then A rests: the next request goes straight to B.
    assert p.upstream.keys_seen() == [OPENAI_A, OPENAI_B, OPENAI_B]
    assert p.upstream.seen[0].body == p.upstream.seen[1].body
    assert again.headers["X-Wallet-Key-Id"] == p.b_id
    assert again.headers["X-Wallet-Fallbacks"] == "0"
    # Out of credit, no Retry-After, no quota window on the key: an hour.
    assert QUOTA_REST_S - 60 < p.resting(p.a_id) <= QUOTA_REST_S
    assert await metric(p.gateway, cooldowns("openai", "quota")) == "1"
    assert await p.key_status(p.a_id) == "active"  # resting, not invalid


async def test_openai_rate_limit_fails_over_and_rests_for_the_reset(wire: Wire) -> None:
    p = await wire("openai", OPENAI_A, OPENAI_B)
    resets = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"}
    p.upstream.replies[OPENAI_A] = reply(429, OPENAI_RATE, resets)
    async with openai_client(p) as client:
        models = [m.id async for m in client.models.list()]

    assert models == ["gpt-4o-mini"]
    assert p.upstream.keys_seen() == [OPENAI_A, OPENAI_B]
    assert 300 < p.resting(p.a_id) <= 360
    assert await metric(p.gateway, cooldowns("openai", "rate")) == "1"


async def test_openai_403_unsupported_country_is_relayed_and_the_key_stays_valid(
    wire: Wire,
) -> None:
    p = await wire("openai", OPENAI_A, OPENAI_B)
    p.upstream.replies[OPENAI_A] = reply(403, UNSUPPORTED_COUNTRY)
    async with openai_client(p) as client:
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert refused.value.code == "unsupported_country_region_territory"
        assert refused.value.response.headers["X-Wallet-Key-Id"] == p.a_id
        # Not the key's fault: A is neither rested nor marked, and serves the next request.
        assert p.resting(p.a_id) == 0
        del p.upstream.replies[OPENAI_A]
        raw = await client.models.with_raw_response.list()

    assert raw.headers["X-Wallet-Key-Id"] == p.a_id
    assert p.upstream.keys_seen() == [OPENAI_A, OPENAI_A]
    assert await p.key_status(p.a_id) == "active"
    assert await metric(p.gateway, cooldowns("openai", "invalid")) is None


async def test_openai_client_header_mismatch_cannot_get_a_key_marked_invalid(
    wire: Wire,
) -> None:
    p = await wire("openai", OPENAI_A, OPENAI_B)
    p.upstream.replies[OPENAI_A] = reply(401, MISMATCHED_ORG)
    resp = await p.gateway.get(
        "/openai/v1/models",
        headers={"X-Wallet-Token": p.token, "OpenAI-Organization": "org-someone-else"},
    )
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "mismatched_organization"
    assert p.upstream.keys_seen() == [OPENAI_A]
    assert p.resting(p.a_id) == 0
    assert await p.key_status(p.a_id) == "active"


async def test_stripe_lock_timeout_is_relayed_and_the_key_is_not_rested(wire: Wire) -> None:
    p = await wire("stripe", STRIPE_A, STRIPE_B)
    p.upstream.replies[STRIPE_A] = reply(429, STRIPE_LOCK)
    http = stripe.AIOHTTPClient(timeout=SDK_TIMEOUT_S)
    try:
        client = stripe_client(p, http)
        with pytest.raises(stripe.RateLimitError) as refused:
            await client.v1.customers.update_async("cus_1", params={"name": "Ada"})
        assert refused.value.json_body["error"]["code"] == "lock_timeout"
        assert refused.value.headers["X-Wallet-Key-Id"] == p.a_id
        assert refused.value.headers["X-Wallet-Fallbacks"] == "0"
        assert p.resting(p.a_id) == 0
        del p.upstream.replies[STRIPE_A]
        customer = await client.v1.customers.retrieve_async("cus_1")
    finally:
        await http.close_async()

    assert customer.last_response.headers["X-Wallet-Key-Id"] == p.a_id
    assert p.upstream.keys_seen() == [STRIPE_A, STRIPE_A]
    assert await metric(p.gateway, cooldowns("stripe", "rate")) is None


async def test_stripe_rate_limit_fails_over_with_the_form_body(wire: Wire) -> None:
    p = await wire("stripe", STRIPE_A, STRIPE_B)
    p.upstream.replies[STRIPE_A] = reply(429, STRIPE_RATE)
    http = stripe.AIOHTTPClient(timeout=SDK_TIMEOUT_S)
    try:
        customer = await stripe_client(p, http).v1.customers.create_async(
            params={"email": "ada@example.com"}
        )
    finally:
        await http.close_async()

    assert customer.email == "ada@example.com"
    assert customer.last_response.headers["X-Wallet-Key-Id"] == p.b_id
    assert customer.last_response.headers["X-Wallet-Fallbacks"] == "1"
    assert p.upstream.keys_seen() == [STRIPE_A, STRIPE_B]
    assert p.upstream.seen[0].form() == p.upstream.seen[1].form() == {"email": "ada@example.com"}
    assert await metric(p.gateway, cooldowns("stripe", "rate")) == "1"


async def test_googlemaps_over_query_limit_in_a_200_fails_over(wire: Wire) -> None:
    p = await wire("googlemaps", MAPS_A, MAPS_B, "query:key")
    p.upstream.replies[MAPS_A] = reply(200, MAPS_OVER_QUERY)

    results = await asyncio.to_thread(geocode, p)

    assert results[0]["formatted_address"] == "Paris"
    assert p.upstream.keys_seen() == [MAPS_A, MAPS_B]
    assert await metric(p.gateway, cooldowns("googlemaps", "rate")) == "1"
    labels = '{app="gateway",service="googlemaps"}'
    assert await metric(p.gateway, f"wallet_fallbacks_total{labels}") == "1"


async def test_googlemaps_compressed_refusal_is_read_after_decompression(wire: Wire) -> None:
    p = await wire("googlemaps", MAPS_A, MAPS_B, "query:key")

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=gzip.compress(js(MAPS_OVER_DAILY)),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )

    p.upstream.replies[MAPS_A] = gzipped
    results = await asyncio.to_thread(geocode, p)

    assert results[0]["formatted_address"] == "Paris"
    assert p.upstream.keys_seen() == [MAPS_A, MAPS_B]
    assert QUOTA_REST_S - 60 < p.resting(p.a_id) <= QUOTA_REST_S
    assert await metric(p.gateway, cooldowns("googlemaps", "quota")) == "1"


async def test_googlemaps_invalid_key_is_marked_invalid(wire: Wire) -> None:
    p = await wire("googlemaps", MAPS_A, MAPS_B, "query:key")
    p.upstream.replies[MAPS_A] = reply(200, MAPS_INVALID)

    results = await asyncio.to_thread(geocode, p)

    assert results[0]["formatted_address"] == "Paris"
    assert p.upstream.keys_seen() == [MAPS_A, MAPS_B]
    await p.wait_for_status(p.a_id, "invalid")
    audit = await (await p.admin.get("/audit", headers=p.jwt)).json()
    marks = [r for r in audit["items"] if r["action"] == "key.invalid"]
    assert [(r["target_id"], r["details"]["upstream_status"]) for r in marks] == [(p.a_id, 200)]


async def test_googlemaps_api_not_enabled_fails_over_without_resting_the_key(
    wire: Wire,
) -> None:
    p = await wire("googlemaps", MAPS_A, MAPS_B, "query:key")
    p.upstream.replies[MAPS_A] = reply(200, MAPS_NOT_ENABLED)

    await asyncio.to_thread(geocode, p)
    await asyncio.to_thread(geocode, p)

    # A may serve the project's other APIs: it is tried again, never rested nor marked.
    assert p.upstream.keys_seen() == [MAPS_A, MAPS_B, MAPS_A, MAPS_B]
    assert p.resting(p.a_id) == 0
    assert await p.key_status(p.a_id) == "active"


async def test_googlemaps_long_answer_is_relayed_whole_after_the_look(wire: Wire) -> None:
    p = await wire("googlemaps", MAPS_A, MAPS_B, "query:key")
    results = [{"formatted_address": f"Street {i}", "pad": "x" * 500} for i in range(400)]
    doc = js({"results": results, "status": "OK"})
    assert len(doc) > 2 * JUDGE_BODY_BYTES

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)  # no Content-Length: chunked
        for start in range(0, len(doc), 10_000):
            await response.write(doc[start : start + 10_000])
        await response.write_eof()
        return response

    p.upstream.replies[MAPS_A] = chunked
    resp = await p.gateway.get(
        "/googlemaps/maps/api/geocode/json", params={"address": "x", "key": p.token}
    )
    assert resp.status == 200
    assert await resp.read() == doc
    assert resp.headers["X-Wallet-Key-Id"] == p.a_id
    assert p.upstream.keys_seen() == [MAPS_A]


async def test_openweather_429_fails_over(wire: Wire) -> None:
    p = await wire("openweather", WEATHER_A, WEATHER_B, "query:appid")
    p.upstream.replies[WEATHER_A] = reply(429, {"cod": 429, "message": "Your account is blocked"})
    resp = await p.gateway.get(
        "/openweather/data/2.5/weather", params={"q": "Paris", "appid": p.token}
    )
    assert resp.status == 200
    assert (await resp.json())["name"] == "Paris"
    assert resp.headers["X-Wallet-Key-Id"] == p.b_id
    assert resp.headers["X-Wallet-Fallbacks"] == "1"
    assert p.upstream.keys_seen() == [WEATHER_A, WEATHER_B]
    assert await metric(p.gateway, cooldowns("openweather", "rate")) == "1"


# A single key: the answer is relayed as it came, and the key is benched per the verdict.


async def test_single_key_out_of_credit_is_relayed_then_rests(wire: Wire) -> None:
    p = await wire("openai", OPENAI_A, None)
    p.upstream.replies[OPENAI_A] = reply(429, INSUFFICIENT_QUOTA)
    auth = {"X-Wallet-Token": p.token}
    resp = await p.gateway.get("/openai/v1/models", headers=auth)
    assert resp.status == 429
    assert await resp.json() == INSUFFICIENT_QUOTA  # the upstream's own answer
    assert resp.headers["X-Wallet-Fallbacks"] == "0"

    resp = await p.gateway.get("/openai/v1/models", headers=auth)
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "keys_cooling_down"
    assert QUOTA_REST_S - 60 < int(resp.headers["Retry-After"]) <= QUOTA_REST_S
    assert len(p.upstream.seen) == 1  # the upstream was left alone


async def test_single_key_lock_timeout_is_relayed_and_the_key_keeps_serving(wire: Wire) -> None:
    p = await wire("stripe", STRIPE_A, None)
    p.upstream.replies[STRIPE_A] = reply(429, STRIPE_LOCK)
    auth = {"Authorization": f"Bearer {p.token}"}
    for _ in range(2):
        resp = await p.gateway.get("/stripe/v1/customers/cus_1", headers=auth)
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "lock_timeout"
    assert len(p.upstream.seen) == 2
    assert p.resting(p.a_id) == 0


async def test_single_key_google_refusals_are_relayed_and_bench_the_key(wire: Wire) -> None:
    p = await wire("googlemaps", MAPS_A, None, "query:key")
    p.upstream.replies[MAPS_A] = reply(200, MAPS_INVALID)
    params = {"address": "Paris", "key": p.token}
    resp = await p.gateway.get("/googlemaps/maps/api/geocode/json", params=params)
    assert resp.status == 200
    assert await resp.json() == MAPS_INVALID  # relayed as it came
    assert p.resting(p.a_id) > 0
    await p.wait_for_status(p.a_id, "invalid")
    assert len(p.upstream.seen) == 1
