"""The hot path's lean upstream client (gateway/hothttp.py), against real servers on loopback:
aiohttp for well-formed answers, a raw asyncio server for malformed and edge-case ones."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import traceback
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Final

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from yarl import URL

from admin.embedded import free_port
from gateway.hothttp import (
    PIECE,
    HotHTTP,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamRequestError,
    UpstreamTimeoutError,
    UpstreamTooLargeError,
)

GATE_S: Final = 5.0  # how long a gated server waits for the test (bounded, never reached)
SECRET: Final = "sk-live-SECRET0123456789"


async def _gate(event: asyncio.Event) -> None:
    with suppress(TimeoutError):
        async with asyncio.timeout(GATE_S):
            await event.wait()


async def _until(check: Callable[[], bool]) -> bool:
    """Let the loop run until `check()` holds (bounded: at most GATE_S)."""
    for _ in range(int(GATE_S / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


class Upstream:
    """An aiohttp upstream that records what it got and counts its connections."""

    def __init__(self) -> None:
        self.transports: set[object] = set()
        self.requests: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.received = asyncio.Event()
        self.hung_up = asyncio.Event()
        self.target_hits = 0

    def app(self) -> web.Application:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.transports.add(request.transport)
            response: web.StreamResponse = await handler(request)
            return response

        app = web.Application(middlewares=[count])
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/encoded/{coding}", self.encoded)
        app.router.add_get("/bomb", self.bomb)
        app.router.add_get("/sse", self.sse)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/trickle", self.trickle)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/target", self.target)
        app.router.add_get("/cookies", self.cookies)
        app.router.add_get("/status/{status}", self.status)
        app.router.add_get("/hundred", self.hundred)
        app.router.add_get("/chunked", self.chunked)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        seen = {
            "method": request.method,
            "path_qs": request.path_qs,
            "headers": list(request.headers.items()),
            "sha256": hashlib.sha256(body).hexdigest(),
            "length": len(body),
        }
        self.requests.append(seen)
        return web.json_response(seen)

    async def encoded(self, request: web.Request) -> web.Response:
        text = b"hello, encoded world! " * 200
        coding = request.match_info["coding"]
        if coding == "gzip":
            body = gzip.compress(text)
        elif coding == "deflate":
            body = zlib.compress(text)
        elif coding == "rawdeflate":
            squeeze = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            body, coding = squeeze.compress(text) + squeeze.flush(), "deflate"
        elif coding == "truncated":
            body, coding = gzip.compress(text)[:-12], "gzip"
        else:
            body = text  # claims `coding` without being encoded
        return web.Response(body=body, headers={"Content-Encoding": coding})

    async def bomb(self, request: web.Request) -> web.StreamResponse:
        """10 MiB of zeros, gzipped (about 10 KiB), streamed chunked."""
        response = web.StreamResponse(headers={"Content-Encoding": "gzip"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        squeeze = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        zeros = bytes(1024 * 1024)
        for _ in range(10):
            await response.write(squeeze.compress(zeros))
        await response.write(squeeze.flush())
        await response.write_eof()
        return response

    async def sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await self._held(request)
        if not self.hung_up.is_set():
            await response.write(b"data: two\n\n")
            await response.write_eof()
        return response

    async def _held(self, request: web.Request) -> None:
        """Until the test opens the gate, or the client goes away (noted)."""
        self.received.set()
        try:
            for _ in range(int(GATE_S / 0.01)):
                if self.gate.is_set():
                    return
                if request.transport is None or request.transport.is_closing():
                    self.hung_up.set()
                    return
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:  # the server cancels a handler whose client left
            self.hung_up.set()
            raise

    async def slow(self, request: web.Request) -> web.Response:
        await self._held(request)
        return web.Response(text="late")

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        """A byte every 20 ms: never silent for long, but never done (bounded)."""
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(int(GATE_S / 0.02)):
            if request.transport is None or request.transport.is_closing():
                break
            await response.write(b".")
            await asyncio.sleep(0.02)
        return response

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/target")

    async def target(self, request: web.Request) -> web.Response:
        self.target_hits += 1
        return web.Response(text="followed")

    async def cookies(self, request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        for name in ("a", "b", "c"):
            response.headers.add("Set-Cookie", f"{name}=1; Path=/")
        return response

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["status"]))

    async def hundred(self, request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100)

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for piece in (b"alpha-", b"beta-", b"gamma"):
            await response.write(piece)
        await response.write_eof()
        return response


Script = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """A raw TCP server playing `script` on each connection (the index says which)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.event = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = URL(f"http://127.0.0.1:{port}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.event.set()
        self.server.close()
        for writer in self._writers:
            writer.close()
        for task in self._handlers:
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers)
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.append(writer)
        index = self.connections
        self.connections += 1
        try:
            await self.script(self, reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head, and a body by Content-Length)."""
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        whole = head + (await reader.readexactly(length) if length else b"")
        self.requests.append(whole)
        return whole


async def _stream_into(hot: HotHTTP, url: URL, into: list[bytes]) -> None:
    async with hot.request("GET", url) as response:
        async for chunk in response.iter_any():
            into.append(chunk)


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


async def answer_each(server: RawServer, answer: bytes, reader: Any, writer: Any) -> None:
    while True:
        await server.request(reader)
        writer.write(answer)


@pytest.fixture
async def client() -> AsyncIterator[HotHTTP]:
    hot = HotHTTP(2.0, 5.0, 30.0)
    yield hot
    await hot.close()


@pytest.fixture
async def upstream(aiohttp_server: Any) -> AsyncIterator[tuple[Upstream, URL]]:
    up = Upstream()
    server = await aiohttp_server(up.app())
    yield up, URL(str(server.make_url("/")))
    up.gate.set()


# -- requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_methods_headers_and_bytes_bodies_arrive_intact(
    client: HotHTTP, upstream: tuple[Upstream, URL], method: str
) -> None:
    _up, base = upstream
    body = os.urandom(100_000) if method in ("POST", "PUT", "PATCH") else None
    headers = {
        "X-Custom": "value",
        "Connection": "upgrade",
        "Keep-Alive": "timeout=1",
        "Upgrade": "h2c",
        "TE": "trailers",
        "Proxy-Authorization": "Basic eA==",
        "Transfer-Encoding": "gzip",
        "Content-Length": "5",
        "Host": "evil.example",
    }
    url = base.with_path("/echo").with_query({"q": "a b", "n": "1"})
    async with client.request(method, url, headers, body) as response:
        assert response.status == 200
        seen = json.loads(await response.read())
    got = {k.lower(): v for k, v in seen["headers"]}
    assert seen["method"] == method
    assert seen["path_qs"] == "/echo?q=a+b&n=1"
    assert got["x-custom"] == "value"
    assert got["host"] == f"127.0.0.1:{base.port}"
    assert got["accept-encoding"] == "gzip, deflate"
    for hop in ("upgrade", "te", "proxy-authorization", "keep-alive", "transfer-encoding"):
        assert hop not in got
    assert got.get("connection") is None
    expected = body or b""
    assert seen["sha256"] == hashlib.sha256(expected).hexdigest()
    if body is not None:
        assert got["content-length"] == str(len(body))
    else:
        assert "content-length" not in got


async def test_a_post_without_body_says_content_length_0(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    _up, base = upstream
    async with client.request("POST", base / "echo") as response:
        seen = json.loads(await response.read())
    assert dict((k.lower(), v) for k, v in seen["headers"])["content-length"] == "0"


async def test_a_callers_accept_encoding_is_kept(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    _up, base = upstream
    async with client.request("GET", base / "echo", {"Accept-Encoding": "identity"}) as response:
        seen = json.loads(await response.read())
    codings = [v for k, v in seen["headers"] if k.lower() == "accept-encoding"]
    assert codings == ["identity"]


async def test_a_streamed_body_goes_chunked_and_intact(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    _up, base = upstream
    data = os.urandom(300_000)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 7_000):
            yield data[start : start + 7_000]
            yield b""  # an empty piece must not end the chunked body

    async with client.request("PUT", base / "echo", {}, pieces()) as response:
        seen = json.loads(await response.read())
    got = {k.lower(): v for k, v in seen["headers"]}
    assert got["transfer-encoding"] == "chunked"
    assert "content-length" not in got
    assert (seen["length"], seen["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


async def test_a_failing_streamed_body_fails_the_request_with_its_own_error(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    _, base = upstream

    class ClientWentAway(Exception):
        pass

    async def body() -> AsyncIterator[bytes]:
        yield b"a first piece"
        raise ClientWentAway

    with pytest.raises(ClientWentAway):
        async with client.request("POST", base / "echo", {}, body()):
            pass
    assert client.connections(base) == (0, 0)  # a half-sent body: never reused


async def test_a_header_with_a_line_break_is_refused_before_sending(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    up, base = upstream
    for headers in (
        {"X-A": "v\r\nX-Injected: 1"},
        {"X-A\nB": "v"},
        {"Transfer-Encoding ": "chunked"},  # whitespace before the colon: smuggling
        {"Content-Length\t": "5"},
        {"X a": "v"},
        {"X-A": "v\x00"},
        {"X-A": "v\x7f"},
        {"X\x00": "v"},
    ):
        with pytest.raises(UpstreamRequestError):
            async with client.request("GET", base / "echo", headers):
                pass
    with pytest.raises(UpstreamRequestError):
        async with client.request("GET /x HTTP/1.1\r\n", base / "echo"):
            pass
    assert up.requests == []


# -- responses ---------------------------------------------------------------------------


async def test_content_length_chunked_and_close_delimited_bodies(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    _up, base = upstream
    async with client.request("GET", base / "hundred") as response:
        assert response.content_length == 100
        assert await response.read() == b"x" * 100
    async with client.request("GET", base / "chunked") as response:
        assert response.content_length is None
        assert await response.read() == b"alpha-beta-gamma"

    async def close_delimited(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
        await writer.drain()
        writer.write(b"second part")
        writer.close()

    async with RawServer(close_delimited) as raw:
        for _ in range(2):
            async with client.request("GET", raw.url / "x") as response:
                assert response.content_length is None
                assert await response.read() == b"first part, second part"
        assert raw.connections == 2  # a close-delimited answer leaves no reusable connection


@pytest.mark.parametrize("coding", ["gzip", "deflate", "rawdeflate"])
async def test_gzip_and_deflate_are_decoded(
    client: HotHTTP, upstream: tuple[Upstream, URL], coding: str
) -> None:
    _up, base = upstream
    async with client.request("GET", base / "encoded" / coding) as response:
        assert response.content_length is None
        assert "Content-Encoding" not in response.headers
        assert "Content-Length" not in response.headers
        assert await response.read() == b"hello, encoded world! " * 200


async def test_an_unsupported_or_broken_encoding_is_an_error_not_a_relay(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    _up, base = upstream
    with pytest.raises(UpstreamBrokenError):
        async with client.request("GET", base / "encoded" / "br"):
            pass
    with pytest.raises(UpstreamBrokenError):  # claims gzip, isn't
        async with client.request("GET", base / "encoded" / "gzip, gzip") as response:
            await response.read()
    with pytest.raises(UpstreamBrokenError):
        async with client.request("GET", base / "encoded" / "truncated") as response:
            await response.read()


async def test_a_compression_bomb_is_decoded_in_bounded_pieces(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    _up, base = upstream
    sizes = []
    async with client.request("GET", base / "bomb") as response:
        async for piece in response.iter_any():
            assert piece == bytes(len(piece))
            sizes.append(len(piece))
    assert sum(sizes) == 10 * 1024 * 1024
    assert max(sizes) <= PIECE
    with pytest.raises(UpstreamTooLargeError):
        async with client.request("GET", base / "bomb") as response:
            await response.read(limit=1024 * 1024)


async def test_head_204_and_304_have_no_body_and_keep_the_connection(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    up, base = upstream
    async with client.request("HEAD", base / "hundred") as response:
        assert (response.status, response.content_length) == (200, 100)
        assert await response.read() == b""
    for status in (204, 304):
        async with client.request("GET", base / "status" / str(status)) as response:
            assert response.status == status
            assert await response.read() == b""
    async with client.request("GET", base / "hundred") as response:
        assert await response.read() == b"x" * 100
    assert len(up.transports) == 1


async def test_informational_answers_are_skipped(client: HotHTTP) -> None:
    async def script(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # apart, so that the client sees the 100 on its own
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            + ok(b"final", b"X-Final: yes\r\n")
        )
        await server.request(reader)
        writer.write(ok(b"again"))

    async with RawServer(script) as raw:
        async with client.request("POST", raw.url / "x", {"Expect": "100-continue"}, b"b") as r:
            assert (r.status, await r.read()) == (200, b"final")
            assert "Link" not in r.headers
            assert r.headers["X-Final"] == "yes"
        async with client.request("GET", raw.url / "x") as r:
            assert await r.read() == b"again"
        assert raw.connections == 1


async def test_raw_header_order_and_duplicates_are_kept(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    _up, base = upstream
    async with client.request("GET", base / "cookies") as response:
        assert response.headers.getall("Set-Cookie") == [
            "a=1; Path=/",
            "b=1; Path=/",
            "c=1; Path=/",
        ]

    answer = b"HTTP/1.1 201 Created Here\r\nZ: 1\r\nA: 2\r\nz: 3\r\nContent-Length: 0\r\n\r\n"

    async def script(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        await answer_each(server, answer, reader, writer)

    async with RawServer(script) as raw, client.request("GET", raw.url) as response:
        assert (response.status, response.reason) == (201, "Created Here")
        assert list(response.headers.items()) == [
            ("Z", "1"),
            ("A", "2"),
            ("z", "3"),
            ("Content-Length", "0"),
        ]


async def test_a_redirect_is_returned_not_followed(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    up, base = upstream
    async with client.request("GET", base / "redirect") as response:
        assert response.status == 302
        assert response.headers["Location"] == "/target"
    assert up.target_hits == 0


async def test_read_is_bounded(client: HotHTTP, upstream: tuple[Upstream, URL]) -> None:
    _up, base = upstream
    with pytest.raises(UpstreamTooLargeError):
        async with client.request("GET", base / "hundred") as response:
            await response.read(limit=99)
    with pytest.raises(UpstreamTooLargeError):  # no Content-Length to tell in advance
        async with client.request("GET", base / "chunked") as response:
            await response.read(limit=5)


# -- streaming ---------------------------------------------------------------------------


async def test_server_sent_events_arrive_one_by_one(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    up, base = upstream
    async with client.request("GET", base / "sse") as response:
        events = response.iter_any()
        assert await anext(events) == b"data: one\n\n"  # while the server holds event two
        up.gate.set()
        rest = b"".join([chunk async for chunk in events])
    assert rest == b"data: two\n\n"


async def test_an_answer_before_the_body_is_sent_stops_the_body(client: HotHTTP) -> None:
    """The upstream answers without reading the body: the answer is delivered, the body
    stops (backpressure: a body that never waits would be pulled whole before anything
    else ran) and the connection is not reused (the body was cut short)."""
    megabyte = bytes(1024 * 1024)
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(128):
            pulled += 1
            yield megabyte

    async def script(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        if index == 0:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(ok(b"too big"))
            await server.event.wait()  # read nothing until the test is done
            while await reader.read(1 << 20):
                pass
        else:
            await answer_each(server, ok(b"next"), reader, writer)

    async with RawServer(script) as raw:
        async with client.request("POST", raw.url / "upload", {}, body()) as response:
            assert await response.read() == b"too big"
        assert pulled < 128
        raw.event.set()
        async with client.request("GET", raw.url / "x") as response:
            assert await response.read() == b"next"
        assert raw.connections == 2


# -- the pool ----------------------------------------------------------------------------


async def test_keep_alive_reuses_connections(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    up, base = upstream
    for _ in range(20):
        async with client.request("GET", base / "hundred") as response:
            await response.read()
    assert len(up.transports) == 1

    async def one() -> bytes:
        async with client.request("GET", base / "echo") as response:
            return await response.read()

    await asyncio.gather(*(one() for _ in range(10)))
    opened = len(up.transports)
    assert opened <= 10
    await asyncio.gather(*(one() for _ in range(10)))
    assert len(up.transports) == opened  # the second wave reused the first's connections
    assert client.connections(base) == (opened, opened)


async def test_the_per_host_limit_holds(upstream: tuple[Upstream, URL]) -> None:
    up, base = upstream
    hot = HotHTTP(2.0, 5.0, 30.0, limit_per_host=2)
    try:

        async def one() -> bytes:
            async with hot.request("GET", base / "echo") as response:
                return await response.read()

        assert len(await asyncio.gather(*(one() for _ in range(12)))) == 12
    finally:
        await hot.close()
    assert len(up.transports) <= 2


async def test_idle_connections_are_closed_after_the_idle_timeout(
    upstream: tuple[Upstream, URL],
) -> None:
    up, base = upstream
    hot = HotHTTP(2.0, 5.0, 30.0, idle_timeout_s=0.05)
    try:
        async with hot.request("GET", base / "hundred") as response:
            await response.read()
        assert hot.connections(base) == (1, 1)
        transport = next(iter(up.transports))
        assert await _until(lambda: hot.connections(base) == (0, 0))
        assert await _until(lambda: transport.is_closing())  # type: ignore[attr-defined]
    finally:
        await hot.close()


async def test_a_reused_connection_closed_under_a_request_is_retried_only_if_safe(
    client: HotHTTP,
) -> None:
    """The first connection answers one request, then closes on the next without a word (as
    a server does whose idle timeout fired as the request went out)."""

    async def script(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        if index == 0:
            await server.request(reader)
            writer.write(ok(b"first"))
            await server.request(reader)
            return  # closes without answering
        await answer_each(server, ok(b"fresh"), reader, writer)

    async with RawServer(script) as raw:
        for method in ("GET", "PUT", "DELETE"):  # idempotent: retried once
            raw.connections = 0
            fresh = HotHTTP(2.0, 5.0, 30.0)
            try:
                for expected in (b"first", b"fresh"):
                    async with fresh.request(method, raw.url / "x", {}, b"data") as response:
                        assert await response.read() == expected
            finally:
                await fresh.close()
            assert raw.connections == 2

        raw.connections, raw.requests = 0, []
        async with client.request("POST", raw.url / "x", {}, b"data") as response:
            assert await response.read() == b"first"
        with pytest.raises(UpstreamBrokenError):  # may have been processed: never resent
            async with client.request("POST", raw.url / "x", {}, b"data"):
                pass
        assert (raw.connections, len(raw.requests)) == (1, 2)

        async def once() -> AsyncIterator[bytes]:
            yield b"not replayable"

        raw.connections, raw.requests = 0, []
        async with client.request("PUT", raw.url / "x") as response:
            assert await response.read() == b"first"
        with pytest.raises(UpstreamBrokenError):
            async with client.request("PUT", raw.url / "x", {}, once()):
                pass
        assert raw.connections == 1


async def test_a_connection_the_server_closed_while_idle_is_not_used(client: HotHTTP) -> None:
    async def script(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        await server.request(reader)
        writer.write(ok(b"bye") if index == 0 else ok(b"new"))
        if index == 0:
            return  # closes right after answering, while keeping the connection alive
        await answer_each(server, ok(b"new"), reader, writer)

    async with RawServer(script) as raw:
        async with client.request("POST", raw.url / "x", {}, b"1") as response:
            assert await response.read() == b"bye"
        assert await _until(lambda: client.connections(raw.url) == (0, 0))
        async with client.request("POST", raw.url / "x", {}, b"2") as response:
            assert await response.read() == b"new"


async def test_bytes_nobody_asked_for_close_the_connection(client: HotHTTP) -> None:
    async def script(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        await server.request(reader)
        if index == 0:  # an answer and a second (bodiless) one in the same write
            writer.write(ok(b"one") + b"HTTP/1.1 204 No Content\r\n\r\n")
        elif index == 1:  # an answer, then bytes while the connection is idle
            writer.write(ok(b"two"))
            await server.event.wait()
            writer.write(ok(b"unrequested"))
        else:
            writer.write(ok(b"more"))
        await answer_each(server, ok(b"more"), reader, writer)

    async with RawServer(script) as raw:
        async with client.request("GET", raw.url / "x") as response:
            assert await response.read() == b"one"
        async with client.request("GET", raw.url / "x") as response:
            assert await response.read() == b"two"
        assert raw.connections == 2
        assert client.connections(raw.url) == (1, 1)
        raw.event.set()
        assert await _until(lambda: client.connections(raw.url) == (0, 0))
        async with client.request("GET", raw.url / "x") as response:
            assert await response.read() == b"more"
        assert raw.connections == 3


# -- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 10,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 9999\r\n\r\n"
        + gzip.compress(b"x" * 1000),
    ],
    ids=["content-length", "chunked", "gzip"],
)
async def test_an_upstream_dying_mid_body_is_an_error(client: HotHTTP, answer: bytes) -> None:
    async def script(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        await server.request(reader)
        writer.write(answer)
        await writer.drain()

    async with RawServer(script) as raw:
        with pytest.raises(UpstreamBrokenError):
            async with client.request("GET", raw.url / "x") as response:
                await response.read()
        chunks: list[bytes] = []
        with pytest.raises(UpstreamBrokenError):
            await _stream_into(client, raw.url / "x", chunks)
        assert chunks  # what did arrive was relayed first


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n", b"HTTP/1.1 101 Switching\r\n\r\n"],
)
async def test_an_invalid_answer_is_an_error(client: HotHTTP, answer: bytes) -> None:
    async def script(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        await server.request(reader)
        writer.write(answer)
        await server.event.wait()

    async with RawServer(script) as raw:
        with pytest.raises(UpstreamBrokenError):
            async with client.request("GET", raw.url / "x") as response:
                await response.read()


@contextmanager
def blackhole() -> Iterator[int]:
    """A port whose connection attempts hang: a listener that never accepts, its backlog
    full, so the kernel drops further SYNs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel completes connections beyond the backlog")
        finally:
            probe.close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_timeouts_connect_read_and_total(upstream: tuple[Upstream, URL]) -> None:
    _up, base = upstream
    with blackhole() as port:
        hot = HotHTTP(0.2, 5.0, 30.0)
        try:
            with pytest.raises(UpstreamTimeoutError) as caught:
                async with hot.request("GET", URL(f"http://127.0.0.1:{port}/")):
                    pass
            assert caught.value.phase == "connect"
        finally:
            await hot.close()

    hot = HotHTTP(2.0, 0.2, 30.0)
    try:
        with pytest.raises(UpstreamTimeoutError) as caught:  # silence before the head
            async with hot.request("GET", base / "slow"):
                pass
        assert caught.value.phase == "read"
        got: list[bytes] = []
        with pytest.raises(UpstreamTimeoutError) as caught:  # silence mid-stream
            await _stream_into(hot, base / "sse", got)
        assert (got, caught.value.phase) == ([b"data: one\n\n"], "read")
    finally:
        await hot.close()

    hot = HotHTTP(2.0, 1.0, 0.3)
    try:
        with pytest.raises(UpstreamTimeoutError) as caught:  # a trickle: never silent
            async with hot.request("GET", base / "trickle") as response:
                await response.read()
        assert caught.value.phase == "total"
    finally:
        await hot.close()


