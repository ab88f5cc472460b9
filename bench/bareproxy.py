"""The floor: a bare aiohttp pass-through proxy, `/{service}/{path}` → that service's base URL.

No auth, no key, no accounting: what any aiohttp proxy pays to stream a response back.
`python -m bench.bareproxy --port 9100 --route json=http://127.0.0.1:9000`.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
from aiohttp import web

from bench.upstream import serve

ROUTES: Final = web.AppKey("routes", dict)
SESSION: Final = web.AppKey("session", aiohttp.ClientSession)
DROP: Final = frozenset(
    {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
)


async def proxy(request: web.Request) -> web.StreamResponse:
    base = request.app[ROUTES].get(request.match_info["service"])
    if base is None:
        raise web.HTTPNotFound()
    url = f"{base}/{request.match_info['path']}"
    if request.query_string:
        url += f"?{request.rel_url.raw_query_string}"
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
    body = request.content if request.body_exists else None
    async with request.app[SESSION].request(
        request.method, url, headers=headers, data=body, allow_redirects=False
    ) as upstream:
        out = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP}
        response = web.StreamResponse(status=upstream.status, headers=out)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))
    yield
    await session.close()


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__)
    args.add_argument("--port", type=int, required=True)
    args.add_argument("--route", action="append", default=[], help="SERVICE=BASE_URL")
    ns = args.parse_args()
    app = web.Application()
    app[ROUTES] = dict(r.split("=", 1) for r in ns.route)
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{service}/{path:.*}", proxy)
    serve(app, ns.port)


if __name__ == "__main__":
    main()
