"""The gateway as a reverse proxy: plain HTTP clients against a fake upstream on loopback."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.fakes import FakeUpstream

OPENAI_KEY = "sk-proj-" + "R" * 40


@dataclass
class Wired:
    admin: TestClient[Any, Any]
    gateway: TestClient[Any, Any]
    upstream: FakeUpstream
    server: TestServer
    token: str
    token_id: str
    key_id: str
    jwt: dict[str, str]


async def wire(
    admin: TestClient[Any, Any],
    gateway: TestClient[Any, Any],
    jwt: dict[str, str],
    aiohttp_server: Any,
    service: str = "openai",
    key: str = OPENAI_KEY,
    auth: str = "bearer",
) -> Wired:
    upstream = FakeUpstream(key, auth)
    server = await aiohttp_server(upstream.app())
    base = f"http://127.0.0.1:{server.port}"
    resp = await admin.put(f"/services/{service}", headers=jwt, json={"base_url": base})
    assert resp.status == 200, await resp.text()
    resp = await admin.post("/keys", headers=jwt, json={"key": key, "service": service})
    assert resp.status == 201, await resp.text()
    key_id = (await resp.json())["id"]
    resp = await admin.post("/tokens", headers=jwt, json={"name": "app", "services": [service]})
    assert resp.status == 201
    token = await resp.json()
    return Wired(admin, gateway, upstream, server, token["token"], token["id"], key_id, jwt)


@pytest.fixture
async def wired(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> Wired:
    return await wire(admin_client, gateway_client, as_admin, aiohttp_server)


async def test_forwards_with_the_real_key_and_never_the_token(
    wired: Wired, captured_logs: Any
) -> None:
    resp = await wired.gateway.post(
        "/openai/v1/models?x=1",
        headers={"Authorization": f"Bearer {wired.token}", "OpenAI-Organization": "org-1"},
        json={"hello": "world"},
    )
    assert resp.status == 200, captured_logs.getvalue()
    assert (await resp.json())["path"] == "/v1/models"
    assert resp.headers["X-Wallet-Key-Id"] == wired.key_id
    assert resp.headers["X-Wallet-Fallbacks"] == "0"
    assert resp.headers["X-Wallet-Request-Id"]
    assert resp.headers["x-request-id"] == "req_upstream_1"
    seen = wired.upstream.seen[-1]
    assert seen.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert seen.headers["OpenAI-Organization"] == "org-1"
    assert seen.query == {"x": "1"}
    assert seen.body == b'{"hello": "world"}'
    everything = str(seen.headers) + str(seen.query) + seen.body.decode()
    assert wired.token not in everything


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer AIzaWT_" + "x" * 43},
        {"Authorization": f"Bearer {OPENAI_KEY}"},
        {"X-Wallet-Token": "nonsense"},
    ],
)
async def test_bad_credentials_never_reach_upstream(wired: Wired, headers: dict[str, str]) -> None:
    resp = await wired.gateway.get("/openai/v1/models", headers=headers)
    assert resp.status == 401
    body = await resp.json()
    assert body["error"]["code"] == "unauthenticated"
    assert wired.upstream.seen == []


async def test_token_out_of_scope_is_forbidden(wired: Wired) -> None:
    resp = await wired.gateway.get(
        "/stripe/v1/charges", headers={"Authorization": f"Bearer {wired.token}"}
    )
    assert resp.status == 403
    assert wired.upstream.seen == []


async def test_unknown_service_is_404(wired: Wired) -> None:
    resp = await wired.gateway.get("/nope/v1", headers={"X-Wallet-Token": wired.token})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "unknown_service"


async def test_revoked_token_stops_within_a_second(wired: Wired) -> None:
    auth = {"X-Wallet-Token": wired.token}
    assert (await wired.gateway.get("/openai/v1/models", headers=auth)).status == 200
    resp = await wired.admin.delete(f"/tokens/{wired.token_id}", headers=wired.jwt)
    assert resp.status == 204
    for _ in range(20):
        if (await wired.gateway.get("/openai/v1/models", headers=auth)).status == 401:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("revoked token still accepted after a second")


async def test_redirects_are_relayed_not_followed_and_key_scrubbed(wired: Wired) -> None:
    resp = await wired.gateway.get(
        "/openai/redirect", headers={"X-Wallet-Token": wired.token}, allow_redirects=False
    )
    assert resp.status == 302
    assert OPENAI_KEY not in resp.headers["Location"]
    assert resp.headers["Location"].startswith("https://elsewhere.example/next?key=")
    assert len(wired.upstream.seen) == 1


async def test_key_echoed_by_upstream_is_scrubbed(wired: Wired) -> None:
    resp = await wired.gateway.get("/openai/echo-key", headers={"X-Wallet-Token": wired.token})
    text = await resp.text()
    assert resp.status == 200
    assert OPENAI_KEY not in text
    assert OPENAI_KEY not in str(resp.headers)
    assert text == "your key is [redacted]!"


@pytest.mark.parametrize(
    "path",
    ["/openai/v1/../x", "/openai/v1/%2e%2e/x", "/openai/v1%2f..%2fx", "/openai/a%5cb"],
)
async def test_dot_segments_refused(wired: Wired, path: str) -> None:
    # Sent raw: HTTP clients (yarl included) normalise dot segments before sending.
    status, _ = await raw_request(wired.gateway, f"GET {path} HTTP/1.1", wired.token)
    assert status in (400, 404)
    assert wired.upstream.seen == []


async def raw_request(client: TestClient[Any, Any], line: str, token: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    head = f"{line}\r\nHost: 127.0.0.1\r\nX-Wallet-Token: {token}\r\nConnection: close\r\n\r\n"
    writer.write(head.encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    return int(data.split(b" ", 2)[1]), data


async def test_no_key_for_service_is_a_clear_4xx(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
) -> None:
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "t", "services": ["stripe"]}
    )
    token = (await resp.json())["token"]
    resp = await gateway_client.get("/stripe/v1/charges", headers={"X-Wallet-Token": token})
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "no_key"


async def test_query_slot_service(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    key = "0123456789abcdef0123456789abcdef"
    w = await wire(
        admin_client, gateway_client, as_admin, aiohttp_server, "openweather", key, "query:appid"
    )
    resp = await gateway_client.get(f"/openweather/data/2.5/weather?q=Paris&appid={w.token}")
    assert resp.status == 200, await resp.text()
    seen = w.upstream.seen[-1]
    assert seen.query == {"q": "Paris", "appid": key}
    assert w.token not in seen.raw_path


async def test_proxy_envelope_stripe_form_body(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    key = "sk_test_" + "S" * 24
    w = await wire(admin_client, gateway_client, as_admin, aiohttp_server, "stripe", key)
    resp = await gateway_client.post(
        "/proxy",
        headers={"Authorization": f"Bearer {w.token}", "X-Service-Hint": "stripe"},
        json={
            "endpoint": "/v1/charges",
            "method": "POST",
            "body": {"amount": 100, "metadata": {"order": "A1"}, "expand": ["customer"]},
            "headers": {"Idempotency-Key": "idem-1", "Authorization": "Bearer nope"},
            "query": {"x": 1},
        },
    )
    assert resp.status == 200, await resp.text()
    seen = w.upstream.seen[-1]
    assert seen.path == "/v1/charges"
    assert seen.query == {"x": "1"}
    assert seen.headers["Authorization"] == f"Bearer {key}"
    assert seen.headers["Idempotency-Key"] == "idem-1"
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert seen.body == b"amount=100&metadata%5Border%5D=A1&expand%5B0%5D=customer"


@pytest.mark.parametrize(
    "endpoint", ["http://evil.example/v1", "//evil.example/v1", "/v1/../../x", "v1/charges"]
)
async def test_proxy_envelope_endpoint_is_a_path(wired: Wired, endpoint: str) -> None:
    resp = await wired.gateway.post(
        "/proxy",
        headers={"X-Wallet-Token": wired.token},
        json={"service": "openai", "endpoint": endpoint, "method": "GET"},
    )
    assert resp.status == 400
    assert wired.upstream.seen == []


async def test_metrics_count_requests_by_service_and_status_class(wired: Wired) -> None:
    ok = {"X-Wallet-Token": wired.token}
    assert (await wired.gateway.get("/openai/v1/models", headers=ok)).status == 200
    assert (await wired.gateway.get("/openai/v1/models", headers=ok)).status == 200
    assert (await wired.gateway.get("/openai/v1/models")).status == 401
    assert (await wired.gateway.get("/no-such-service-xyz/v1", headers=ok)).status == 404
    text = await (await wired.gateway.get("/monitoring/metrics")).text()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    proxied = 'wallet_proxied_requests_total{app="gateway",mode="reverse",service="%s",status="%s"}'
    assert samples[proxied % ("openai", "2xx")] == "2"
    assert samples[proxied % ("openai", "4xx")] == "1"
    # A slug nobody configured is never a label value (clients can't grow the series).
    assert samples[proxied % ("unknown", "4xx")] == "1"
    assert "no-such-service-xyz" not in text
    assert 'wallet_upstream_latency_seconds_count{app="gateway",service="openai"} 2' in text
    assert 'wallet_gateway_overhead_seconds_count{app="gateway",service="openai"} 2' in text
    assert 'wallet_errors_total{app="gateway",code="unauthenticated"} 1' in text
