"""Forward-proxy mode: apps that cannot change their base URL set `HTTPS_PROXY` to the
wallet (`FORWARD_PROXY_PORT`, 6791) and keep calling `https://api.openai.com/...`.

A connection starts at the front door, which reads one request head:
- `CONNECT host:443`: served only when a service claims `host` (its `hosts`), never for an
  IP literal or another port, and no connection is made otherwise. A `Proxy-Authorization`
  (basic `wallet:TOKEN` or bearer) must hold a valid wallet token (else 407); without one,
  each request in the tunnel must carry its own. The wallet then answers 200, terminates TLS
  with a leaf certificate for exactly that host (gateway/ca.py; the handshake fails unless
  SNI names it), and serves the tunnel's requests with the gateway's own request handler.
- an absolute-form `http://host/...` request (port 80): the same checks, per request.
Anything else gets a JSON error. Inside, every request runs the reverse proxy's pipeline
(`proxy.forward`): authenticate, pick a key, inject, stream, account, fail over; the
upstream is the service's configured `base_url`, whatever host the client named.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import re
import secrets
import ssl
from dataclasses import dataclass, field
from typing import Final

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import BaseRunner, BaseSite
from multidict import CIMultiDict
from yarl import URL

from gateway import routing, tasks
from gateway.appkeys import CALLERS, CATALOG
from gateway.ca import AUTHORITIES
from gateway.errors import BadRequest, Forbidden, Unauthenticated, VaultSealed, WalletError
from gateway.middleware import Handler
from gateway.proxy import Inbound, forward
from gateway.secret import Secret
from gateway.services import Service

log = structlog.get_logger(__name__)

_PORT: Final = re.compile(r"[0-9]{1,5}")  # ASCII digits only ("²".isdigit() is True)
TLS_PORT: Final = 443
PLAIN_PORT: Final = 80
MAX_HEAD_BYTES: Final = 16 * 1024
HEAD_TIMEOUT_S: Final = 30.0
HANDSHAKE_TIMEOUT_S: Final = 15.0
REALM: Final = 'Basic realm="API Key Wallet"'


class Internal(WalletError):
    status, code = 500, "internal_error"


class HostNotServed(Forbidden):
    code = "host_not_served"


class MisdirectedRequest(WalletError):
    status, code = 421, "misdirected_request"


class ProxyAuthRequired(WalletError):
    status, code = 407, "proxy_authentication_required"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Proxy-Authenticate": REALM})


@dataclass(frozen=True)
class Tunnel:
    """What a connection was opened for: a TLS tunnel to one host (with the CONNECT's token,
    if any), or plain absolute-form requests (host None: checked per request)."""

    host: str | None
    token: Secret[str] | None = field(default=None, repr=False)


class TunnelHandler(RequestHandler):
    """The gateway's request handler, serving one forward-proxy connection."""

    tunnel: Tunnel


def _host_port(authority: str, default_port: int | None) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) → (host, port); BadRequest when malformed, or when the
    port is missing and there is no default (a CONNECT target must name its port)."""
    host, port = authority, ""
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise BadRequest("malformed proxy target")
        port = rest[1:]
    elif ":" in authority:
        host, _, port = authority.rpartition(":")
    if not port and default_port is not None:
        port = str(default_port)
    if not host or not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise BadRequest("malformed proxy target: host:port")
    return host.lower().rstrip("."), int(port)


async def served(app: web.Application, host: str, port: int, wanted_port: int) -> Service:
    """The service claiming `host`, when `port` is the one it is reached on; else 403."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise HostNotServed("the wallet serves API hosts by name, never an IP address")
    if port != wanted_port:
        raise HostNotServed(f"the wallet serves API hosts on port {wanted_port} only")
    service = await app[CATALOG].by_host(host)
    if service is None:
        raise HostNotServed("no service of this wallet claims this host")
    return service


