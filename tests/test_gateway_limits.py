"""The gateway's limits under hostile or broken peers, through real servers on loopback.

Body size (declared and streamed), a client that stalls mid-body, an upstream that is slow to
answer or stalls mid-stream, a client that leaves mid-stream, an upstream that refuses
connections. Clients speak raw HTTP/1.1 over sockets where chunking, stalling or hanging up
must be controlled. The gateway runs under an AppRunner built like `admin/cli.py` builds it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from admin.cli import make_runner
from gateway.app import create_app as create_gateway_app
from gateway.settings import Settings
from tests.conftest import with_settings
from tests.test_gateway_proxy import OPENAI_KEY, wire

LIMIT = 4096
SSE_EVENT = b"data: {}\n\n"


# --- a scripted upstream -----------------------------------------------------------------


@dataclass
class Outcome:
    route: str
    how: str  # "complete", "cut" (connection lost or handler cancelled)
    received: int = 0  # request body bytes read, or events sent


@dataclass
class Scripted:
    """Routes that misbehave on purpose; each reports how its exchange ended."""

    outcomes: asyncio.Queue[Outcome] = field(default_factory=asyncio.Queue)
    started: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/upload", self.upload)
        app.router.add_get("/slow-headers", self.slow_headers)
        app.router.add_get("/stall", self.stall)
        app.router.add_get("/forever", self.forever)
        app.router.add_get("/ping", self.ping)
        return app

    async def outcome(self, within: float = 3.0) -> Outcome:
        async with asyncio.timeout(within):
            return await self.outcomes.get()

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({"pong": True, "auth": request.headers.get("Authorization")})

    async def upload(self, request: web.Request) -> web.Response:
        self.started.put_nowait("upload")
        total = 0
        try:
            async for chunk in request.content.iter_any():
                total += len(chunk)
        except (aiohttp.ClientPayloadError, ConnectionError, asyncio.CancelledError):
            self.outcomes.put_nowait(Outcome("upload", "cut", total))
            raise
        self.outcomes.put_nowait(Outcome("upload", "complete", total))
        return web.json_response({"bytes": total})

    async def slow_headers(self, request: web.Request) -> web.Response:
        self.started.put_nowait("slow-headers")
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.outcomes.put_nowait(Outcome("slow-headers", "cut"))
            raise
        self.outcomes.put_nowait(Outcome("slow-headers", "complete"))
        return web.json_response({"late": True})

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        return response

    async def stall(self, request: web.Request) -> web.StreamResponse:
        """Two events, then silence (longer than the gateway's read timeout)."""
        response = await self._sse(request)
        try:
            for _ in range(2):
                await response.write(SSE_EVENT)
            await asyncio.sleep(5)
        except (ConnectionError, asyncio.CancelledError):
            self.outcomes.put_nowait(Outcome("stall", "cut", 2))
            raise
        self.outcomes.put_nowait(Outcome("stall", "complete", 2))
        return response

    async def forever(self, request: web.Request) -> web.StreamResponse:
        """An event every `every` seconds (query), for up to five seconds."""
        every = float(request.query.get("every", "0.05"))
        response = await self._sse(request)
        sent = 0
        try:
            await response.write(SSE_EVENT)
            sent += 1
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await asyncio.sleep(every)
                await response.write(SSE_EVENT)
                sent += 1
        except (ConnectionError, asyncio.CancelledError):
            self.outcomes.put_nowait(Outcome("forever", "cut", sent))
            raise
        self.outcomes.put_nowait(Outcome("forever", "complete", sent))
        await response.write_eof()
        return response


# --- a gateway with small limits, wired to an upstream --------------------------------------


@dataclass
class Gate:
    port: int
    token: str
    upstream: Scripted

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


MakeGate = Callable[..., Awaitable[Gate]]


@pytest.fixture
async def make_gate(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    settings: Settings,
) -> AsyncIterator[MakeGate]:
    """`await make_gate(base_url=None, **settings_changes)`: the
    `openai` service pointed at a Scripted upstream (or `base_url`), a token for it, and a
    gateway started afterwards (so its catalog is fresh) with the given settings."""
    runners: list[web.AppRunner] = []

    async def make(base_url: str | None = None, **changes: Any) -> Gate:
        upstream = Scripted()
        if base_url is None:
            server = await aiohttp_server(upstream.app())
            base_url = f"http://127.0.0.1:{server.port}"
        # `wire` wants a gateway client only to hand it back; this test starts its own.
        wired = await wire(admin_client, admin_client, as_admin, aiohttp_server)
        resp = await admin_client.put(
            "/services/openai", headers=as_admin, json={"base_url": base_url}
        )
        assert resp.status == 200, await resp.text()
        defaults: dict[str, Any] = {
            "gateway_max_body_bytes": LIMIT,
            "client_idle_timeout_s": 1,
            "upstream_connect_timeout_s": 2,
            "upstream_read_timeout_s": 1,
            "upstream_total_timeout_s": 10,
        }
        app = create_gateway_app(with_settings(settings, **{**defaults, **changes}))
        # Served as production serves it (not TestServer, whose options differ); a short
        # drain only so that teardown doesn't wait on a request a test left hanging.
        runner = make_runner("gateway", app, shutdown_timeout=1)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        return Gate(port, wired.token, upstream)

    yield make
    for runner in runners:
        async with asyncio.timeout(5):
            await runner.cleanup()


# --- raw HTTP/1.1 ------------------------------------------------------------------------


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes


def head(gate: Gate, method: str, path: str, *extra: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{gate.port}",
        f"X-Wallet-Token: {gate.token}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ", 2)[1]), headers


