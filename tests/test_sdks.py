"""The official SDKs as clients of the gateway: each one points its base URL at the gateway and
carries a wallet token where it would carry its API key; fake upstreams on loopback accept only
the real key and record what they received."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final

import googlemaps
import openai
import pytest
import requests
import stripe
from aiohttp.test_utils import TestClient

from gateway.appkeys import KEYPOOL
from tests.test_gateway_proxy import OPENAI_KEY, Wired, wire

STRIPE_KEY: Final = "sk_test_" + "Fk4eC39HqLyjWDarjtT1zdp7dc"
MAPS_KEY: Final = "AIzaSy" + "FakeMapsKey0123456789abcdefghijkl"  # 39 characters, like Google's
WEATHER_KEY: Final = "0123456789abcdef0123456789abcdef"
STRIPE_VERSION: Final = "2024-06-20"
SDK_TIMEOUT_S: Final = 10.0
# How long the client waits for one streamed event; the fake upstream holds the rest of the
# stream until the test has seen it, so a buffering gateway fails here.
EVENT_WAIT_S: Final = 3.0
HELLO: Final = [{"role": "user", "content": "hi"}]

Connect = Callable[..., Awaitable[Wired]]


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDKs read proxies and defaults from the environment; keep every call on loopback."""
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
        monkeypatch.delenv(proxy.lower(), raising=False)
    for name in ("OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def connect(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> Connect:
    """Point `service` at a fresh fake upstream that wants `key`; returns a wallet token."""

    async def connect(service: str, key: str, auth: str = "bearer") -> Wired:
        return await wire(
            admin_client, gateway_client, as_admin, aiohttp_server, service, key, auth
        )

    return connect


def gateway_url(w: Wired) -> str:
    return f"http://127.0.0.1:{w.gateway.port}"


def assert_only_real_key_upstream(w: Wired, expected_requests: int) -> None:
    """Every recorded request carried no trace of the wallet token."""
    assert len(w.upstream.seen) == expected_requests
    for seen in w.upstream.seen:
        assert w.token not in seen.text()


# OpenAI


def openai_client(w: Wired) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway_url(w) + "/openai/v1",
        api_key=w.token,
        max_retries=0,
        timeout=SDK_TIMEOUT_S,
    )


def async_openai_client(w: Wired, token: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=gateway_url(w) + "/openai/v1",
        api_key=token or w.token,
        max_retries=0,
        timeout=SDK_TIMEOUT_S,
    )


async def test_openai_sync_client(connect: Connect) -> None:
    w = await connect("openai", OPENAI_KEY)

    def call() -> tuple[Any, Any, list[str]]:
        with openai_client(w) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=HELLO
            )
            models = [m.id for m in client.models.list()]
            return raw.headers, raw.parse(), models

    headers, completion, models = await asyncio.to_thread(call)

    assert completion.choices[0].message.content == "hello"
    assert completion.usage.total_tokens == 4
    assert models == ["gpt-4o-mini"]
    assert headers["x-request-id"] == "req_upstream_chat"
    assert headers["X-Wallet-Key-Id"] == w.key_id
    chat, listing = w.upstream.seen
    assert (chat.method, chat.path) == ("POST", "/v1/chat/completions")
    assert chat.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert chat.headers["X-Stainless-Lang"] == "python"
    assert json.loads(chat.body) == {"model": "gpt-4o-mini", "messages": HELLO}
    assert (listing.method, listing.path) == ("GET", "/v1/models")
    assert listing.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert_only_real_key_upstream(w, 2)


async def test_openai_async_client(connect: Connect) -> None:
    w = await connect("openai", OPENAI_KEY)
    async with async_openai_client(w) as client:
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        models = [m.id async for m in client.models.list()]

    assert completion.choices[0].message.content == "hello"
    assert completion.id == "chatcmpl-1"
    assert models == ["gpt-4o-mini"]
    assert [s.path for s in w.upstream.seen] == ["/v1/chat/completions", "/v1/models"]
    assert all(s.headers["Authorization"] == f"Bearer {OPENAI_KEY}" for s in w.upstream.seen)
    assert_only_real_key_upstream(w, 2)


