"""Every error of both apps answers one JSON shape, with the right status, the request id of
its response header and the security headers; garbage from a client never yields a 5xx."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from yarl import URL

from admin.app import create_app as create_admin_app
from gateway.settings import Settings
from tests.conftest import World, login

ADMIN_RID = "X-Request-Id"
GATEWAY_RID = "X-Wallet-Request-Id"
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
SMALL_MAX = 2048


async def assert_error(
    resp: ClientResponse, status: int | None, code: str | set[str] | None, request_id_header: str
) -> dict[str, Any]:
    """The response is the one error shape with `status` and `code` (None: any); returns
    the error object."""
    text = await resp.text()
    assert resp.status == status if status is not None else resp.status >= 400, text
    assert resp.content_type == "application/json", text
    body = await resp.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message", "request_id"} <= set(error), error
    assert isinstance(error["code"], str), error
    assert SNAKE.match(error["code"]), error
    if code is not None:
        assert error["code"] in ({code} if isinstance(code, str) else code), error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    assert isinstance(error["request_id"], str), error
    assert error["request_id"], error
    assert error["request_id"] == resp.headers[request_id_header]
    assert_security_headers(resp)
    return error  # type: ignore[no-any-return]


def assert_security_headers(resp: ClientResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers.get(name) == value, (name, dict(resp.headers))


@dataclass(frozen=True)
class Case:
    """One request to the admin app and the error it must produce."""

    id: str
    method: str
    path: str
    status: int
    code: str
    auth: str | None = "admin"  # "admin", "alice" or None
    json: Any = None
    data: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


ADMIN_CASES = (
    Case("unknown-path", "GET", "/no/such/path", 404, "not_found"),
    Case("unknown-path-anon", "GET", "/nothing-here", 404, "not_found", auth=None),
    Case("method-not-allowed", "PATCH", "/keys", 405, "method_not_allowed"),
    Case("method-not-allowed-login", "GET", "/auth/login", 405, "method_not_allowed", auth=None),
    Case(
        "malformed-json",
        "POST",
        "/auth/login",
        400,
        "invalid_json",
        auth=None,
        data=b'{"username": "admin", ',
        headers={"Content-Type": "application/json"},
    ),
    Case(
        "empty-body",
        "POST",
        "/keys",
        400,
        "invalid_json",
        data=b"",
        headers={"Content-Type": "application/json"},
    ),
    Case("json-array", "POST", "/keys", 422, "validation_error", json=["sk-test"]),
    Case("json-string", "POST", "/auth/login", 422, "validation_error", auth=None, json="x"),
    Case(
        "text-plain",
        "POST",
        "/keys",
        415,
        "unsupported_media_type",
        data=b'{"key": "x"}',
        headers={"Content-Type": "text/plain"},
    ),
    Case("missing-auth", "GET", "/keys", 401, "unauthenticated", auth=None),
    Case("missing-auth-post", "POST", "/tokens", 401, "unauthenticated", auth=None, json={}),
    Case(
        "bad-bearer",
        "GET",
        "/keys",
        401,
        "unauthenticated",
        auth=None,
        headers={"Authorization": "Bearer not.a.jwt"},
    ),
    Case(
        "basic-auth",
        "GET",
        "/tokens",
        401,
        "unauthenticated",
        auth=None,
        headers={"Authorization": "Basic YWRtaW46eA=="},
    ),
    Case(
        "wrong-password",
        "POST",
        "/auth/login",
        401,
        "unauthenticated",
        auth=None,
        json={"username": "admin", "password": "definitely-not-it"},
    ),
    Case("user-lists-users", "GET", "/users", 403, "forbidden", auth="alice"),
    Case("user-reads-audit", "GET", "/audit", 403, "forbidden", auth="alice"),
    Case(
        "user-adds-service",
        "POST",
        "/services",
        403,
        "forbidden",
        auth="alice",
        json={"slug": "x", "base_url": "https://x.example", "auth": {"type": "bearer"}},
    ),
    Case(
        "validation-priority",
        "POST",
        "/keys",
        422,
        "validation_error",
        json={"key": "sk-test-abcdefghijklmnop", "service": "openai", "priority": "high"},
    ),
    Case(
        "validation-unknown-field",
        "POST",
        "/tokens",
        422,
        "validation_error",
        json={"name": "x", "services": ["openai"], "colour": "red"},
    ),
    Case(
        "validation-short-password",
        "POST",
        "/users",
        422,
        "validation_error",
        json={"username": "carol", "password": "short"},
    ),
    Case(
        "login-missing-fields", "POST", "/auth/login", 422, "validation_error", auth=None, json={}
    ),
    Case("unknown-service", "GET", "/services/no-such-service", 404, "unknown_service"),
    Case(
        "unknown-service-in-key",
        "POST",
        "/keys",
        404,
        "unknown_service",
        json={"key": "abcdefghijklmnopqrstuvwx", "service": "no-such-service"},
    ),
    Case(
        "unknown-service-in-token",
        "POST",
        "/tokens",
        404,
        "unknown_service",
        json={"name": "t", "services": ["no-such-service"]},
    ),
    Case("malformed-key-id", "GET", "/keys/not-a-uuid", 404, "not_found"),
    Case("missing-key-id", "GET", "/keys/00000000-0000-4000-8000-000000000000", 404, "not_found"),
    Case("malformed-token-id", "DELETE", "/tokens/%00", 404, "not_found"),
    Case("limit-zero", "GET", "/keys?limit=0", 422, "validation_error"),
    Case("limit-abc", "GET", "/keys?limit=abc", 422, "validation_error"),
    Case("limit-too-big", "GET", "/services?limit=100000", 422, "validation_error"),
    Case("offset-negative", "GET", "/tokens?offset=-1", 422, "validation_error"),
    Case("users-limit-abc", "GET", "/users?limit=abc", 422, "validation_error"),
    Case("audit-limit-zero", "GET", "/audit?limit=0", 422, "validation_error"),
    Case("bad-tier-filter", "GET", "/keys?tier=gold", 422, "validation_error"),
    # Text PostgreSQL cannot store, or that is not valid Unicode, is the client's fault.
    Case(
        "nul-in-username",
        "POST",
        "/auth/login",
        400,
        "bad_request",
        auth=None,
        json={"username": "ad\u0000min", "password": "whatever-it-is"},
    ),
    Case("nul-in-slug", "GET", "/services/%00", 400, "bad_request"),
    Case("nul-in-filter", "GET", "/audit?actor=%00", 400, "bad_request"),
    Case(
        "nul-in-metadata",
        "POST",
        "/keys",
        400,
        "bad_request",
        json={"key": "abcdefghijklmnopqrstuvwxyz", "service": "openai", "metadata": {"a": "\0"}},
    ),
    Case(
        "lone-surrogate-username",
        "POST",
        "/auth/login",
        400,
        "invalid_json",
        auth=None,
        data=b'{"username": "\\ud800", "password": "whatever-it-is"}',
        headers={"Content-Type": "application/json"},
    ),
    Case(
        "lone-surrogate-password",
        "POST",
        "/auth/login",
        400,
        "invalid_json",
        auth=None,
        data=b'{"username": "admin", "password": "\\udfff-whatever-it-is"}',
        headers={"Content-Type": "application/json"},
    ),
    Case(
        "lone-surrogate-key-name",
        "POST",
        "/keys",
        400,
        "invalid_json",
        data=b'{"key": "abcdefghijklmnopqrstuvwxyz", "service": "openai", "name": "\\ud800"}',
        headers={"Content-Type": "application/json"},
    ),
    Case(
        "last-admin",
        "PUT",
        "/users/me",
        409,
        "conflict",
        json={"role": "USER"},
    ),
)


@pytest.mark.parametrize("case", ADMIN_CASES, ids=[c.id for c in ADMIN_CASES])
async def test_admin_error_shape(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    case: Case,
) -> None:
    headers = {**({"admin": as_admin, "alice": as_alice}.get(case.auth or "", {})), **case.headers}
    kwargs: dict[str, Any] = {"headers": headers}
    if case.json is not None:
        kwargs["json"] = case.json
    elif case.data is not None:
        kwargs["data"] = case.data
    resp = await admin_client.request(case.method, URL(case.path, encoded=True), **kwargs)
    error = await assert_error(resp, case.status, case.code, ADMIN_RID)
    if case.status == 405:
        allow = {m.strip() for m in resp.headers["Allow"].split(",")}
        assert allow
        assert case.method not in allow
        assert allow <= {"GET", "HEAD", "POST", "PUT", "DELETE"}
    if case.status == 401:
        assert resp.headers.get("WWW-Authenticate") == "Bearer"
    if case.code == "validation_error" and case.json is not None:
        assert error.get("field"), error


async def test_405_names_the_allowed_methods(admin_client: TestClient[Any, Any]) -> None:
    resp = await admin_client.delete("/auth/login")
    await assert_error(resp, 405, "method_not_allowed", ADMIN_RID)
    assert resp.headers["Allow"] == "POST"


GATEWAY_CASES = (
    Case("unknown-service", "GET", "/no-such-service/v1/things", 404, "unknown_service"),
    Case("unknown-service-root", "POST", "/no-such-service", 404, "unknown_service"),
    Case("unknown-monitoring-path", "GET", "/monitoring/nope", 404, "not_found"),
    Case("method-not-allowed-health", "POST", "/monitoring/health", 405, "method_not_allowed"),
    Case("method-not-allowed-metrics", "DELETE", "/monitoring/metrics", 405, "method_not_allowed"),
    Case("missing-token", "GET", "/openai/v1/models", 401, "unauthenticated"),
    Case(
        "unknown-token",
        "GET",
        "/openai/v1/models",
        401,
        "unauthenticated",
        headers={"Authorization": "Bearer AIzaWT_" + "x" * 43},
    ),
    Case(
        "unknown-token-in-query",
        "GET",
        "/openweather/data/2.5/weather?appid=AIzaWT_" + "y" * 43,
        401,
        "unauthenticated",
    ),
)


@pytest.mark.parametrize("case", GATEWAY_CASES, ids=[c.id for c in GATEWAY_CASES])
async def test_gateway_error_shape(gateway_client: TestClient[Any, Any], case: Case) -> None:
    resp = await gateway_client.request(case.method, case.path, headers=case.headers)
    await assert_error(resp, case.status, case.code, GATEWAY_RID)
    if case.status == 405:
        assert "GET" in resp.headers["Allow"]
        assert case.method not in resp.headers["Allow"]
    # An error the wallet answers itself carries no key id: no key was used.
    assert "X-Wallet-Key-Id" not in resp.headers


async def test_googlemaps_paths_answer_errors_the_google_way(
    gateway_client: TestClient[Any, Any],
) -> None:
    """Google's web services report errors with HTTP 200 and a JSON `status`, which is all the
    googlemaps SDK reads; the one error shape is still there under `error`."""
    resp = await gateway_client.get(
        "/googlemaps/maps/api/geocode/json?address=x&key=AIzaWT_" + "y" * 43
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "REQUEST_DENIED"
    assert body["error_message"] == body["error"]["message"]
    assert body["error"]["code"] == "unauthenticated"
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["request_id"] == resp.headers[GATEWAY_RID]


@pytest.fixture
async def small_admin(
    aiohttp_client: Any, settings: Settings, world: World
) -> TestClient[Any, Any]:
    app = create_admin_app(replace(settings, max_body_bytes=SMALL_MAX))
    client: TestClient[Any, Any] = await aiohttp_client(app)
    return client


@pytest.mark.parametrize("path", ["/auth/login", "/keys", "/users"])
async def test_body_over_max_is_413(small_admin: TestClient[Any, Any], path: str) -> None:
    headers = {**(await login(small_admin)), "Content-Type": "application/json"}
    body = b'{"username": "' + b"a" * (SMALL_MAX * 2) + b'"}'
    resp = await small_admin.post(path, data=body, headers=headers)
    await assert_error(resp, 413, "payload_too_large", ADMIN_RID)

    # Just under the limit is read and judged on its content instead.
    small = b'{"username": "' + b"a" * (SMALL_MAX // 2) + b'"}'
    resp = await small_admin.post(
        "/auth/login", data=small, headers={"Content-Type": "application/json"}
    )
    await assert_error(resp, 422, "validation_error", ADMIN_RID)


async def test_request_ids_are_unique(admin_client: TestClient[Any, Any]) -> None:
    ids = set()
    for _ in range(5):
        resp = await admin_client.get("/keys")
        ids.add((await assert_error(resp, 401, "unauthenticated", ADMIN_RID))["request_id"])
    assert len(ids) == 5


async def test_successes_carry_request_id_and_security_headers(
    admin_client: TestClient[Any, Any], gateway_client: TestClient[Any, Any]
) -> None:
    for client, header in ((admin_client, ADMIN_RID), (gateway_client, GATEWAY_RID)):
        resp = await client.get("/monitoring/health")
        assert resp.status == 200
        assert resp.headers[header]
        assert_security_headers(resp)
    # The gateway's own id never hides behind an upstream-style X-Request-Id.
    resp = await gateway_client.get("/monitoring/health")
    assert ADMIN_RID not in resp.headers


# --- garbage -----------------------------------------------------------------------------

WEIRD_PATHS = (
    "/%2e%2e/",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/keys/%00",
    "/keys/%ff%fe",
    "/keys/..%2f..%2fusers",
    "/users/%2e%2e",
    "/services/%00%00",
    "/services/" + "a" * 4000,
    "//keys",
    "/keys/../../users",
    "/tokens/%E2%80%AE",
    "/keys?limit=%00",
    "/keys?limit=1e9999",
    "/keys?offset=99999999999999999999999",
    "/audit?actor=%ff&target_id=%00",
    "/users/me/password/%2F",
    "/monitoring/health/../metrics",
    "/openapi.json%00",
)


async def raw_request(host: str, port: int, payload: bytes) -> bytes:
    """Send raw bytes on a fresh connection; the first line of the answer (or b'')."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.readline()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()


