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

from gateway.cooldown import retry_after_s
from gateway.errors import PayloadTooLarge, WalletError
from gateway.inject import redact_bytes, response_headers, response_reason
from gateway.scrub import Scrubber
from gateway.secret import Secret
from gateway.upstream import SESSION, upstream_errors

log = structlog.get_logger(__name__)

NO_BODY_STATUSES: Final = frozenset({204, 304})
# Bodies up to this size with a Content-Length are relayed whole (see `_whole_body`).
WHOLE_BODY_BYTES: Final = 64 * 1024
# Upstream answers that say "not with this key": another key may be tried. 429: rate or quota,
# the key rests; 401: the key is not valid (any more), it is marked invalid.
RATE_LIMITED: Final = 429
INVALID_KEY: Final = 401
REFUSALS: Final = frozenset({RATE_LIMITED, INVALID_KEY})


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

    async def read_all(self) -> bytes:
        """The whole body, under the same limits (kept for replay on failover)."""
        try:
            return b"".join([chunk async for chunk in self.chunks()])
        except TimeoutError:
            assert self.failure is not None
            raise self.failure from None


@dataclass(frozen=True)
class Refusal:
    """The upstream refused the key before anything was relayed, for rate or quota reasons
    (429) or as invalid (401): the caller may try another key."""

    status: int
    retry_after_s: float


@dataclass(frozen=True)
class Outbound:
    service: str
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes | AsyncIterator[bytes] | None
    key: Secret[str]
    forms: tuple[str, ...]  # the key as the upstream may echo it (inject.key_forms)
    extra_headers: dict[str, str]


@dataclass
class Timing:
    """When each step happened (loop time), and how much body went back to the client."""

    upstream_started: float = 0.0
    upstream_headers: float = 0.0
    client_prepared: float = 0.0
    bytes_out: int = 0


async def stream(
    request: web.Request,
    out: Outbound,
    guard: BodyGuard | None,
    timing: Timing,
    refusable: bool = False,
) -> web.StreamResponse | Refusal:
    """Forward `out` and relay the answer. With `refusable`, an upstream 429 is not relayed
    but returned as a Refusal (its body read and dropped), for the caller to fail over."""
    session = request.app[SESSION]
    loop = asyncio.get_running_loop()
    timing.upstream_started = loop.time()
    try:
        with upstream_errors(out.service):
            async with session.request(
                out.method, out.url, headers=out.headers, data=out.body, allow_redirects=False
            ) as upstream:
                timing.upstream_headers = loop.time()
                if refusable and upstream.status in REFUSALS:
                    await _drain(upstream)
                    return Refusal(upstream.status, retry_after_s(upstream.headers))
                headers = response_headers(upstream.headers, out.forms)
                headers.update(out.extra_headers)
                reason = response_reason(upstream.reason, out.forms)
                if _whole_body(out.method, upstream):
                    body = redact_bytes(await upstream.read(), out.forms)
                    timing.client_prepared = loop.time()
                    timing.bytes_out = len(body)
                    return web.Response(
                        status=upstream.status, reason=reason, headers=headers, body=body
                    )
                response = web.StreamResponse(
                    status=upstream.status, reason=reason, headers=headers
                )
                await response.prepare(request)
                timing.client_prepared = loop.time()
                if out.method != "HEAD" and upstream.status not in NO_BODY_STATUSES:
                    await _relay_or_abort(request, upstream, response, out, timing)
                return response
    except WalletError:
        if guard is not None and guard.failure is not None:
            raise guard.failure from None
        raise


async def _drain(upstream: aiohttp.ClientResponse) -> None:
    """Read and drop a refusal's body (bounded), so the connection can be reused."""
    read = 0
    async for chunk in upstream.content.iter_any():
        read += len(chunk)
        if read > WHOLE_BODY_BYTES:
            upstream.close()
            return


def _whole_body(method: str, upstream: aiohttp.ClientResponse) -> bool:
    """A small body of known length, not compressed: read it whole and answer in one write
    with its exact length (a streamed answer costs a chunked body and several writes). An
    upstream that breaks off mid-body then gets a clean 502 instead of a truncated 200."""
    length = upstream.content_length
    return (
        method != "HEAD"
        and upstream.status not in NO_BODY_STATUSES
        and length is not None
        and length <= WHOLE_BODY_BYTES
        and "Content-Encoding" not in upstream.headers
    )


async def _relay_or_abort(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    out: Outbound,
    timing: Timing,
) -> None:
    """Once the status line is sent an error can't be reported in-band: on a failure of
    either side, cut the client connection so it sees a truncated body, not a complete one.
    Leaving the `async with` then closes the upstream request."""
    try:
        await _relay(upstream, response, Scrubber(out.key.reveal(), out.forms), timing)
        await response.write_eof()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.warning("stream_aborted", service=out.service, error=type(exc).__name__)
        if request.transport is not None:
            request.transport.close()


async def _relay(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    scrubber: Scrubber,
    timing: Timing,
) -> None:
    async for chunk in upstream.content.iter_any():
        cleaned = scrubber.feed(chunk)
        if cleaned:
            timing.bytes_out += len(cleaned)
            await response.write(cleaned)
    rest = scrubber.flush()
    if rest:
        timing.bytes_out += len(rest)
        await response.write(rest)