async def test_openai_sync_streaming_with_usage(connect: Connect) -> None:
    w = await connect("openai", OPENAI_KEY)

    def call() -> list[Any]:
        with openai_client(w) as client:
            stream = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=HELLO,
                stream=True,
                stream_options={"include_usage": True},
            )
            with stream:
                return list(stream)

    chunks = await asyncio.to_thread(call)

    assert [c.choices[0].delta.content for c in chunks[:-1]] == ["hel", "lo"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == 5
    sent = json.loads(w.upstream.seen[0].body)
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert w.upstream.seen[0].headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert_only_real_key_upstream(w, 1)


async def test_openai_async_streaming_arrives_chunk_by_chunk(connect: Connect) -> None:
    w = await connect("openai", OPENAI_KEY)
    w.upstream.gate = gate = asyncio.Event()
    async with async_openai_client(w) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
        async with stream:
            # The upstream sends the rest only after this first chunk has reached the SDK.
            async with asyncio.timeout(EVENT_WAIT_S):
                first = await anext(stream)
            gate.set()
            async with asyncio.timeout(EVENT_WAIT_S):
                rest = [chunk async for chunk in stream]

    assert first.choices[0].delta.content == "hel"
    assert [c.choices[0].delta.content for c in rest[:-1]] == ["lo"]
    assert rest[-1].choices == []
    assert rest[-1].usage.total_tokens == 5
    assert_only_real_key_upstream(w, 1)


async def test_openai_sdk_sees_the_gateway_refusal(connect: Connect) -> None:
    w = await connect("openai", OPENAI_KEY)
    unknown = "AIzaWT_" + "u" * 43
    async with async_openai_client(w, unknown) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)

    assert refused.value.status_code == 401
    assert refused.value.code == "unauthenticated"
    assert w.upstream.seen == []


# Stripe


def stripe_client(w: Wired, http: stripe.HTTPClient, token: str | None = None) -> Any:
    return stripe.StripeClient(
        token or w.token,
        base_addresses={"api": gateway_url(w) + "/stripe"},
        stripe_version=STRIPE_VERSION,
        max_network_retries=0,
        http_client=http,
    )


async def test_stripe_sync_client(connect: Connect) -> None:
    w = await connect("stripe", STRIPE_KEY)

    def call() -> tuple[Any, Any, Any]:
        # requests sessions are per thread: create, use and close them in this one.
        http = stripe.RequestsClient(timeout=SDK_TIMEOUT_S)
        try:
            client = stripe_client(w, http)
            customer = client.v1.customers.create(
                params={"email": "ada@example.com", "metadata": {"order": "A1"}},
                options={"idempotency_key": "idem-cus-1"},
            )
            charge = client.v1.charges.create(
                params={"amount": 2000, "currency": "eur", "customer": customer.id}
            )
            listing = client.v1.customers.list(params={"limit": 1})
            return customer, charge, listing
        finally:
            http.close()

    customer, charge, listing = await asyncio.to_thread(call)

    assert customer.id == "cus_fake1"
    assert customer.email == "ada@example.com"
    assert customer.metadata["order"] == "A1"
    assert customer.last_response.request_id == "req_fake1"
    assert (charge.id, charge.amount, charge.status) == ("ch_fake1", 2000, "succeeded")
    assert charge.last_response.request_id == "req_fake2"
    assert [c.id for c in listing.data] == ["cus_fake1"]

    create, pay, show = w.upstream.seen
    for seen in (create, pay, show):
        assert seen.headers["Authorization"] == f"Bearer {STRIPE_KEY}"
        assert seen.headers["Stripe-Version"] == STRIPE_VERSION
    assert (create.method, create.path) == ("POST", "/v1/customers")
    assert create.headers["Idempotency-Key"] == "idem-cus-1"
    assert create.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert create.form() == {"email": "ada@example.com", "metadata[order]": "A1"}
    assert (pay.method, pay.path) == ("POST", "/v1/charges")
    assert pay.form() == {"amount": "2000", "currency": "eur", "customer": "cus_fake1"}
    assert (show.method, show.path, show.query) == ("GET", "/v1/customers", {"limit": "1"})
    assert_only_real_key_upstream(w, 3)


async def test_stripe_async_client(connect: Connect) -> None:
    w = await connect("stripe", STRIPE_KEY)
    http = stripe.AIOHTTPClient(timeout=SDK_TIMEOUT_S)
    try:
        customer = await stripe_client(w, http).v1.customers.retrieve_async("cus_42")
    finally:
        await http.close_async()

    assert (customer.id, customer.object) == ("cus_42", "customer")
    assert customer.last_response.request_id == "req_fake1"
    (seen,) = w.upstream.seen
    assert (seen.method, seen.path) == ("GET", "/v1/customers/cus_42")
    assert seen.headers["Authorization"] == f"Bearer {STRIPE_KEY}"
    assert seen.headers["Stripe-Version"] == STRIPE_VERSION
    assert_only_real_key_upstream(w, 1)


