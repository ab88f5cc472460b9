"""Fake upstreams: real HTTP servers on loopback that record what they receive and refuse any
request that does not carry the real key where the service expects it."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclass
class Seen:
    method: str
    path: str
    raw_path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class FakeUpstream:
    """Accepts only `key` in the slot `auth` (`bearer`, `basic`, `header:NAME`, `query:NAME`)."""

    key: str
    auth: str = "bearer"
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0

    def presented(self, request: web.Request) -> str | None:
        kind, _, name = self.auth.partition(":")
        if kind == "bearer":
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            return value if scheme == "Bearer" else None
        if kind == "basic":
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            if scheme != "Basic":
                return None
            return base64.b64decode(value).decode().split(":", 1)[0]
        if kind == "header":
            return request.headers.get(name)
        return request.query.get(name)

    @web.middleware
    async def record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen.append(
            Seen(
                request.method,
                request.path,
                request.raw_path,
                dict(request.query),
                CIMultiDict(request.headers),
                await request.read(),
            )
        )
        if self.presented(request) != self.key:
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided",
                        "type": "invalid_request_error",
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        response: web.StreamResponse = await handler(request)
        return response

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.record])
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/echo-key", self.echo_key)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"path": request.path, "query": dict(request.query), "method": request.method},
            headers={"x-request-id": "req_upstream_1", "Request-Id": "req_stripe_1"},
        )

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"https://elsewhere.example/next?key={self.key}")

    async def echo_key(self, request: web.Request) -> web.Response:
        return web.Response(text=f"your key is {self.key}!", headers={"X-Echo": f"k={self.key}"})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read() or b"{}")
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body.get("model", "gpt-4o-mini"),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hello"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                },
                headers={"x-request-id": "req_upstream_chat"},
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, word in enumerate(["hel", "lo"]):
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.05 if i == 0 else 0)
        usage = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "gpt-4o-mini",
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response
