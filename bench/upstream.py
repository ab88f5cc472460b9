"""The fake upstream (aiohttp): a fixed JSON body at any path, Server-Sent Events at `/sse...`.

Every request must carry `Authorization: Bearer <one of --key>`, so a 401 in the results
means the key was not injected. Run several copies on one port (`SO_REUSEPORT`) for more
cores: `python -m bench.upstream --port 9000 --key k1 --key k2`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    ns = args.parse_args()
    serve(make_app(ns.key), ns.port)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, as the wallet uses it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(app: web.Application, port: int) -> None:
    """Serve on 127.0.0.1 until SIGINT/SIGTERM; several processes may share `port`."""
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


if __name__ == "__main__":
    main()