async def test_cancellation_closes_the_connection(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    up, base = upstream
    first = asyncio.Event()

    async def stream() -> None:
        async with client.request("GET", base / "sse") as response:
            async for _ in response.iter_any():
                first.set()

    task = asyncio.get_running_loop().create_task(stream())
    await _gate(first)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.connections(base) == (0, 0)
    assert await _until(up.hung_up.is_set)

    up.hung_up.clear()
    up.received.clear()

    async def wait_head() -> None:
        async with client.request("GET", base / "slow"):
            pass

    task = asyncio.get_running_loop().create_task(wait_head())
    await _gate(up.received)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.connections(base) == (0, 0)
    assert await _until(up.hung_up.is_set)

    answered = asyncio.Event()

    async def hold_a_complete_answer() -> None:
        async with client.request("GET", base / "hundred"):
            answered.set()
            await asyncio.Event().wait()  # cancelled here, the body complete but unread

    task = asyncio.get_running_loop().create_task(hold_a_complete_answer())
    await _gate(answered)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.connections(base) == (0, 0)


async def test_giving_up_mid_body_closes_the_connection(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    up, base = upstream
    async with client.request("GET", base / "sse") as response:
        events = response.iter_any()
        assert await anext(events) == b"data: one\n\n"
        response.close()
        with pytest.raises(UpstreamBrokenError):
            await response.read()
    assert client.connections(base) == (0, 0)
    assert await _until(up.hung_up.is_set)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hothttp test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_with_a_custom_context_and_verification_by_default(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    up = Upstream()
    server = await aiohttp_server(up.app(), ssl=server_context)
    url = URL(str(server.make_url("/echo"))).with_query({"key": SECRET})
    assert url.scheme == "https"

    trusting = HotHTTP(2.0, 5.0, 30.0, ssl_context=ssl.create_default_context(cafile=cert))
    try:
        for _ in range(2):
            async with trusting.request("POST", url, {}, b"over tls") as response:
                seen = json.loads(await response.read())
        assert seen["sha256"] == hashlib.sha256(b"over tls").hexdigest()
        assert len(up.transports) == 1
    finally:
        await trusting.close()

    default = HotHTTP(2.0, 5.0, 30.0)
    try:
        with pytest.raises(UpstreamConnectError) as caught:
            async with default.request("GET", url):
                pass
        assert "SSLCertVerificationError" in str(caught.value)
        assert SECRET not in "".join(traceback.format_exception(caught.value))
    finally:
        await default.close()


async def test_error_messages_never_carry_the_url(
    client: HotHTTP, upstream: tuple[Upstream, URL]
) -> None:
    _up, base = upstream
    query = {"key": SECRET}

    async def garbage(server: RawServer, reader: Any, writer: Any, index: int) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    failures: list[UpstreamError] = []
    closed = URL(f"http://127.0.0.1:{free_port()}")
    async with RawServer(garbage) as raw:
        for url in (closed, raw.url):
            with pytest.raises(UpstreamError) as caught:
                async with client.request("GET", (url / SECRET).with_query(query)) as response:
                    await response.read()
            failures.append(caught.value)
    hot = HotHTTP(2.0, 0.1, 30.0)
    try:
        with pytest.raises(UpstreamTimeoutError) as timed_out:
            async with hot.request("GET", (base / "slow").with_query(query)):
                pass
        failures.append(timed_out.value)
    finally:
        await hot.close()
    assert [type(f) for f in failures] == [
        UpstreamConnectError,
        UpstreamBrokenError,
        UpstreamTimeoutError,
    ]
    for failure in failures:
        text = "".join(traceback.format_exception(failure)) + repr(failure)
        assert SECRET not in text
        assert "127.0.0.1" in str(failure)  # the host, for diagnosis


def test_works_under_uvloop() -> None:
    """Production runs on uvloop, whose transports differ from asyncio's."""
    uvloop = pytest.importorskip("uvloop")

    async def check() -> list[bytes | int]:
        up = Upstream()
        runner = web.AppRunner(up.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        base = URL(f"http://127.0.0.1:{port}")
        hot = HotHTTP(2.0, 5.0, 30.0)

        async def pieces() -> AsyncIterator[bytes]:
            yield b"a" * 70_000
            yield b"b"

        out: list[bytes | int] = []
        try:
            for _ in range(2):
                async with hot.request("GET", base / "hundred") as response:
                    out.append(await response.read())
            async with hot.request("POST", base / "echo", {}, pieces()) as response:
                out.append(json.loads(await response.read())["length"])
            async with hot.request("GET", base / "encoded" / "gzip") as response:
                out.append(len(await response.read()))
            async with hot.request("HEAD", base / "hundred") as response:
                out.append(await response.read())
            async with hot.request("GET", base / "sse") as response:
                events = response.iter_any()
                out.append(await anext(events))
                up.gate.set()
                out.append(b"".join([chunk async for chunk in events]))
            out.append(len(up.transports))
        finally:
            await hot.close()
            await runner.cleanup()
        return out

    assert uvloop.run(check()) == [
        b"x" * 100,
        b"x" * 100,
        70_001,
        len(b"hello, encoded world! " * 200),
        b"",
        b"data: one\n\n",
        b"data: two\n\n",
        1,
    ]


async def test_requests_queued_behind_a_failed_connect_try_their_own() -> None:
    """limit_per_host=1 and a refused port: every request fails fast with a connect error,
    none waits out its whole timeout in the queue."""
    hot = HotHTTP(2.0, 5.0, 30.0, limit_per_host=1)
    url = URL(f"http://127.0.0.1:{free_port()}/x")  # nobody listens there

    async def one() -> str:
        try:
            async with hot.request("GET", url):
                return "answered"
        except UpstreamError as exc:
            return type(exc).__name__

    try:
        async with asyncio.timeout(10):
            outcomes = await asyncio.gather(*(one() for _ in range(3)))
    finally:
        await hot.close()
    assert outcomes == ["UpstreamConnectError"] * 3