async def test_stripe_sdk_sees_the_gateway_refusal(connect: Connect) -> None:
    w = await connect("stripe", STRIPE_KEY)
    http = stripe.AIOHTTPClient(timeout=SDK_TIMEOUT_S)
    client = stripe_client(w, http, "AIzaWT_" + "u" * 43)
    try:
        with pytest.raises(stripe.AuthenticationError) as refused:
            await client.v1.customers.create_async(params={"email": "ada@example.com"})
    finally:
        await http.close_async()

    assert refused.value.http_status == 401
    assert refused.value.json_body["error"]["code"] == "unauthenticated"
    assert w.upstream.seen == []


# Google Maps: the key travels as `?key=`, and the SDK insists that it starts with "AIza".


async def test_googlemaps_client_geocode(connect: Connect) -> None:
    w = await connect("googlemaps", MAPS_KEY, "query:key")
    address = "1600 Amphitheatre Parkway, Mountain View, CA"

    def call() -> list[dict[str, Any]]:
        client = googlemaps.Client(
            key=w.token, base_url=gateway_url(w) + "/googlemaps", timeout=SDK_TIMEOUT_S
        )
        try:
            results: list[dict[str, Any]] = client.geocode(address)
            return results
        finally:
            client.session.close()

    results = await asyncio.to_thread(call)

    assert results[0]["formatted_address"] == address
    assert results[0]["geometry"]["location"]["lat"] == pytest.approx(37.42, abs=0.01)
    (seen,) = w.upstream.seen
    assert (seen.method, seen.path) == ("GET", "/maps/api/geocode/json")
    assert seen.query == {"address": address, "key": MAPS_KEY}
    assert_only_real_key_upstream(w, 1)


async def test_googlemaps_sdk_sees_the_gateway_refusal(connect: Connect) -> None:
    w = await connect("googlemaps", MAPS_KEY, "query:key")

    def call() -> None:
        client = googlemaps.Client(
            key="AIzaWT_" + "u" * 43, base_url=gateway_url(w) + "/googlemaps", timeout=5
        )
        try:
            client.geocode("Paris")
        finally:
            client.session.close()

    # Google-style: HTTP 200 with status REQUEST_DENIED, which the SDK raises as its ApiError.
    with pytest.raises(googlemaps.exceptions.ApiError) as refused:
        await asyncio.to_thread(call)
    assert refused.value.status == "REQUEST_DENIED"
    assert w.upstream.seen == []


# OpenWeather has no official SDK: plain `requests` with the token as `appid`.


async def test_openweather_plain_http(connect: Connect) -> None:
    w = await connect("openweather", WEATHER_KEY, "query:appid")

    def call() -> tuple[int, dict[str, Any]]:
        with requests.Session() as session:
            resp = session.get(
                gateway_url(w) + "/openweather/data/2.5/weather",
                params={"q": "Paris", "units": "metric", "appid": w.token},
                timeout=SDK_TIMEOUT_S,
            )
            return resp.status_code, resp.json()

    status, body = await asyncio.to_thread(call)

    assert status == 200
    assert body["name"] == "Paris"
    assert body["main"]["temp"] == 21.5
    (seen,) = w.upstream.seen
    assert seen.path == "/data/2.5/weather"
    assert seen.query == {"q": "Paris", "units": "metric", "appid": WEATHER_KEY}
    assert "Authorization" not in seen.headers
    assert_only_real_key_upstream(w, 1)


# The `/proxy` envelope


@pytest.mark.parametrize(
    ("placement", "named_in"),
    [("Authorization", "X-Service-Hint"), ("X-Wallet-Token", "envelope")],
)
async def test_proxy_envelope_stripe_charge(
    connect: Connect, placement: str, named_in: str
) -> None:
    w = await connect("stripe", STRIPE_KEY)
    headers = {placement: f"Bearer {w.token}" if placement == "Authorization" else w.token}
    envelope: dict[str, Any] = {
        "endpoint": "/v1/charges",
        "method": "POST",
        "body": {"amount": 2000, "currency": "eur", "metadata": {"order": "A1"}},
        "headers": {"Idempotency-Key": "idem-env-1", "Stripe-Version": STRIPE_VERSION},
    }
    if named_in == "X-Service-Hint":
        headers["X-Service-Hint"] = "stripe"
    else:
        envelope["service"] = "stripe"

    resp = await w.gateway.post("/proxy", headers=headers, json=envelope)

    assert resp.status == 200, await resp.text()
    charge = await resp.json()
    assert (charge["object"], charge["id"], charge["amount"]) == ("charge", "ch_fake1", 2000)
    assert resp.headers["Request-Id"] == "req_fake1"
    (seen,) = w.upstream.seen
    assert (seen.method, seen.path) == ("POST", "/v1/charges")
    assert seen.headers["Authorization"] == f"Bearer {STRIPE_KEY}"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert seen.headers["Idempotency-Key"] == "idem-env-1"
    assert seen.headers["Stripe-Version"] == STRIPE_VERSION
    assert "X-Service-Hint" not in seen.headers
    assert seen.form() == {"amount": "2000", "currency": "eur", "metadata[order]": "A1"}
    assert_only_real_key_upstream(w, 1)


