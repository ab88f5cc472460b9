"""WebSocket upgrades (OpenAI's realtime API and alike): the same authentication and key
injection as any request, then messages relayed both ways until either side closes.

The upstream handshake goes through its own client session whose middleware refuses to follow
a redirect: aiohttp's `ws_connect` follows redirects with every header attached, key included.
A redirect is relayed to the client instead, as for plain requests. Messages from the upstream
that echo the key are scrubbed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

import aiohttp
import structlog
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, WSMsgType, web
from multidict import CIMultiDict

from gateway.appkeys import SETTINGS
from gateway.errors import WalletError
from gateway.forward import Outbound, Timing
from gateway.inject import redact, redact_bytes, response_headers
from gateway.upstream import tls_context, upstream_errors

log = structlog.get_logger(__name__)

WS_SESSION = web.AppKey("websocket_session", aiohttp.ClientSession)
# aiohttp writes its own handshake; the client's offer is passed as `protocols`.
HANDSHAKE: Final = (
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "sec-websocket-accept",
)
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
HEARTBEAT_S: Final = 30.0
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
# Close codes that only describe a closure and may not be sent in a close frame (RFC 6455 7.4.1).
UNSENDABLE_CLOSE_CODES: Final = frozenset({1005, 1006, 1015})


class UpstreamRefusedUpgrade(WalletError):
    """The upstream answered the handshake with a status other than 101."""

    code = "upstream_refused_upgrade"

    def __init__(self, status: int, service: str) -> None:
        super().__init__(f"{service} refused the WebSocket upgrade with status {status}")
        self.status = status  # type: ignore[misc]


class _Redirected(Exception):
    def __init__(self, response: ClientResponse) -> None:
        super().__init__("redirect not followed")
        self.response = response


async def _no_redirects(request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
    response = await handler(request)
    if response.status in REDIRECTS:
        raise _Redirected(response)
    return response


def is_upgrade(request: web.Request) -> bool:
    return (
        request.headers.get("Upgrade", "").lower() == "websocket"
        and "upgrade" in request.headers.get("Connection", "").lower()
    )


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    app[WS_SESSION] = session = aiohttp.ClientSession(
        # Only the handshake is timed; an open WebSocket is kept alive by heartbeats.
        timeout=aiohttp.ClientTimeout(
            total=s.upstream_total_timeout_s,
            sock_connect=s.upstream_connect_timeout_s,
            sock_read=s.upstream_read_timeout_s,
        ),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        middlewares=(_no_redirects,),
        connector=aiohttp.TCPConnector(ssl=tls_context(s.upstream_ca_bundle)),
    )
    yield
    await session.close()


async def relay(request: web.Request, out: Outbound, timing: Timing) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    headers = CIMultiDict(
        (name, value) for name, value in out.headers.items() if name.lower() not in HANDSHAKE
    )
    offered = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    timing.upstream_started = loop.time()
    try:
        with upstream_errors(out.service):
            try:
                upstream = await request.app[WS_SESSION].ws_connect(
                    out.url,
                    headers=headers,
                    protocols=offered,
                    heartbeat=HEARTBEAT_S,
                    max_msg_size=MAX_MESSAGE_BYTES,
                )
            except aiohttp.WSServerHandshakeError as exc:  # before the 502 mapping
                raise UpstreamRefusedUpgrade(exc.status, out.service) from None
    except _Redirected as redirected:
        return _relay_redirect(redirected.response, out)
    timing.upstream_headers = loop.time()
    async with upstream:
        client = web.WebSocketResponse(
            protocols=[upstream.protocol] if upstream.protocol else (),
            heartbeat=HEARTBEAT_S,
            max_msg_size=MAX_MESSAGE_BYTES,
        )
        client.headers.update(out.extra_headers)
        await client.prepare(request)
        timing.client_prepared = loop.time()
        async with asyncio.TaskGroup() as group:
            group.create_task(_pump_up(client, upstream))
            group.create_task(_pump_down(upstream, client, out.forms))
    return client


def _relay_redirect(response: ClientResponse, out: Outbound) -> web.Response:
    status = response.status
    headers = response_headers(response.headers, out.forms)
    response.close()
    headers.update(out.extra_headers)
    return web.Response(status=status, headers=headers)


async def _pump_up(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    """Client → upstream, until the client closes; then close the upstream side."""
    try:
        async for message in client:
            if message.type == WSMsgType.TEXT:
                await upstream.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await upstream.send_bytes(message.data)
    except (aiohttp.ClientError, ConnectionError) as exc:
        log.info("websocket_closed", side="upstream", error=type(exc).__name__)
    finally:
        await upstream.close(code=_close_code(client.close_code))


async def _pump_down(
    upstream: aiohttp.ClientWebSocketResponse,
    client: web.WebSocketResponse,
    forms: tuple[str, ...],
) -> None:
    """Upstream → client with any echo of the key scrubbed; then close the client side."""
    try:
        async for message in upstream:
            if message.type == WSMsgType.TEXT:
                await client.send_str(redact(message.data, forms))
            elif message.type == WSMsgType.BINARY:
                await client.send_bytes(redact_bytes(message.data, forms))
    except (aiohttp.ClientError, ConnectionError) as exc:
        log.info("websocket_closed", side="client", error=type(exc).__name__)
    finally:
        await client.close(code=_close_code(upstream.close_code))


def _close_code(code: int | None) -> int:
    if code is None or code in UNSENDABLE_CLOSE_CODES:
        return aiohttp.WSCloseCode.OK
    return code
