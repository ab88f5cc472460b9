"""Fake upstreams: real HTTP servers on loopback that record what they receive and refuse any
request that does not carry the real key where the service expects it."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import CIMultiDict

# How long a gated stream waits for the test to release it before giving up (cutting the
# stream): bounded so that a gateway that buffers fails the test instead of hanging it.
GATE_TIMEOUT_S: Final = 5.0


@dataclass
class Seen:
    method: str
    path: str
    raw_path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes

    def text(self) -> str:
        """Everything this request carried (names and values), to search for a credential."""
        head = "".join(f"{k}: {v}\n" for k, v in self.headers.items())
        return f"{self.method} {self.raw_path}\n{head}\n{self.body.decode(errors='replace')}"

    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))


@dataclass
class FakeUpstream:
    """Accepts only `key` in the slot `auth` (`bearer`, `basic`, `header:NAME`, `query:NAME`).

    Answers like the built-in services would (OpenAI, Stripe, Google Maps, OpenWeather), so
    their official SDKs can parse the replies; anything else is echoed. With a `gate`, the
    streaming routes send their first event and then wait until the test sets it.
    """

    key: str
    auth: str = "bearer"
    also: frozenset[str] = frozenset()  # further keys it accepts
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    gate: asyncio.Event | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

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
        if self.presented(request) not in {self.key, *self.also}:
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
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/events", self.events)
        app.router.add_post("/v1/customers", self.create_customer)
        app.router.add_get("/v1/customers", self.list_customers)
        app.router.add_get("/v1/customers/{id}", self.get_customer)
        app.router.add_post("/v1/charges", self.create_charge)
        app.router.add_get("/maps/api/geocode/json", self.geocode)
        app.router.add_get("/data/2.5/weather", self.weather)
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
            if i == 0:
                await self.wait_for_gate(0.05)
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

    async def wait_for_gate(self, otherwise_s: float = 0.0) -> None:
        """Hold a stream until the test sets `gate` (bounded); without a gate, a short pause."""
        if self.gate is None:
            await asyncio.sleep(otherwise_s)
            return
        async with asyncio.timeout(GATE_TIMEOUT_S):
            await self.gate.wait()

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": "gpt-4o-mini", "object": "model", "created": 1, "owned_by": "openai"}
        return web.json_response({"object": "list", "data": [model]})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Plain Server-Sent Events: two events, the second only once the gate opens."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        await response.write(b"event: tick\ndata: 1\n\n")
        await self.wait_for_gate()
        await response.write(b"event: tick\ndata: 2\n\n")
        await response.write_eof()
        return response

    # Stripe: form bodies in, objects with `object` and a `Request-Id` header out.

    def stripe_reply(self, body: dict[str, Any], status: int = 200) -> web.Response:
        return web.json_response(
            body, status=status, headers={"Request-Id": f"req_fake{next(self._ids)}"}
        )

    @staticmethod
    def customer(customer_id: str, form: dict[str, str]) -> dict[str, Any]:
        metadata = {k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")}
        return {
            "id": customer_id,
            "object": "customer",
            "created": 1700000000,
            "email": form.get("email"),
            "name": form.get("name"),
            "metadata": metadata,
            "livemode": False,
        }

    async def create_customer(self, request: web.Request) -> web.Response:
        form = dict(parse_qsl((await request.read()).decode(), keep_blank_values=True))
        return self.stripe_reply(self.customer("cus_fake1", form))

    async def get_customer(self, request: web.Request) -> web.Response:
        return self.stripe_reply(self.customer(request.match_info["id"], {}))

    async def list_customers(self, request: web.Request) -> web.Response:
        data = [self.customer("cus_fake1", {"email": "ada@example.com"})]
        return self.stripe_reply(
            {"object": "list", "url": "/v1/customers", "has_more": False, "data": data}
        )

    async def create_charge(self, request: web.Request) -> web.Response:
        form = dict(parse_qsl((await request.read()).decode(), keep_blank_values=True))
        return self.stripe_reply(
            {
                "id": "ch_fake1",
                "object": "charge",
                "amount": int(form.get("amount", "0")),
                "currency": form.get("currency", "usd"),
                "status": "succeeded",
                "paid": True,
                "livemode": False,
            }
        )

    async def geocode(self, request: web.Request) -> web.Response:
        address = request.query.get("address", "")
        result = {
            "formatted_address": address,
            "geometry": {"location": {"lat": 37.4223878, "lng": -122.0841877}},
            "place_id": "ChIJfake",
            "types": ["street_address"],
        }
        return web.json_response({"status": "OK", "results": [result]})

    async def weather(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "cod": 200,
                "name": request.query.get("q", ""),
                "main": {"temp": 21.5, "humidity": 40},
                "weather": [{"id": 800, "main": "Clear", "description": "clear sky"}],
            }
        )