def proxy_token(value: str | None) -> Secret[str] | None:
    """The wallet token of a `Proxy-Authorization` (basic `any:TOKEN`, or bearer)."""
    if not value:
        return None
    scheme, _, credential = value.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() == "bearer":
        return Secret(credential) if credential else None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credential, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, _, password = decoded.partition(":")
        return Secret(password or user) if (password or user) else None
    return None


async def check_proxy_token(app: web.Application, value: str | None, service: str) -> Secret[str]:
    """A `Proxy-Authorization` that names a valid wallet token for `service`; else 407."""
    token = proxy_token(value)
    if token is None:
        raise ProxyAuthRequired("Proxy-Authorization must carry a wallet token")
    try:
        await app[CALLERS].authenticate(token, service)
    except (Unauthenticated, Forbidden):
        raise ProxyAuthRequired(
            "the wallet token in Proxy-Authorization is not valid here"
        ) from None
    return token


async def tunneled(request: web.Request, tunnel: Tunnel) -> web.StreamResponse:
    """A request that arrived through the forward proxy: the same pipeline as `/{service}/`,
    for the service that claims the host, whatever else the request names."""
    app = request.app
    target = request.raw_path
    absolute = not target.startswith("/")
    if tunnel.host is None:  # plain http: absolute-form, checked request by request
        if not target.startswith("http://"):
            raise BadRequest("a forward proxy takes absolute-form http:// requests or CONNECT")
        url = URL(target, encoded=True)
        host, port = (url.raw_host or "").lower().rstrip("."), url.port or PLAIN_PORT
        service = await served(app, host, port, PLAIN_PORT)
        token = None
        if "Proxy-Authorization" in request.headers:
            token = await check_proxy_token(
                app, request.headers["Proxy-Authorization"], service.slug
            )
    else:
        host = tunnel.host
        if absolute:  # absolute-form inside a tunnel: it must name the tunnel's own origin
            url = URL(target, encoded=True)
            if url.scheme != "https" or (url.raw_host or "").lower().rstrip(".") != host:
                raise MisdirectedRequest("this tunnel serves only the host it was opened for")
        service = await served(app, host, TLS_PORT, TLS_PORT)
        token = tunnel.token
    named, _ = _host_port(request.headers.get("Host", host), PLAIN_PORT)
    if named != host:
        raise MisdirectedRequest("the Host header names another host than the proxy target")
    rel = request.rel_url
    inbound = Inbound(
        service.slug,
        request.method,
        routing.check_path(rel.raw_path),
        rel.raw_query_string,
        request.headers,
        None,
        stream_body=True,
        token=token,
        mode="forward",
        base_url=upstream_base(service, host),
    )
    return await forward(request, inbound)


def upstream_base(service: Service, host: str) -> str | None:
    """Where a request for `host` goes: the service's `base_url`, except when that is the
    service's own public API host and `host` is another host the service claims (the
    googlemaps SDK calls roads.googleapis.com directly): then that host, over HTTPS, with
    the base URL's path. A service pointed elsewhere (a private upstream, a test double)
    takes everything at its `base_url`."""
    base = URL(service.base_url)
    if host == base.host or base.host not in service.hosts:
        return None
    return f"https://{host}{base.raw_path.rstrip('/')}"


