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

import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway import signals
from gateway.costs import Meter
from gateway.errors import PayloadTooLarge, WalletError
from gateway.hothttp import HotResponse, UpstreamError
from gateway.inject import redact_bytes, response_headers, response_reason
from gateway.scrub import Scrubber
from gateway.secret import Secret
from gateway.signals import JUDGE_BODY_BYTES, Verdict
from gateway.upstream import CLIENT, upstream_errors

log = structlog.get_logger(__name__)

NO_BODY_STATUSES: Final = frozenset({204, 304})
# Bodies up to this size with a Content-Length are relayed whole (see `_whole_body`).
WHOLE_BODY_BYTES: Final = 64 * 1024


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
    """The upstream refused the key before anything was relayed (rate, quota, invalid, or
    denied: see gateway/signals.py): the caller may try another key."""

    status: int
    verdict: Verdict


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
    meter: Meter | None = None  # sees the response body, for a cost known only from it


@dataclass
class Timing:
    """When each step happened (loop time), how much body went back to the client, and what
    the relayed answer said about the key (signals.OK unless it was judged otherwise)."""

    upstream_started: float = 0.0
    upstream_headers: float = 0.0
    client_prepared: float = 0.0
    bytes_out: int = 0
    verdict: Verdict = signals.OK


async def stream(
    request: web.Request,
    out: Outbound,
    guard: BodyGuard | None,
    timing: Timing,
    refusable: bool = False,
) -> web.StreamResponse | Refusal:
    """Forward `out` and relay the answer. An error answer (or a 200 of a service that
    reports errors in it) is judged by gateway/signals.py from its status and small body: with
    `refusable`, one that another key may serve is not relayed but returned as a Refusal, for
    the caller to fail over; otherwise it is relayed unchanged and `timing.verdict` says what
    it meant for the key. Other answers are streamed without a look at their body."""
    client = request.app[CLIENT]
    loop = asyncio.get_running_loop()
    timing.upstream_started = loop.time()
    timing.verdict = signals.OK
    try:
        with upstream_errors(out.service):
            async with client.request(out.method, out.url, out.headers, out.body) as upstream:
                timing.upstream_headers = loop.time()
                read: bytes | None = None  # the whole body, when read to judge the answer
                head = b""  # the body's first bytes, when that read stopped short
                if signals.judged(out.service, upstream.status):
                    verdict, read, head = await _judge(out, upstream)
                    if refusable and verdict.fails_over:
                        if head:
                            upstream.close()  # a long body: not worth reading to its end
                        elif read is None:
                            await _drain(upstream)
                        return Refusal(upstream.status, verdict)
                    timing.verdict = verdict
                headers = response_headers(upstream.headers, out.forms)
                headers.update(out.extra_headers)
                reason = response_reason(upstream.reason, out.forms)
                if read is not None or _whole_body(out.method, upstream):
                    whole = read if read is not None else await upstream.read()
                    body = redact_bytes(whole, out.forms)
                    if out.meter is not None:
                        out.meter.feed(body)
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
                    await _relay_or_abort(request, upstream, response, out, timing, head)
                return response
    except WalletError:
        if guard is not None and guard.failure is not None:
            raise guard.failure from None
        raise


async def _judge(out: Outbound, upstream: HotResponse) -> tuple[Verdict, bytes | None, bytes]:
    """The verdict on an answer, with its body when read whole (at most JUDGE_BODY_BYTES,
    decompressed), or the first bytes read when the body turned out longer (then
    judged by status and headers alone, as is a body not worth reading)."""
    status, headers = upstream.status, upstream.headers
    length = upstream.content_length
    if (
        out.method == "HEAD"
        or status in NO_BODY_STATUSES
        or (length is not None and length > JUDGE_BODY_BYTES)
        or not signals.reads_body(out.service, status, headers.get("Content-Type", ""))
    ):
        return signals.classify(out.service, status, headers, None), None, b""
    chunks: list[bytes] = []
    size = 0
    async for chunk in upstream.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > JUDGE_BODY_BYTES:
            return signals.classify(out.service, status, headers, None), None, b"".join(chunks)
    body = b"".join(chunks)
    return signals.classify(out.service, status, headers, body), body, b""


async def _drain(upstream: HotResponse) -> None:
    """Read and drop a refusal's body (bounded), so the connection can be reused."""
    read = 0
    async for chunk in upstream.iter_any():
        read += len(chunk)
        if read > WHOLE_BODY_BYTES:
            upstream.close()
            return


def _whole_body(method: str, upstream: HotResponse) -> bool:
    """A small body of known length, not compressed: read it whole and answer in one write
    with its exact length (a streamed answer costs a chunked body and several writes). An
    upstream that breaks off mid-body then gets a clean 502 instead of a truncated 200."""
    length = upstream.content_length
    return (
        method != "HEAD"
        and upstream.status not in NO_BODY_STATUSES
        and length is not None
        and length <= WHOLE_BODY_BYTES  # None for a body the client decompresses
    )


async def _relay_or_abort(
    request: web.Request,
    upstream: HotResponse,
    response: web.StreamResponse,
    out: Outbound,
    timing: Timing,
    head: bytes = b"",
) -> None:
    """Once the status line is sent an error can't be reported in-band: on a failure of
    either side, cut the client connection so it sees a truncated body, not a complete one.
    Leaving the `async with` then closes the upstream request."""
    try:
        scrubber = Scrubber(out.key.reveal(), out.forms)
        await _relay(upstream, response, scrubber, timing, out.meter, head)
        await response.write_eof()
    except (UpstreamError, OSError, TimeoutError) as exc:
        log.warning("stream_aborted", service=out.service, error=type(exc).__name__)
        if request.transport is not None:
            request.transport.close()


async def _relay(
    upstream: HotResponse,
    response: web.StreamResponse,
    scrubber: Scrubber,
    timing: Timing,
    meter: Meter | None,
    head: bytes = b"",
) -> None:
    # `head`: bytes already read to judge the answer, relayed first (rarely: the common
    # path iterates the upstream directly).
    chunks = _prefixed(head, upstream) if head else upstream.iter_any()
    async for chunk in chunks:
        cleaned = scrubber.feed(chunk)
        if cleaned:
            timing.bytes_out += len(cleaned)
            if meter is not None:
                meter.feed(cleaned)
            await response.write(cleaned)
    rest = scrubber.flush()
    if rest:
        timing.bytes_out += len(rest)
        if meter is not None:
            meter.feed(rest)
        await response.write(rest)


async def _prefixed(head: bytes, upstream: HotResponse) -> AsyncIterator[bytes]:
    yield head
    async for chunk in upstream.iter_any():
        yield chunk
