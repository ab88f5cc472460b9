"""A lean HTTP/1.1 client for the hot path's upstream calls.

aiohttp's ClientSession spends 60-75 µs of CPU per request in its machinery (request and
response objects, header copies, per-request timers, connector bookkeeping, StreamReader).
This client does the same job for the proxy's plain HTTP calls at a fraction of that, as
gateway/hotredis.py does for Redis; WebSockets stay on aiohttp (gateway/wsrelay.py).

- One keep-alive pool per (scheme, host, port): idle connections reused last-in first-out,
  closed after `idle_timeout_s` by one sweeper timer, at most `limit_per_host` open.
- A request leaves in one write (request line, headers and a bytes body); an async-iterator
  body goes chunked, with backpressure, from a task the exchange owns, so an answer that
  arrives before the body is finished is delivered at once.
- Responses are parsed by llhttp (httptools). gzip and deflate bodies are always decoded
  (the gateway scrubs echoes of the key from bodies, so it must see them plain); any other
  coding is an error, never relayed undecoded. `Accept-Encoding: gzip, deflate` is sent
  unless the caller set its own (sent as given: one that invites other codings gets an
  UpstreamBrokenError if the upstream uses them). Redirects are returned, never followed.
- Timeouts: connect (per attempt), read (silence while someone waits for bytes; write
  progress counts as activity) and total (the whole exchange). One timer per connection,
  re-armed lazily when it fires, instead of a timer per read.
- Retry rule: a request whose reused (keep-alive) connection closes before any byte of an
  answer is sent again once, on a fresh connection, only when it is idempotent (RFC 9110:
  GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and its body is replayable (bytes or none). A
  connection already seen closed before the write is skipped, for any method: nothing of
  the request was sent. Anything else surfaces as an error: a POST may have been processed.
- Errors are the small hierarchy below; their messages name the host and exception types
  at most, never the URL or its query (keys can live in query strings).

Larger than the ~300 lines the style asks for: pool, connection protocol and response are
one mechanism sharing private state on the hot path; splitting them would only add calls.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import zlib
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping
from types import TracebackType
from typing import Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

MAX_BODY_BYTES: Final = 32 * 1024 * 1024  # read()'s default bound
IDLE_TIMEOUT_S: Final = 15.0
LIMIT_PER_HOST: Final = 1000
HIGH_WATER: Final = 512 * 1024  # buffered answer bytes before reading pauses
PIECE: Final = 256 * 1024  # most decoded bytes per step (bounds a compression bomb)
INLINE_BODY: Final = 64 * 1024  # bodies up to this size are copied into the head's write
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
LENGTH_ALWAYS: Final = frozenset({"POST", "PUT", "PATCH"})
# Request headers this client writes itself: hop-by-hop (and Proxy-*), framing, Host.
CLIENT_OWNED: Final = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host", "content-length"}
)
DECODED: Final = frozenset({"content-encoding", "content-length"})
WBITS: Final = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}
TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

Body = bytes | bytearray | memoryview | AsyncIterable[bytes] | None


class UpstreamError(Exception):
    """Any failure of an upstream exchange. The message names the host at most."""


class UpstreamConnectError(UpstreamError):
    """No connection: DNS, refused, unreachable, TLS handshake or certificate."""


class UpstreamTimeoutError(UpstreamError):
    """Connect, read (silence) or total timeout; `phase` says which."""

    def __init__(self, host: str, phase: str) -> None:
        super().__init__(f"{host} did not answer in time ({phase} timeout)")
        self.phase = phase


class UpstreamBrokenError(UpstreamError):
    """The upstream broke the protocol: closed mid-answer, sent garbage or a bad encoding."""


class UpstreamTooLargeError(UpstreamError):
    """A body over the limit that read() was given."""


class UpstreamRequestError(UpstreamError):
    """The request cannot be sent as given (a line break in a header, a bad URL)."""


class _ClosedBeforeAnswer(UpstreamBrokenError):
    """Closed before any byte of the answer: retryable on a reused connection."""


class _Garbage(Exception):
    """Raised from a parser callback: bytes that belong to no request."""


_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Header names already seen to be tokens (they repeat request after request); bounded.
_GOOD_NAMES: set[str] = set()
MAX_GOOD_NAMES: Final = 4096


def _request_head(
    method: str, url: URL, headers: Mapping[str, str] | None, length: int | None
) -> bytes:
    """Request line and headers. `length`: None for chunked, -1 for no Content-Length."""
    if not TOKEN.fullmatch(method):
        raise UpstreamRequestError("invalid request method")
    if url.scheme not in ("http", "https") or not url.raw_host or url.raw_user is not None:
        raise UpstreamRequestError("the URL must be absolute http(s), without credentials")
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1\r\nHost: {url.host_port_subcomponent}\r\n"]
    asks_encoding = False
    if headers:
        for name, value in headers.items():
            # A name is a token and a value holds no control character but tab: nothing an
            # upstream or a middlebox could read differently (request smuggling on a pool
            # shared by every user).
            if name not in _GOOD_NAMES:
                if not TOKEN.fullmatch(name):
                    raise UpstreamRequestError("a header name is not valid HTTP")
                if len(_GOOD_NAMES) < MAX_GOOD_NAMES:
                    _GOOD_NAMES.add(name)
            if _CONTROL.search(value):
                raise UpstreamRequestError("a header value is not valid HTTP")
            lname = name.lower()
            if lname in CLIENT_OWNED or lname.startswith("proxy-"):
                continue
            if lname == "accept-encoding":
                asks_encoding = True
            lines.append(f"{name}: {value}\r\n")
    if not asks_encoding:
        lines.append("Accept-Encoding: gzip, deflate\r\n")
    if length is None:
        lines.append("Transfer-Encoding: chunked\r\n")
    elif length >= 0:
        lines.append(f"Content-Length: {length}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # Each piece holds exactly one line break (the first two): any more is header injection.
    breaks = len(lines) + 1
    if text.count("\n") != breaks or text.count("\r") != breaks:
        raise UpstreamRequestError("a header name or value contains a line break")
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise UpstreamRequestError("a header cannot be encoded") from None


class _Decoder:
    """gzip or deflate (zlib-wrapped, or raw as some servers send it), decoded in pieces of
    at most `PIECE` bytes so that a small compressed body cannot expand all at once."""

    __slots__ = ("_fed", "_host", "_raw_fallback", "_z")

    def __init__(self, coding: str, host: str) -> None:
        self._z = zlib.decompressobj(WBITS.get(coding, zlib.MAX_WBITS))
        self._raw_fallback = coding == "deflate"
        self._fed = False
        self._host = host

    @property
    def pending(self) -> bool:
        return bool(self._z.unconsumed_tail)

    def decode(self, data: bytes, most: int = PIECE) -> bytes:
        try:
            if not data:
                data = self._z.unconsumed_tail
            elif self._raw_fallback and not self._fed:
                self._fed = True
                try:
                    return self._z.decompress(data, most)
                except zlib.error:
                    self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            self._fed = True
            return self._z.decompress(data, most)
        except zlib.error:
            raise UpstreamBrokenError(f"{self._host} sent a badly compressed body") from None

    def finish(self) -> bytes:
        rest = self._z.flush()
        if self._fed and not self._z.eof:
            raise UpstreamBrokenError(f"{self._host} sent a truncated compressed body")
        return rest


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the state of its current exchange (parser callbacks
    fill it; the response reads it). Waiters are woken with a result, never an exception:
    whoever wakes checks `error`, so nothing is left unretrieved."""

    __slots__ = (
        "active",
        "body_sent",
        "buffered",
        "chunks",
        "close_delimited",
        "deadline",
        "done",
        "drain_waiter",
        "dropped",
        "encoding",
        "error",
        "head_done",
        "headers",
        "idle_since",
        "is_head",
        "keep_alive",
        "last_activity",
        "length",
        "loop",
        "open",
        "parser",
        "pool",
        "reading_paused",
        "reason",
        "received",
        "stale_parser",
        "status",
        "timer",
        "transport",
        "used",
        "waiter",
        "waiting",
        "write_paused",
    )

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.stale_parser = False
        self.open = True
        self.dropped = False
        self.used = 0
        self.idle_since = 0.0
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.waiting = False
        self.active = False
        self.chunks: list[bytes] = []
        self._reset(False, 0.0)

    def _reset(self, is_head: bool, deadline: float) -> None:
        self.is_head = is_head
        self.deadline = deadline
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[str, str]] = []
        self.length: int | None = None
        self.encoding = ""
        self.close_delimited = True
        self.head_done = False
        self.done = False
        self.keep_alive = False
        self.body_sent = False
        self.error: BaseException | None = None
        self.received = 0
        self.buffered = 0
        self.reading_paused = False
        self.chunks.clear()

    # -- the exchange, driven by _Exchange and HotResponse --------------------------------

    def start(self, is_head: bool, deadline: float, read_timeout: float) -> None:
        if self.stale_parser:  # a HEAD answer left llhttp expecting a body
            self.parser = httptools.HttpResponseParser(self)
            self.stale_parser = False
        self._reset(is_head, deadline)
        self.active = True
        self.used += 1
        now = self.loop.time()
        self.last_activity = now
        due = min(deadline, now + read_timeout)
        timer = self.timer
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if not self.active or self.done or self.error is not None:
            return
        now = self.loop.time()
        if now >= self.deadline:
            self.fail(UpstreamTimeoutError(self.pool.host, "total"))
            return
        silent_until = self.last_activity + self.pool.client.read_timeout_s
        # Silence counts only once the request is sent (until then the upstream waits for
        # us, and a stalled client body is the client's idle timeout's business) and while
        # someone waits for the answer, from then on.
        counting = self.waiting and self.body_sent
        if counting and now >= silent_until:
            self.fail(UpstreamTimeoutError(self.pool.host, "read"))
            return
        quiet = silent_until if counting else now + self.pool.client.read_timeout_s
        self.timer = self.loop.call_at(min(self.deadline, quiet), self._on_timer)

    async def wait(self) -> None:
        """Until the connection has news (head, body, end, error); silence counts from now."""
        future = self.loop.create_future()
        self.waiter = future
        self.waiting = True
        self.last_activity = self.loop.time()
        try:
            await future
        finally:
            self.waiting = False
            self.waiter = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes:
        chunks = self.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.reading_paused and self.transport is not None and self.open:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    def fail(self, error: BaseException) -> None:
        """The exchange failed: remember why, wake whoever waits, and drop the connection."""
        if self.error is None:
            self.error = error
        self._wake()
        self.drop()

    def drop(self) -> None:
        """Close for good (idempotent); the pool counts it out and may open another."""
        if self.dropped:
            return
        self.dropped = True
        self.open = False
        self.active = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._wake_drain()
        if self.transport is not None:
            self.transport.abort()
        self.pool.forget(self)

    def reusable(self) -> bool:
        return (
            self.done
            and self.error is None
            and self.keep_alive
            and self.body_sent
            and self.open
            and self.transport is not None
            and self.transport.get_write_buffer_size() == 0
        )

    def finish(self) -> None:
        """The exchange is over: back to the pool if the connection is clean, else closed."""
        if self.dropped:
            return
        if self.reusable():
            self.active = False
            self.chunks.clear()
            self.pool.release(self)
        else:
            self.drop()

    async def drain(self) -> None:
        while self.write_paused and self.open and self.error is None:
            future = self.loop.create_future()
            self.drain_waiter = future
            try:
                await future
            finally:
                self.drain_waiter = None

    def _wake_drain(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.dropped:  # an idle connection speaking up: out of step
            self.drop()
            return
        self.received += len(data)
        self.last_activity = self.loop.time()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self.done:  # a complete answer followed by bytes nobody asked for
                self.keep_alive = False
                self.drop()
            else:
                self.fail(UpstreamBrokenError(f"{self.pool.host} sent an invalid answer"))

    def eof_received(self) -> bool | None:
        self.open = False
        return None  # the transport closes itself; connection_lost settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._wake_drain()
        if not self.active or self.done or self.error is not None:
            self.drop()
            return
        host = self.pool.host
        if self.head_done and self.close_delimited:  # the end of a close-delimited body
            self.done = True
            self._wake()
            self.drop()
        elif self.received == 0:
            self.fail(_ClosedBeforeAnswer(f"{host} closed the connection before answering"))
        elif not self.head_done:
            self.fail(UpstreamBrokenError(f"{host} closed the connection mid-answer"))
        else:
            self.fail(UpstreamBrokenError(f"{host} closed the connection mid-body"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_activity = self.loop.time()  # the upstream is reading: not silent
        self._wake_drain()

    # -- llhttp callbacks (httptools) -----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            raise _Garbage

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"content-length":
            self.length = int(value)  # llhttp checked the digits
            self.close_delimited = False
        elif lname == b"transfer-encoding":
            # Chunked only when it is the last coding; otherwise the body runs to the close.
            last = value.rsplit(b",", 1)[-1].strip().lower()
            self.close_delimited = self.close_delimited and last != b"chunked"
        elif lname == b"content-encoding":
            coding = value.decode("latin-1").strip().lower()
            self.encoding = f"{self.encoding}, {coding}" if self.encoding else coding
        self.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self.status = self.parser.get_status_code()
        if status == 101:  # never asked for (Upgrade is the client's): out of step
            raise _Garbage
        if status < 200:  # informational (100 Continue …): the real answer follows
            return
        self.head_done = True
        if self.is_head:  # no body, whatever the headers say; llhttp can't be told so
            self.done = True
            self.stale_parser = True
            self.keep_alive = self.parser.should_keep_alive()
        elif status in (204, 304):
            self.close_delimited = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.done:  # bytes after a HEAD answer
            raise _Garbage
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status < 200:  # the end of an informational answer
            self.reason = b""
            self.headers = []
            self.length = None
            self.encoding = ""
            self.close_delimited = True
            return
        if self.done:
            return
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()


class _Pool:
    """Connections to one (scheme, host, port)."""

    __slots__ = ("client", "connecting", "conns", "host", "idle", "loop", "port", "ssl", "waiters")

    def __init__(self, client: HotHTTP, scheme: str, host: str, port: int) -> None:
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.ssl = client.ssl_context() if scheme == "https" else None
        self.idle: deque[_Connection] = deque()
        self.conns: set[_Connection] = set()
        self.connecting = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, deadline: float, fresh: bool) -> _Connection:
        while True:
            while self.idle and not fresh:
                conn = self.idle.pop()
                if conn.open:
                    return conn
                conn.drop()
            if len(self.conns) + self.connecting < self.client.limit_per_host:
                return await self._connect(deadline)
            if self.idle:  # full, but a fresh connection is wanted: make room
                self.idle.popleft().drop()
                continue
            await self._wait_for_slot(deadline)

    async def _wait_for_slot(self, deadline: float) -> None:
        future = self.loop.create_future()
        self.waiters.append(future)
        try:
            async with asyncio.timeout_at(deadline):
                await future
        except BaseException as exc:
            if future.done() and not future.cancelled():
                self._wake_one()  # woken, but leaving: pass the turn on
            elif future in self.waiters:
                self.waiters.remove(future)
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeoutError(self.host, "total") from None
            raise

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, deadline: float) -> _Connection:
        self.connecting += 1  # holds a slot while connecting
        now = self.loop.time()
        connect_by = min(now + self.client.connect_timeout_s, deadline)
        try:
            async with asyncio.timeout_at(connect_by):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
        except TimeoutError:
            phase = "total" if connect_by >= deadline else "connect"
            raise UpstreamTimeoutError(self.host, phase) from None
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            name = type(exc).__name__
            raise UpstreamConnectError(f"cannot connect to {self.host} ({name})") from None
        finally:
            self.connecting -= 1
            # A failed attempt frees its slot: a request queued for one tries its own luck
            # instead of waiting out its whole timeout.
            self._wake_one()
        self.conns.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        if self.client.closed:
            conn.drop()
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        self.client.arm_sweeper(conn.idle_since)
        if self.waiters:
            self._wake_one()

    def forget(self, conn: _Connection) -> None:
        """A connection is gone (dropped, or closed by the server while idle)."""
        if conn in self.conns:
            self.conns.discard(conn)
            if conn in self.idle:
                self.idle.remove(conn)
            if self.waiters:
                self._wake_one()

    def sweep(self, now: float) -> float | None:
        """Close connections idle too long; when the next one will be."""
        timeout = self.client.idle_timeout_s
        while self.idle and self.idle[0].idle_since + timeout <= now:
            self.idle.popleft().drop()
        return self.idle[0].idle_since + timeout if self.idle else None


class HotResponse:
    """The answer: status, reason and headers (raw order, duplicates kept) at once; the body
    through read() or iter_any(). `content_length` is None when unknown or decoded."""

    __slots__ = (
        "_body",
        "_conn",
        "_decoder",
        "_exchange",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, conn: _Connection, exchange: _Exchange) -> None:
        self._conn: _Connection | None = conn
        self._exchange = exchange
        self._body: bytes | None = None
        self._decoder: _Decoder | None = None
        self.status = conn.status
        self.reason = conn.reason.decode("latin-1")
        self.content_length = conn.length
        coding = conn.encoding
        has_body = not conn.is_head and conn.status not in (204, 304)
        if not coding or coding == "identity":
            self.headers = CIMultiDictProxy(CIMultiDict(conn.headers))
        elif coding in ("gzip", "x-gzip", "deflate"):
            if has_body:
                self._decoder = _Decoder(coding, conn.pool.host)
            self.content_length = None
            kept = [(k, v) for k, v in conn.headers if k.lower() not in DECODED]
            self.headers = CIMultiDictProxy(CIMultiDict(kept))
        elif has_body:
            raise UpstreamBrokenError(f"{conn.pool.host} sent a body in an unsupported encoding")
        else:
            self.headers = CIMultiDictProxy(CIMultiDict(conn.headers))

    async def read(self, limit: int = MAX_BODY_BYTES) -> bytes:
        """The whole body (decoded), at most `limit` bytes, else UpstreamTooLargeError."""
        if self._body is not None:
            return self._body
        if self.content_length is not None and self.content_length > limit:
            self.close()
            raise UpstreamTooLargeError(f"the body is over {limit} bytes")
        conn = self._conn
        if conn is not None and conn.done and self._decoder is None:  # the common case
            body = conn.take()
            if len(body) > limit:
                self.close()
                raise UpstreamTooLargeError(f"the body is over {limit} bytes")
            self._release()
        else:
            parts: list[bytes] = []
            size = 0
            while (chunk := await self._next(limit - size + 1)) is not None:
                size += len(chunk)
                if size > limit:
                    self.close()
                    raise UpstreamTooLargeError(f"the body is over {limit} bytes")
                parts.append(chunk)
            body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._body = body
        return body

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body (decoded) as it arrives: whatever is there when asked, no more waiting."""
        while (chunk := await self._next(PIECE)) is not None:
            yield chunk

    async def _next(self, most: int) -> bytes | None:
        conn = self._conn
        if conn is None:
            if self._body is None and self._exchange.broken:
                raise UpstreamBrokenError("the response was closed")
            return None
        decoder = self._decoder
        while True:
            if decoder is not None and decoder.pending:
                return decoder.decode(b"", most)
            if conn.chunks:
                data = conn.take()
                if decoder is None:
                    return data
                data = decoder.decode(data, most)
                if data:
                    return data
                continue
            if conn.error is not None:
                self._exchange.broken = True
                self._release()  # not reusable: closed
                raise conn.error
            if conn.done:
                rest = b""
                if decoder is not None:
                    self._decoder = None
                    rest = decoder.finish()
                self._release()
                return rest or None
            await conn.wait()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._exchange.end(conn)

    def close(self) -> None:
        """Give up on the body: the connection is closed, never reused."""
        conn, self._conn = self._conn, None
        self._exchange.broken = True
        if conn is not None:
            conn.drop()
            self._exchange.end(conn)


class _Exchange:
    """`async with client.request(...) as response`: sends, waits for the head, and at the
    end returns the connection to the pool (clean) or closes it (anything else)."""

    __slots__ = (
        "_body",
        "_client",
        "_headers",
        "_method",
        "_response",
        "_sender",
        "_url",
        "broken",
    )

    def __init__(
        self,
        client: HotHTTP,
        method: str,
        url: URL,
        headers: Mapping[str, str] | None,
        body: Body,
    ) -> None:
        self._client = client
        self._method = method
        self._url = url
        self._headers = headers
        self._body = body
        self._response: HotResponse | None = None
        self._sender: asyncio.Task[None] | None = None
        self.broken = False

    async def __aenter__(self) -> HotResponse:
        client, method, body = self._client, self._method, self._body
        loop = asyncio.get_running_loop()
        deadline = loop.time() + client.total_timeout_s
        chunked = body is not None and not isinstance(body, bytes | bytearray | memoryview)
        if chunked:
            length: int | None = None
        elif body:
            length = len(cast(bytes, body))
        else:
            length = 0 if method in LENGTH_ALWAYS else -1
        head = _request_head(method, self._url, self._headers, length)
        pool = client.pool(self._url)
        fresh = False
        while True:
            conn = await pool.acquire(deadline, fresh)
            conn.start(method == "HEAD", deadline, client.read_timeout_s)
            try:
                self._send(conn, head)
                await self._wait_head(conn)
                self._response = response = HotResponse(conn, self)
                return response
            except BaseException as exc:
                conn.drop()
                if (
                    isinstance(exc, _ClosedBeforeAnswer)
                    and not fresh
                    and conn.used > 1  # a reused connection, closed under us while idle
                    and not chunked
                    and method in IDEMPOTENT
                ):
                    fresh = True  # once more, on a new connection
                    continue
                await self._stop_sender()
                raise

    def _send(self, conn: _Connection, head: bytes) -> None:
        transport = conn.transport
        assert transport is not None
        body = self._body
        if body is None:
            transport.write(head)
            conn.body_sent = True
        elif isinstance(body, bytes | bytearray | memoryview):
            if len(body) <= INLINE_BODY:
                transport.write(head + body)
            else:
                transport.writelines((head, body))
            conn.body_sent = True
        else:
            transport.write(head)
            # Owned by this exchange, cancelled and awaited by it: not a background task.
            self._sender = conn.loop.create_task(_send_chunks(conn, body), name="hothttp-body")

    async def _wait_head(self, conn: _Connection) -> None:
        while not conn.head_done:
            if conn.error is not None:
                raise conn.error
            await conn.wait()

    def end(self, conn: _Connection) -> None:
        sender = self._sender
        if sender is not None and not sender.done():
            sender.cancel()  # the answer is complete (or abandoned) before the body was sent
        conn.finish()

    async def _stop_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            if not sender.done():
                sender.cancel()
            await asyncio.wait((sender,))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        response = self._response
        if response is not None and response._conn is not None:
            conn = response._conn
            response._conn = None
            if exc_type is not None:  # the caller failed or was cancelled: never reuse
                self.broken = True
                conn.drop()
            self.end(conn)
        if self._sender is not None:
            await self._stop_sender()


async def _send_chunks(conn: _Connection, body: AsyncIterable[bytes]) -> None:
    """Write an async-iterator body chunked, pausing while the transport's buffer is full.
    The iterator's own failure fails the exchange, with that very exception."""
    transport = conn.transport
    assert transport is not None
    finished = False
    try:
        async for chunk in body:
            if not conn.open or conn.error is not None or conn.done:
                return  # the exchange is over: stop pulling the caller's body
            if chunk:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                if conn.write_paused:
                    await conn.drain()
        finished = True
        if conn.open and conn.error is None:
            transport.write(b"0\r\n\r\n")
            conn.body_sent = True
            conn.last_activity = conn.loop.time()  # the answer's silence counts from here
    except Exception as exc:
        finished = True
        conn.fail(exc)
    finally:
        if not finished and isinstance(body, AsyncGenerator):
            await body.aclose()  # left mid-way (answer complete, or cancelled): close it


class HotHTTP:
    """The client. `request()` is used as `async with client.request(...) as response`."""

    def __init__(
        self,
        connect_timeout_s: float,
        read_timeout_s: float,
        total_timeout_s: float,
        *,
        limit_per_host: int = LIMIT_PER_HOST,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.total_timeout_s = total_timeout_s
        self.limit_per_host = limit_per_host
        self.idle_timeout_s = idle_timeout_s
        self._ssl = ssl_context
        self._pools: dict[tuple[str, str, int | None], _Pool] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    def request(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str] | None = None,
        body: Body = None,
    ) -> _Exchange:
        if self.closed:
            raise RuntimeError("the client is closed")
        return _Exchange(self, method, url, headers, body)

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def pool(self, url: URL) -> _Pool:
        key = (url.scheme, url.raw_host or "", url.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self, url.scheme, key[1], url.port or 80)
        return pool

    def arm_sweeper(self, idle_since: float) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_at(idle_since + self.idle_timeout_s, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        due = [t for pool in self._pools.values() if (t := pool.sweep(loop.time())) is not None]
        if due:
            self._sweeper = loop.call_at(min(due), self._sweep)

    def connections(self, url: URL) -> tuple[int, int]:
        """(open, idle) connections in the pool of `url`'s host (for tests and metrics)."""
        pool = self._pools.get((url.scheme, url.raw_host or "", url.port))
        return (len(pool.conns), len(pool.idle)) if pool is not None else (0, 0)

    async def close(self) -> None:
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conns = [conn for pool in self._pools.values() for conn in pool.conns]
        for conn in conns:
            conn.drop()
        self._pools.clear()
        if conns:
            await asyncio.sleep(0)  # let the aborted transports close their sockets
