"""The proxy handler: `/{service}/{path}` on the gateway, as a pipeline of named steps.

match → authenticate → pick key → inject → forward → account. Each step lives in the module
named for it; this one only wires them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import routing, wsrelay
from gateway.appkeys import CALLERS, CATALOG, KEYPOOL, METRICS, QUOTAS, SETTINGS
from gateway.callers import Caller
from gateway.errors import NoKey, NotFound, PayloadTooLarge, QuotaExhausted, WalletError
from gateway.forward import BodyGuard, Outbound, Timing, stream
from gateway.inject import AuthSlot, find_token, key_forms, upstream_headers, upstream_query
from gateway.quota import Limit
from gateway.selection import UsableKey, allowed
from gateway.services import RESERVED_SLUGS, Service

UNKNOWN_SERVICE: Final = "unknown"


@dataclass(frozen=True)
class Inbound:
    """A request to forward, from the reverse-proxy path or the `/proxy` envelope."""

    service: str
    method: str
    path: str  # raw, percent-encoded, after the service slug
    query: str  # raw query string
    headers: CIMultiDictProxy[str] | CIMultiDict[str]
    body: bytes | None
    stream_body: bool = False  # forward the client's own request body as it arrives


async def reverse(request: web.Request) -> web.StreamResponse:
    """`/{service}/{upstream path}?{query}`."""
    target = routing.split(request.rel_url.raw_path)
    if target is None:
        raise NotFound("no such route")
    if target.service in RESERVED_SLUGS:
        _own_route(request)
    inbound = Inbound(
        target.service,
        request.method,
        target.path,
        request.rel_url.raw_query_string,
        request.headers,
        None,
        stream_body=True,
    )
    return await forward(request, inbound)


def _own_route(request: web.Request) -> None:
    """A gateway path (`/monitoring/...`, `/proxy`) with the wrong method: 405, as for any
    route; an unknown one under a reserved prefix: 404."""
    allowed = {
        route.method
        for route in request.app.router.routes()
        if route.resource is not None
        and route.method != "*"
        and route.resource.canonical == request.path
    }
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise NotFound("no such route")


async def forward(request: web.Request, inbound: Inbound) -> web.StreamResponse:
    app = request.app
    timing = Timing()
    started = asyncio.get_running_loop().time()
    label = UNKNOWN_SERVICE  # a metric label: only a known slug, never what the client sent
    try:
        service = await app[CATALOG].get(inbound.service)
        label = service.slug
        slot = AuthSlot(service.auth_type, service.auth_name)
        query = parse_qsl(inbound.query, keep_blank_values=True)
        caller = await app[CALLERS].authenticate(find_token(inbound.headers, query, slot), label)
        key = await pick_key(request, service, caller)
        outbound, guard = build_outbound(request, inbound, service, slot, key)
        if inbound.stream_body and wsrelay.is_upgrade(request):
            response = await wsrelay.relay(request, outbound, timing)
        else:
            response = await stream(request, outbound, guard, timing)
    except WalletError as exc:
        count(request, label, exc.status)
        raise
    account(request, label, response, started, timing)
    return response


async def pick_key(request: web.Request, service: Service, caller: Caller) -> UsableKey:
    """The best key the caller may use that has quota left, charged for this request."""
    app = request.app
    usable = allowed(
        await app[KEYPOOL].usable(service.slug), caller.owner_id, caller.owner_is_admin
    )
    if not usable:
        raise NoKey(service.slug)
    if usable[0].quota is None:  # nothing to count: no Redis round trip
        return usable[0]
    limits = [Limit(k.id, k.quota, k.period) for k in usable]
    reservation = await app[QUOTAS].reserve(service.slug, limits)
    if reservation.index is None:
        raise QuotaExhausted(service.slug, reservation.retry_after_s)
    return usable[reservation.index]


def build_outbound(
    request: web.Request, inbound: Inbound, service: Service, slot: AuthSlot, key: UsableKey
) -> tuple[Outbound, BodyGuard | None]:
    settings = request.app[SETTINGS]
    url = routing.upstream_url(
        service.base_url, inbound.path, upstream_query(inbound.query, slot, key.secret)
    )
    headers = upstream_headers(inbound.headers, slot, key.secret)
    guard = None
    body: bytes | AsyncIterator[bytes] | None = inbound.body
    if inbound.stream_body and request.body_exists:
        limit = settings.gateway_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        guard = BodyGuard(request, limit, settings.client_idle_timeout_s)
        body = guard.chunks()
    outbound = Outbound(
        service=service.slug,
        method=inbound.method,
        url=url,
        headers=headers,
        body=body,
        key=key.secret,
        forms=key.forms or key_forms(key.secret.reveal()),
        extra_headers={"X-Wallet-Key-Id": key.id, "X-Wallet-Fallbacks": "0"},
    )
    return outbound, guard


def count(request: web.Request, service: str, status: int) -> None:
    request.app[METRICS].proxied.inc({"service": service, "status": f"{status // 100}xx"})


def account(
    request: web.Request,
    service: str,
    response: web.StreamResponse,
    started: float,
    timing: Timing,
) -> None:
    count(request, service, response.status)
    metrics = request.app[METRICS]
    labels = {"service": service}
    if timing.upstream_headers:
        metrics.upstream_latency.observe(labels, timing.upstream_headers - timing.upstream_started)
        overhead = (timing.upstream_started - started) + (
            timing.client_prepared - timing.upstream_headers
        )
        metrics.overhead.observe(labels, max(overhead, 0.0))