async def read_response(reader: asyncio.StreamReader) -> Raw:
    """A whole response: a Content-Length body (the gateway's own errors) or a chunked one
    (anything relayed from upstream), which must end with its last chunk."""
    status, headers = await read_head(reader)
    if "content-length" in headers:
        return Raw(status, headers, await reader.readexactly(int(headers["content-length"])))
    assert headers["transfer-encoding"] == "chunked"
    body = b""
    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    assert await reader.readexactly(2) == b"\r\n"
    return Raw(status, headers, body)


def assert_json_error(resp: Raw, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, resp
    assert resp.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = json.loads(resp.body)["error"]
    assert error["code"] == code
    assert error["request_id"] == resp.headers["x-wallet-request-id"]
    return error


async def fetch(method: str, url: str, **kwargs: Any) -> Raw:
    """One request with an ordinary client, its response read whole."""
    async with (
        asyncio.timeout(4),
        aiohttp.ClientSession() as client,
        client.request(method, url, **kwargs) as resp,
    ):
        headers = {k.lower(): v for k, v in resp.headers.items()}
        return Raw(resp.status, headers, await resp.read())


async def still_serves(gate: Gate) -> None:
    """A normal request through the same gateway and upstream goes through."""
    resp = await fetch(
        "POST", f"{gate.url}/openai/upload", headers={"X-Wallet-Token": gate.token}, data=b"x" * 100
    )
    assert resp.status == 200, resp
    assert json.loads(resp.body) == {"bytes": 100}


async def open_gate(gate: Gate) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gate.port)


# --- 1. request body size ----------------------------------------------------------------


def frame(body: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body) if chunked else body