def status_of(line: bytes) -> int | None:
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


@pytest.mark.parametrize("which", ["admin", "gateway"])
async def test_garbage_never_yields_5xx(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    which: str,
) -> None:
    client = admin_client if which == "admin" else gateway_client
    rid_header = ADMIN_RID if which == "admin" else GATEWAY_RID
    rng = random.Random(1234)  # deterministic garbage
    statuses: list[int] = []

    # Random bytes as bodies, under several content types, to every route with a body.
    for path in ("/auth/login", "/keys", "/tokens", "/users", "/services", "/proxy", "/openai/x"):
        for content_type in ("application/json", "application/x-www-form-urlencoded", "", None):
            for size in (1, 17, 600):
                body = rng.randbytes(size)
                headers = dict(as_admin)
                if content_type is not None:
                    headers["Content-Type"] = content_type
                for method in ("POST", "PUT"):
                    resp = await client.request(method, path, data=body, headers=headers)
                    statuses.append(resp.status)
                    assert resp.status < 500, (method, path, body, await resp.text())
                    if resp.status >= 400:
                        await assert_error(resp, None, None, rid_header)

    # Deeply nested JSON (unclosed, and closed) and a lone surrogate.
    for body in (b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b'"\\ud800"'):
        resp = await client.post(
            "/keys", data=body, headers={**as_admin, "Content-Type": "application/json"}
        )
        statuses.append(resp.status)
        assert resp.status < 500, await resp.text()
        await assert_error(resp, None, None, rid_header)

    # Weird paths, exactly as written (not normalised by a client).
    host, port = client.server.host, client.server.port
    assert port is not None
    for path in WEIRD_PATHS:
        url = URL(f"http://{host}:{port}{path}", encoded=True)
        for method in ("GET", "DELETE", "PUT"):
            resp = await client.session.request(method, url, headers=as_admin)
            statuses.append(resp.status)
            assert resp.status < 500, (method, path, await resp.text())
            if resp.status >= 400:
                await assert_error(resp, None, None, rid_header)

    # Hostile headers and malformed requests on the wire.
    raw = (
        b"GET /monitoring/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"A" * 9000 + b"\r\n\r\n",
        b"GET /keys HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(500))
        + b"\r\n",
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /keys/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /%2e%2e/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),
        rng.randbytes(300) + b"\r\n\r\n",
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /keys HTTP/9.9\r\nHost: x\r\n\r\n",
        b"BREW /keys HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n",
        b"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n\r\n",
        b"GET /openai/v1/models HTTP/1.1\r\nHost: x\r\nX-Wallet-Token: AIzaWT_\xc3\r\n\r\n",
        b"GET /googlemaps/maps/api/geocode/json?key=%ff%fe%00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /openweather/data/2.5/weather?appid=AIzaWT_%ff&appid=x HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    for payload in raw:
        status = status_of(await raw_request(host, port, payload))
        if status is not None:
            statuses.append(status)
            assert status < 500, payload[:80]

    assert statuses
    assert all(s < 500 for s in statuses)
    # Still serving, and still answering errors in the one shape.
    resp = await client.get("/monitoring/health")
    assert resp.status == 200, await resp.text()
    resp = await client.get("/no/such/thing")
    await assert_error(
        resp, 404, "not_found" if which == "admin" else "unknown_service", rid_header
    )