async def test_proxy_envelope_query_key_service(connect: Connect) -> None:
    w = await connect("googlemaps", MAPS_KEY, "query:key")
    resp = await w.gateway.post(
        "/proxy",
        headers={"X-Wallet-Token": w.token},
        json={
            "service": "googlemaps",
            "endpoint": "/maps/api/geocode/json",
            "query": {"address": "Paris"},
        },
    )

    assert resp.status == 200, await resp.text()
    assert (await resp.json())["status"] == "OK"
    (seen,) = w.upstream.seen
    assert (seen.method, seen.path) == ("GET", "/maps/api/geocode/json")
    assert seen.query == {"address": "Paris", "key": MAPS_KEY}
    assert_only_real_key_upstream(w, 1)


# Server-Sent Events are relayed as they are produced, not when the stream ends.


async def test_sse_events_reach_the_client_one_by_one(connect: Connect) -> None:
    w = await connect("openai", OPENAI_KEY)
    w.upstream.gate = gate = asyncio.Event()

    resp = await w.gateway.get("/openai/v1/events", headers={"X-Wallet-Token": w.token})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    # The upstream sends event 2 only once event 1 is here: a buffering gateway times out.
    async with asyncio.timeout(EVENT_WAIT_S):
        first = await resp.content.readuntil(b"\n\n")
    assert first == b"event: tick\ndata: 1\n\n"
    gate.set()
    async with asyncio.timeout(EVENT_WAIT_S):
        second = await resp.content.readuntil(b"\n\n")
        rest = await resp.content.read()

    assert second == b"event: tick\ndata: 2\n\n"
    assert rest == b""
    assert_only_real_key_upstream(w, 1)


# A spent quota, as each SDK sees it: its own rate-limit error, and no retry storm.


async def set_quota(w: Wired, quota: int) -> None:
    resp = await w.admin.put(
        f"/keys/{w.key_id}",
        headers=w.jwt,
        json={"metadata": {"quota": quota, "quotaPeriod": "minute"}},
    )
    assert resp.status == 200, await resp.text()
    # The admin app announces the change over pub/sub; don't race it.
    w.gateway.app[KEYPOOL].clear()


async def test_stripe_sdk_raises_its_rate_limit_error_on_a_spent_quota(connect: Connect) -> None:
    w = await connect("stripe", STRIPE_KEY)
    await set_quota(w, 1)

    def call() -> Any:
        http = stripe.RequestsClient(timeout=SDK_TIMEOUT_S)
        try:
            client = stripe_client(w, http)
            client.v1.customers.list(params={"limit": 1})
            with pytest.raises(stripe.RateLimitError) as refused:
                client.v1.customers.list(params={"limit": 1})
            return refused.value
        finally:
            http.close()

    error = await asyncio.to_thread(call)
    assert error.http_status == 429
    assert error.json_body["error"]["code"] == "quota_exhausted"
    assert error.json_body["error"]["type"] == "rate_limit_error"
    assert len(w.upstream.seen) == 1


async def test_googlemaps_sdk_raises_over_query_limit_on_a_spent_quota(
    connect: Connect,
) -> None:
    w = await connect("googlemaps", MAPS_KEY, "query:key")
    await set_quota(w, 1)

    def call() -> Any:
        client = googlemaps.Client(
            key=w.token,
            base_url=gateway_url(w) + "/googlemaps",
            retry_over_query_limit=False,
            timeout=SDK_TIMEOUT_S,
        )
        client.geocode("Paris")
        with pytest.raises(googlemaps.exceptions.ApiError) as refused:
            client.geocode("Paris")
        return refused.value

    error = await asyncio.to_thread(call)
    assert error.status == "OVER_QUERY_LIMIT"
    assert "quota" in error.message
    assert len(w.upstream.seen) == 1