def framing(chunked: bool, length: int) -> str:
    return "Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_of_exactly_the_limit_goes_through(make_gate: MakeGate, chunked: bool) -> None:
    gate = await make_gate()
    reader, writer = await open_gate(gate)
    try:
        writer.write(head(gate, "POST", "/openai/upload", framing(chunked, LIMIT)))
        for _ in range(LIMIT // 1024):
            writer.write(frame(b"z" * 1024, chunked))
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(3):
            resp = await read_response(reader)
    finally:
        writer.close()
    assert resp.status == 200, resp
    assert json.loads(resp.body) == {"bytes": LIMIT}


async def test_declared_length_over_the_limit_is_413_before_any_body(make_gate: MakeGate) -> None:
    gate = await make_gate()
    reader, writer = await open_gate(gate)
    try:
        # Headers only: the answer must not wait for a body the gateway will never forward.
        writer.write(head(gate, "POST", "/openai/upload", f"Content-Length: {10**9}"))
        await writer.drain()
        async with asyncio.timeout(3):
            resp = await read_response(reader)
    finally:
        writer.close()
    assert_json_error(resp, 413, "payload_too_large")
    await still_serves(gate)
    # Only `still_serves` reached the upstream.
    assert gate.upstream.started.qsize() == 1


async def test_chunked_body_growing_past_the_limit_is_413(make_gate: MakeGate) -> None:
    gate = await make_gate()
    reader, writer = await open_gate(gate)
    sent = 0
    try:
        writer.write(head(gate, "POST", "/openai/upload", "Transfer-Encoding: chunked"))
        async with asyncio.timeout(3), asyncio.TaskGroup() as tg:
            answer = tg.create_task(read_response(reader))
            # Up to four times the limit, a chunk at a time, until the gateway answers.
            while not answer.done() and sent < 4 * LIMIT:
                writer.write(frame(b"x" * 512, chunked=True))
                await writer.drain()
                sent += 512
                await asyncio.sleep(0.01)
        resp = answer.result()
    finally:
        writer.close()
    assert_json_error(resp, 413, "payload_too_large")
    assert LIMIT < sent < 4 * LIMIT  # answered as soon as the limit was crossed
    cut = await gate.upstream.outcome()
    # The upstream saw at most the limit and then lost the request: never a complete body,
    # and the half-sent connection was not reused (`still_serves` goes to the same upstream).
    assert (cut.route, cut.how) == ("upload", "cut")
    assert cut.received <= LIMIT
    await still_serves(gate)


# --- 2. a client that stalls (or leaves) mid-body ------------------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_stalled_client_body_is_408_and_the_upstream_request_closed(
    make_gate: MakeGate, chunked: bool
) -> None:
    gate = await make_gate(client_idle_timeout_s=1)
    reader, writer = await open_gate(gate)
    try:
        writer.write(head(gate, "POST", "/openai/upload", framing(chunked, 1000)))
        writer.write(frame(b"y" * 100, chunked))
        await writer.drain()
        started = time.monotonic()
        async with asyncio.timeout(3):
            assert await gate.upstream.started.get() == "upload"
        # Others are served while this client stalls.
        await still_serves(gate)
        assert (await gate.upstream.outcome()).how == "complete"
        async with asyncio.timeout(4):
            resp = await read_response(reader)
        waited = time.monotonic() - started
    finally:
        writer.close()
    assert_json_error(resp, 408, "request_timeout")
    assert 0.8 <= waited < 3
    cut = await gate.upstream.outcome()
    assert (cut.route, cut.how, cut.received) == ("upload", "cut", 100)
    await still_serves(gate)


async def test_client_leaving_mid_body_closes_the_upstream_request(make_gate: MakeGate) -> None:
    gate = await make_gate(client_idle_timeout_s=5)
    _, writer = await open_gate(gate)
    try:
        writer.write(head(gate, "POST", "/openai/upload", "Content-Length: 1000"))
        writer.write(b"y" * 100)
        await writer.drain()
        async with asyncio.timeout(3):
            assert await gate.upstream.started.get() == "upload"
    finally:
        writer.close()
    cut = await gate.upstream.outcome(within=1)
    assert (cut.route, cut.how, cut.received) == ("upload", "cut", 100)
    await still_serves(gate)


# --- 3. a slow upstream ------------------------------------------------------------------