@web.middleware
async def divert(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests of forward-proxy connections never reach the gateway's own routes."""
    protocol = request.protocol
    if type(protocol) is TunnelHandler:
        return await tunneled(request, protocol.tunnel)
    return await handler(request)


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 answer in the one JSON error shape, from the front door."""
    body = json.dumps(
        {"error": {"code": code, "message": message, "request_id": secrets.token_hex(12)}}
    ).encode()
    reason = {400: "Bad Request", 403: "Forbidden", 407: "Proxy Authentication Required"}.get(
        status, "Error"
    )
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(head).encode() + body


def _parse_head(head: bytes) -> tuple[str, str, CIMultiDict[str]]:
    """Method, target and headers of a request head; BadRequest when it is not HTTP/1.x."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[0].isalpha():
        raise BadRequest("not an HTTP/1.1 request")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or not name.isascii():
            raise BadRequest("malformed request header")
        headers.add(name, value.strip())
    return parts[0], parts[1], headers


class FrontDoor(asyncio.Protocol):
    """Reads a connection's first request head, then turns the connection into a TLS tunnel
    (CONNECT), hands it to the gateway's handler (absolute-form http://), or refuses it."""

    def __init__(self, runner: BaseRunner, app: web.Application) -> None:
        self._runner = runner
        self._app = app
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._busy = False  # the head is in: what comes next waits for the decision
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HEAD_TIMEOUT_S, transport.close)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._busy:
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or end > MAX_HEAD_BYTES:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._refuse(BadRequest("request head too large"))
            return
        self._busy = True
        if self._timer is not None:
            self._timer.cancel()
        assert self._transport is not None
        self._transport.pause_reading()
        head, rest = bytes(self._buffer[:end]), bytes(self._buffer[end + 4 :])
        self._buffer.clear()
        self._task = tasks.spawn(self._app, "forward-proxy-open", self._open(head, rest))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    def _refuse(self, exc: WalletError) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_error(exc.status, exc.code, exc.message, exc.headers))
            self._transport.close()

    async def _open(self, head: bytes, rest: bytes) -> None:
        try:
            method, target, headers = _parse_head(head)
            if method == "CONNECT":
                await self._tunnel(target, headers, rest)
            elif target.lower().startswith("http://"):
                self._hand_over(Tunnel(None), head + b"\r\n\r\n" + rest)
            else:
                raise BadRequest(
                    "this is the wallet's forward proxy: send CONNECT host:443, or an "
                    "absolute-form http:// request"
                )
        except WalletError as exc:
            log.info("forward_proxy_refused", code=exc.code)
            self._refuse(exc)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            log.info("forward_proxy_handshake_failed", error=type(exc).__name__)
            self._close()
        except asyncio.CancelledError:  # shutting down
            self._close()
            raise
        except Exception as exc:  # a bug, or a database error nobody expected: never a leak
            log.error("forward_proxy_failed", error=type(exc).__name__)
            self._refuse(Internal("internal error"))

    def _close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def _tunnel(self, target: str, headers: CIMultiDict[str], rest: bytes) -> None:
        app = self._app
        host, port = _host_port(target, None)
        service = await served(app, host, port, TLS_PORT)
        token = None
        if "Proxy-Authorization" in headers:
            token = await check_proxy_token(app, headers["Proxy-Authorization"], service.slug)
        authority = app[AUTHORITIES].current
        if authority is None:
            raise VaultSealed()
        if rest:
            raise BadRequest("the client sent data before the tunnel was established")
        context = authority.context_for(host)
        transport = self._transport
        assert transport is not None
        transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        loop = asyncio.get_running_loop()
        tls = await loop.start_tls(
            transport,
            self,
            context,
            server_side=True,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
        )
        if tls is None:  # the connection went away during the handshake
            return
        self._transport = tls
        early, self._buffer = bytes(self._buffer), bytearray()
        self._hand_over(Tunnel(host, token), early)

    def _hand_over(self, tunnel: Tunnel, data: bytes) -> None:
        """The gateway's own HTTP handler takes the connection from here."""
        transport = self._transport
        assert transport is not None
        server = self._runner.server
        assert server is not None
        handler = TunnelHandler(server, loop=asyncio.get_running_loop(), **server._kwargs)
        handler.tunnel = tunnel
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)
        transport.resume_reading()


class ForwardProxySite(BaseSite):
    """The forward-proxy listener, served by the gateway's runner (and its handler)."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, *, reuse_port: bool | None = None
    ) -> None:
        super().__init__(runner)
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self.port = port  # the bound port once started (port 0 picks one)

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self.port))

    async def start(self) -> None:
        await super().start()
        runner = self._runner
        assert isinstance(runner, web.AppRunner)
        app = runner.app
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: FrontDoor(runner, app),
            self._host,
            self._port,
            reuse_address=True,
            reuse_port=self._reuse_port,
        )
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
