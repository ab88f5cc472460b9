"""CPU per request of the upstream client alone: aiohttp.ClientSession against HotHTTP.

A raw asyncio server on 127.0.0.1 answers every request with the same small JSON body (so the
server's own cost is tiny and equal for both); N GETs are made sequentially, then N at a
concurrency of 32, by each client in the same process, on the same loop (uvloop when
installed, as the wallet runs). CPU is `time.process_time` over the whole run, server
included, divided by N; the server's share is measured alone (raw sockets) and reported.

`python -m bench.hothttp_micro [-n 20000]`. Not run by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
from yarl import URL

from bench.upstream import new_loop
from gateway.hothttp import HotHTTP

BODY: Final = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0}]}'
ANSWER: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nx-request-id: req_123\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)
CONCURRENCY: Final = 32
HEADERS: Final = {
    "Authorization": "Bearer sk-test-0123456789",
    "Content-Type": "application/json",
    "User-Agent": "OpenAI/Python 1.50.0",
    "Accept": "application/json",
}


class _Server(asyncio.Protocol):
    """Answers each request head (keep-alive, no request bodies in this bench)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.pending = b""

    def data_received(self, data: bytes) -> None:
        self.pending += data
        count = self.pending.count(b"\r\n\r\n")
        if count:
            self.pending = self.pending[self.pending.rfind(b"\r\n\r\n") + 4 :]
            self.transport.write(ANSWER * count)  # type: ignore[attr-defined]


async def _run(n: int, concurrency: int, one: Callable[[], Awaitable[None]]) -> float:
    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    await worker(min(n, 200))  # warm up: connections, caches
    start = time.process_time()
    share, extra = divmod(n, concurrency)
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))
    return (time.process_time() - start) / n * 1e6


async def main(n: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = URL(f"http://127.0.0.1:{port}/v1/chat/completions?x=1")
    timeout = aiohttp.ClientTimeout(total=60, sock_connect=10, sock_read=30)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000),
        timeout=timeout,
        auto_decompress=True,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    hot = HotHTTP(10, 30, 60)

    async def with_aiohttp() -> None:
        async with session.request("GET", url, headers=HEADERS, allow_redirects=False) as r:
            assert r.status == 200
            assert await r.read() == BODY

    async def with_hot() -> None:
        async with hot.request("GET", url, HEADERS) as r:
            assert r.status == 200
            assert await r.read() == BODY

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

    async def bare() -> None:
        writer.write(request)
        await reader.readexactly(len(ANSWER))

    print(f"{n} GETs, small JSON answer, CPU µs per request (client + local server + loop)")
    print(f"{'client':<22}{'sequential':>12}{'c32':>10}")
    floor = await _run(n, 1, bare)
    print(f"{'raw streams (floor)':<22}{floor:>12.1f}{'-':>10}")
    for name, one in (("aiohttp.ClientSession", with_aiohttp), ("HotHTTP", with_hot)):
        sequential = await _run(n, 1, one)
        concurrent = await _run(n, CONCURRENCY, one)
        print(f"{name:<22}{sequential:>12.1f}{concurrent:>10.1f}")
    writer.close()
    await session.close()
    await hot.close()
    server.close()


def cli() -> None:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("-n", type=int, default=20000, help="requests per run")
    ns = args.parse_args()
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(main(ns.n))


if __name__ == "__main__":
    cli()
