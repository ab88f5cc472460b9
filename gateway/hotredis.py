"""A lean Redis client for the hot path's one script call per request.

redis-py spends 50-100 µs of CPU per command (connection checkout, command packing, response
handling), as much as the rest of the gateway's own work. This client keeps one connection
per process and pipelines every caller's commands on it: a command is packed once and
written at once, replies (parsed by hiredis) resolve the callers' futures in order. About a
fifth of the cost, and the commands of concurrent requests share one write; everything off
the hot path keeps using redis-py.

Failures surface as redis-py's own exceptions (ConnectionError, TimeoutError, ResponseError),
so callers handle one family. A timed-out or broken connection is closed with every pending
command failed (a late reply must never answer the wrong caller); the next command
reconnects.

On Redis Cluster (REDIS_CLUSTER), gateway/hotcluster.py's HotCluster routes each command to
its slot's node over one such client per node; the choice is made once, at startup.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from yarl import URL

from gateway.secret import Secret

CONNECT_TIMEOUT_S: Final = 5.0
COMMAND_TIMEOUT_S: Final = 5.0


def pack(*args: str | int | bytes) -> bytes:
    """A command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


ASKING: Final = pack("ASKING")


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._outgoing: list[bytes] = []

    def send(self, command: bytes) -> None:
        """Queue a command; everything queued in one turn of the event loop leaves in one
        write (concurrent requests share the system call, and Redis answers them together)."""
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(command)

    def _flush(self) -> None:
        commands, self._outgoing = self._outgoing, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(commands))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                self.fail(RedisConnectionError("unexpected reply from Redis"))
                return
            future = self.waiting.popleft()
            if not future.done():
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(ResponseError(str(reply)))
                else:
                    future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError("the connection to Redis was lost"))

    def fail(self, exc: Exception) -> None:
        self.lost = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


@dataclass(frozen=True)
class Endpoint:
    """Where one Redis server listens, and how to log in to it."""

    host: str
    port: int
    socket: str | None = None  # a unix socket's path instead of host and port
    tls: bool = False
    username: str | None = None
    password: Secret[str] | None = None
    db: int = 0

    @classmethod
    def parse(cls, url: Secret[str]) -> Endpoint:
        parsed = URL(url.reveal())
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("REDIS_URL must be redis://, rediss:// or unix://")
        socket = parsed.path if parsed.scheme == "unix" else None
        path = "" if socket else parsed.path.strip("/")
        db = path if path.isdigit() else parsed.query.get("db", "0")
        return cls(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 6379,
            socket=socket,
            tls=parsed.scheme == "rediss",
            username=parsed.user or None,
            password=Secret(parsed.password) if parsed.password else None,
            db=int(db) if db.isdigit() else 0,
        )


class HotRedis:
    """One Redis server, over one pipelined connection."""

    def __init__(self, url: Secret[str] | Endpoint) -> None:
        self._at = url if isinstance(url, Endpoint) else Endpoint.parse(url)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and not self._protocol.lost:
                return self._protocol
            self._protocol = await self._connect()
            return self._protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        at = self._at
        context = ssl.create_default_context() if at.tls else None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                if at.socket is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, at.socket)
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol, at.host, at.port, ssl=context
                    )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis ({type(exc).__name__})") from None
        setup: list[bytes] = []
        if at.password is not None:
            auth = [at.password.reveal()]
            if at.username:
                auth.insert(0, at.username)
            setup.append(pack("AUTH", *auth))
        if at.db:
            setup.append(pack("SELECT", at.db))
        try:
            for command in setup:
                await self._send(protocol, command)
        except BaseException:
            protocol.fail(RedisConnectionError("Redis refused the connection's setup"))
            raise
        return protocol

    async def _send(self, protocol: _Protocol, command: bytes) -> Any:
        if protocol.lost:
            raise RedisConnectionError("the connection to Redis was lost")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.waiting.append(future)
        protocol.send(command)
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                return await future
        except TimeoutError:
            protocol.fail(RedisTimeoutError("Redis did not answer in time"))
            raise RedisTimeoutError("Redis did not answer in time") from None
        except asyncio.CancelledError:
            # The reply will still arrive and must be consumed in order: the future stays
            # queued (and is skipped once done), so nothing is out of step.
            future.cancel()
            raise

    async def execute(self, *args: str | int | bytes) -> Any:
        return await self._send(await self._connection(), pack(*args))

    async def execute_asking(self, *args: str | int | bytes) -> Any:
        """A command for a slot this node is importing (a cluster's -ASK): ASKING must come
        right before it on the same connection, so both are queued with nothing between."""
        protocol = await self._connection()
        asking: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.waiting.append(asking)
        protocol.send(ASKING)
        try:
            return await self._send(protocol, pack(*args))
        finally:
            if asking.done() and not asking.cancelled():
                asking.exception()  # its OK (or error) is of no interest: the command's is
            else:
                asking.cancel()

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None


class HotScript:
    """A Lua script run with EVALSHA, loaded again after a Redis restart (NOSCRIPT)."""

    def __init__(self, client: HotRedis, source: str) -> None:
        self._client = client
        self._source = source
        self._sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's script id

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        try:
            return await self._client.execute("EVALSHA", self._sha, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self._client.execute("EVAL", self._source, len(keys), *keys, *args)
