"""The fake upstream (aiohttp): a fixed JSON body at any path, Server-Sent Events at `/sse...`.

Every request must carry `Authorization: Bearer <one of --key>`, so a 401 in the results
means the key was not injected. Run several copies on one port (`SO_REUSEPORT`) for more
cores: `python -m bench.upstream --port 9000 --key k1 --key k2`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
from typing import Final

from aiohttp import web

JSON_BODY: Final = json.dumps(
    {
        "id": "bench-0001",
        "object": "chat.completion",
        "model": "fake-upstream",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello, bench"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    },
    separators=(",", ":"),
).encode()
SSE_EVENTS: Final = 5
SSE_EVENT: Final = b'data: {"index":%d,"delta":"tok"}\n\n'
SSE_PREFIX: Final = "/sse"
KEYS: Final = web.AppKey("keys", frozenset)


async def handle(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Authorization") not in request.app[KEYS]:
        return web.Response(status=401, text="missing or wrong key")
    if not request.path.startswith(SSE_PREFIX):
        return web.Response(body=JSON_BODY, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for index in range(SSE_EVENTS):
        await response.write(SSE_EVENT % index)  # one write, one chunk per event
    await response.write_eof()
    return response


def make_app(keys: list[str]) -> web.Application:
    app = web.Application()
    app[KEYS] = frozenset(f"Bearer {key}" for key in keys)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--port", type=int, required=True)
    args.add_argument("--key", action="append", default=[], help="an accepted bearer key")
    args.add_argument("--tls-port", type=int, help="also serve TLS on this port")
    args.add_argument("--cert", help="PEM certificate for --tls-port")
    args.add_argument("--cert-key", help="PEM key for --tls-port")
    ns = args.parse_args()
    tls = None
    if ns.tls_port:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(ns.cert, ns.cert_key)
    serve(make_app(ns.key), ns.port, tls, ns.tls_port)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, as the wallet uses it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(
    app: web.Application,
    port: int,
    tls: ssl.SSLContext | None = None,
    tls_port: int | None = None,
) -> None:
    """Serve on 127.0.0.1 (and with TLS on `tls_port`) until SIGINT/SIGTERM; several
    processes may share the ports."""
    if tls is None or tls_port is None:
        web.run_app(
            app,
            host="127.0.0.1",
            port=port,
            reuse_port=True,
            backlog=1024,
            shutdown_timeout=1.0,
            access_log=None,
            print=None,
            loop=new_loop(),
        )
        return

    async def both() -> None:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        for site in (
            web.TCPSite(runner, "127.0.0.1", port, reuse_port=True, backlog=1024),
            web.TCPSite(
                runner, "127.0.0.1", tls_port, reuse_port=True, backlog=1024, ssl_context=tls
            ),
        ):
            await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(both())


if __name__ == "__main__":
    main()
