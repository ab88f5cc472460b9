"""Forwarding: the only module that moves bytes between a client and an upstream.

Request bodies stream upstream under a size limit and an idle timeout; responses stream back
chunk by chunk (Server-Sent Events included), with any echo of the injected key scrubbed.
Redirects are relayed, never followed. A client that goes away closes the upstream request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import PayloadTooLarge, WalletError
from gateway.inject import response_headers, response_reason
from gateway.scrub import Scrubber
from gateway.secret import Secret
from gateway.upstream import SESSION, upstream_errors

log = structlog.get_logger(__name__)

NO_BODY_STATUSES: Final = frozenset({204, 304})


class ClientTooSlow(WalletError):
    status, code = 408, "request_timeout"


@dataclass
class BodyGuard:
    """Streams a client body upstream, counting bytes; remembers why it stopped early."""

    request: web.Request
    limit: int
    idle_s: float
    failure: WalletError | None = field(default=None)

    async def chunks(self) -> AsyncIterator[bytes]:
        total = 0
        while True:
            try:
                async with asyncio.timeout(self.idle_s):
                    chunk = await self.request.content.readany()
            except TimeoutError:
                self.failure = ClientTooSlow("the request body stopped arriving")
                raise
            if not chunk:
                return
            total += len(chunk)
            if total > self.limit:
                self.failure = PayloadTooLarge(f"request body over {self.limit} bytes")
                raise self.failure
            yield chunk


@dataclass(frozen=True)
class Outbound:
    service: str
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes | AsyncIterator[bytes] | None
    key: Secret[str]
    extra_headers: dict[str, str]


@dataclass
class Timing:
    upstream_started: float = 0.0
    upstream_headers: float = 0.0
    client_prepared: float = 0.0


async def stream(
    request: web.Request, out: Outbound, guard: BodyGuard | None, timing: Timing
) -> web.StreamResponse:
    session = request.app[SESSION]
    loop = asyncio.get_running_loop()
    timing.upstream_started = loop.time()
    try:
        with upstream_errors(out.service):
            async with session.request(
                out.method, out.url, headers=out.headers, data=out.body, allow_redirects=False
            ) as upstream:
                timing.upstream_headers = loop.time()
                headers = response_headers(upstream.headers, out.key)
                headers.update(out.extra_headers)
                response = web.StreamResponse(
                    status=upstream.status,
                    reason=response_reason(upstream.reason, out.key),
                    headers=headers,
                )
                await response.prepare(request)
                timing.client_prepared = loop.time()
                if out.method != "HEAD" and upstream.status not in NO_BODY_STATUSES:
                    await _relay_or_abort(request, upstream, response, out)
                return response
    except WalletError:
        if guard is not None and guard.failure is not None:
            raise guard.failure from None
        raise


async def _relay_or_abort(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    out: Outbound,
) -> None:
    """Once the status line is sent an error can't be reported in-band: on a failure of
    either side, cut the client connection so it sees a truncated body, not a complete one.
    Leaving the `async with` then closes the upstream request."""
    try:
        await _relay(upstream, response, Scrubber(out.key.reveal()))
        await response.write_eof()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.warning("stream_aborted", service=out.service, error=type(exc).__name__)
        if request.transport is not None:
            request.transport.close()


async def _relay(
    upstream: aiohttp.ClientResponse, response: web.StreamResponse, scrubber: Scrubber
) -> None:
    async for chunk in upstream.content.iter_any():
        cleaned = scrubber.feed(chunk)
        if cleaned:
            await response.write(cleaned)
    rest = scrubber.flush()
    if rest:
        await response.write(rest)