async def test_no_upstream_headers_within_the_read_timeout_is_504(make_gate: MakeGate) -> None:
    gate = await make_gate(upstream_read_timeout_s=1)
    started = time.monotonic()
    resp = await fetch(
        "GET", f"{gate.url}/openai/slow-headers", headers={"X-Wallet-Token": gate.token}
    )
    waited = time.monotonic() - started
    error = assert_json_error(resp, 504, "upstream_timeout")
    assert OPENAI_KEY not in error["message"]
    assert 0.8 <= waited < 3
    assert (await gate.upstream.outcome()).how == "cut"


async def collect(resp: aiohttp.ClientResponse, into: bytearray) -> None:
    async for chunk in resp.content.iter_any():
        into += chunk


async def test_upstream_stalling_mid_stream_truncates_the_client_stream(
    make_gate: MakeGate,
) -> None:
    gate = await make_gate(upstream_read_timeout_s=1)
    received = bytearray()
    async with (
        asyncio.timeout(4),
        aiohttp.ClientSession() as client,
        client.get(f"{gate.url}/openai/stall", headers={"X-Wallet-Token": gate.token}) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        started = time.monotonic()
        # A truncated chunked body, not a clean end: the client can tell the stream broke.
        with pytest.raises(aiohttp.ClientPayloadError):
            await collect(resp, received)
        waited = time.monotonic() - started
    assert received == SSE_EVENT * 2
    assert 0.8 <= waited < 3
    assert (await gate.upstream.outcome()).how == "cut"


# --- 4. a client that leaves mid-stream --------------------------------------------------


async def read_events(reader: asyncio.StreamReader, count: int) -> None:
    status, headers = await read_head(reader)
    assert status == 200
    assert headers["content-type"] == "text/event-stream"
    seen = b""
    while seen.count(b"data:") < count:
        chunk = await reader.read(4096)
        assert chunk, "stream ended early"
        seen += chunk


@pytest.mark.parametrize(
    "every",
    [
        0.05,  # a busy stream: the next relayed write fails
        3.0,  # a quiet stream (a model thinking): only the cancelled handler notices
    ],
)
async def test_client_leaving_mid_stream_closes_the_upstream_request(
    make_gate: MakeGate, every: float
) -> None:
    gate = await make_gate(upstream_read_timeout_s=5)
    reader, writer = await open_gate(gate)
    try:
        writer.write(head(gate, "GET", f"/openai/forever?every={every}"))
        await writer.drain()
        async with asyncio.timeout(3):
            await read_events(reader, 1)
    finally:
        writer.close()
    cut = await gate.upstream.outcome(within=1)
    assert (cut.route, cut.how) == ("forever", "cut")
    await still_serves(gate)


async def test_client_leaving_before_upstream_headers_closes_the_upstream_request(
    make_gate: MakeGate,
) -> None:
    gate = await make_gate(upstream_read_timeout_s=5)
    _, writer = await open_gate(gate)
    try:
        writer.write(head(gate, "GET", "/openai/slow-headers"))
        await writer.drain()
        async with asyncio.timeout(3):
            assert await gate.upstream.started.get() == "slow-headers"
    finally:
        writer.close()
    cut = await gate.upstream.outcome(within=1)
    assert (cut.route, cut.how) == ("slow-headers", "cut")


# --- 5. an upstream refusing connections ---------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_refused_connection_is_502_without_the_key(make_gate: MakeGate) -> None:
    gate = await make_gate(base_url=f"http://127.0.0.1:{closed_port()}")
    resp = await fetch(
        "POST",
        f"{gate.url}/openai/v1/chat/completions?x=1",
        headers={"Authorization": f"Bearer {gate.token}"},
        json={"model": "gpt-4o-mini"},
    )
    error = assert_json_error(resp, 502, "upstream_unavailable")
    assert "openai" in error["message"]
    text = resp.body.decode() + json.dumps(resp.headers)
    assert OPENAI_KEY not in text
    assert gate.token not in text
