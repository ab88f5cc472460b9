"""WebSocket upgrades through the gateway (OpenAI's realtime API shape): key injected into the
handshake, messages relayed both ways, echoes of the key scrubbed, redirects not followed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from tests.test_gateway_proxy import OPENAI_KEY

OTHER_HOST = "127.0.0.2"
UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


@dataclass
class RealtimeUpstream:
    """`/v1/realtime`: accepts only the real key; echoes, and says the key once on request."""

    handshakes: list[dict[str, str]] = field(default_factory=list)
    received: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    redirect_to: str = ""
    expected_key: str = OPENAI_KEY

    async def realtime(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.headers) | {"query": request.query_string})
        if self.redirect_to:
            raise web.HTTPFound(self.redirect_to)
        if request.headers.get("Authorization") != f"Bearer {self.expected_key}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        ws = web.WebSocketResponse(protocols=("realtime",))
        await ws.prepare(request)
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            self.received.append(message.data)
            if message.data == "leak":
                await ws.send_str(f"your key is {OPENAI_KEY}")
            elif message.data == "bye":
                await ws.close(code=4000, message=b"done")
            else:
                await ws.send_str(f"echo:{message.data}")
        self.closed.set()
        return ws

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/realtime", self.realtime)
        return app


@dataclass
class Wired:
    gateway: TestClient[Any, Any]
    upstream: RealtimeUpstream
    token: str


@pytest.fixture
async def wired(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> Wired:
    upstream = RealtimeUpstream()
    server = await aiohttp_server(upstream.app())
    resp = await admin_client.put(
        "/services/openai",
        headers=as_admin,
        json={"base_url": f"http://127.0.0.1:{server.port}"},
    )
    assert resp.status == 200, await resp.text()
    resp = await admin_client.post(
        "/keys", headers=as_admin, json={"key": OPENAI_KEY, "service": "openai"}
    )
    assert resp.status == 201, await resp.text()
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "rt", "services": ["openai"]}
    )
    assert resp.status == 201
    return Wired(gateway_client, upstream, (await resp.json())["token"])


async def test_messages_flow_both_ways_with_the_key_injected(wired: Wired) -> None:
    async with wired.gateway.ws_connect(
        "/openai/v1/realtime?model=gpt-realtime",
        headers={"Authorization": f"Bearer {wired.token}", "OpenAI-Beta": "realtime=v1"},
        protocols=("realtime",),
    ) as ws:
        assert ws.protocol == "realtime"
        await ws.send_str("hello")
        assert (await ws.receive_str(timeout=5)) == "echo:hello"
        await ws.send_str("leak")
        leaked = await ws.receive_str(timeout=5)
        assert OPENAI_KEY not in leaked
        assert leaked == "your key is [redacted]"
        await ws.send_str("bye")
        closing = await ws.receive(timeout=5)
        assert closing.type == WSMsgType.CLOSE
        assert closing.data == 4000  # the upstream's close code reaches the client
    seen = wired.upstream.handshakes[-1]
    assert seen["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert seen["OpenAI-Beta"] == "realtime=v1"
    assert seen["query"] == "model=gpt-realtime"
    assert wired.token not in str(seen)
    assert wired.upstream.received == ["hello", "leak", "bye"]


async def test_client_closing_closes_the_upstream(wired: Wired) -> None:
    ws = await wired.gateway.ws_connect(
        "/openai/v1/realtime", headers={"X-Wallet-Token": wired.token}
    )
    await ws.send_str("ping")
    assert (await ws.receive_str(timeout=5)) == "echo:ping"
    await ws.close()
    async with asyncio.timeout(5):
        await wired.upstream.closed.wait()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer AIzaWT_" + "x" * 43}])
async def test_bad_credentials_never_reach_upstream(wired: Wired, headers: dict[str, str]) -> None:
    resp = await wired.gateway.get(
        "/openai/v1/realtime",
        headers={**headers, **UPGRADE},
    )
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthenticated"
    assert wired.upstream.handshakes == []


async def test_upstream_refusal_is_reported_with_its_status(wired: Wired) -> None:
    wired.upstream.expected_key = "sk-proj-" + "W" * 40  # the stored key is now wrong
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await wired.gateway.ws_connect(
            "/openai/v1/realtime", headers={"X-Wallet-Token": wired.token}
        )
    assert refused.value.status == 401
    assert len(wired.upstream.handshakes) == 1


async def test_redirect_is_relayed_not_followed(wired: Wired) -> None:
    connections = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    canary = await asyncio.start_server(count, OTHER_HOST, 0)
    port = canary.sockets[0].getsockname()[1]
    wired.upstream.redirect_to = f"http://{OTHER_HOST}:{port}/v1/realtime?key={OPENAI_KEY}"
    try:
        resp = await wired.gateway.get(
            "/openai/v1/realtime",
            headers={"X-Wallet-Token": wired.token, **UPGRADE},
            allow_redirects=False,
        )
        assert resp.status == 302
        location = resp.headers["Location"]
        assert OPENAI_KEY not in location
        assert location.startswith(f"http://{OTHER_HOST}:{port}/")
        await asyncio.sleep(0.2)  # a follow-up connection would have arrived by now
        assert connections == 0
    finally:
        canary.close()
        await canary.wait_closed()
