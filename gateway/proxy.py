"""The proxy handler: `/{service}/{path}` on the gateway, as a pipeline of named steps.

match → authenticate → pick key → inject → forward → account. Each step lives in the module
named for it; this one only wires them together.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator, Set
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Final
from urllib.parse import parse_qsl

import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import costs, invalidation, keys, routing, signals, tasks, wsrelay
from gateway.appkeys import (
    CALLERS,
    CATALOG,
    COOLDOWNS,
    KEYPOOL,
    LIMITS,
    METRICS,
    POOL,
    PRESSURE,
    QUOTAS,
    REDIS,
    SETTINGS,
    STICKY,
)
from gateway.callers import Caller
from gateway.costs import CostModel, Meter
from gateway.errors import (
    KeysBusy,
    KeysResting,
    NoKey,
    NotFound,
    PayloadTooLarge,
    QuotaExhausted,
    WalletError,
)
from gateway.forward import BodyGuard, Outbound, Refusal, Timing, stream
from gateway.inject import (
    AuthSlot,
    auth_slot,
    find_token,
    key_forms,
    upstream_headers,
    upstream_query,
)
from gateway.limits import Admitted, BudgetExceeded, Plan, RateLimited, nano
from gateway.metrics import status_class
from gateway.middleware import REDIS_DOWN, SERVICE
from gateway.quota import Lease, Limit, Quotas, lease_s, new_lease_id
from gateway.secret import Secret
from gateway.selection import LOCAL_STRATEGIES, UsableKey, allowed, arrange
from gateway.services import RESERVED_SLUGS, Service
from gateway.signals import Signal, Verdict
from gateway.usage import USAGE

log = structlog.get_logger(__name__)

UNKNOWN_SERVICE: Final = "unknown"
SESSION_HEADER: Final = "X-Wallet-Session"  # see selection.Stickiness
# Concurrency slots (metadata.maxConcurrency) the request holds: released when it is over.
LEASES: Final = web.RequestKey("wallet_leases", list[Lease])
RATE_HEADERS: Final = web.RequestKey("wallet_rate_headers", dict[str, str])
# The window counter the request's key reservation charged (given back if refused).
CHARGED: Final = web.RequestKey("wallet_charged", str)
CLIENT_GONE: Final = 499  # the status recorded for a request its client abandoned (nginx's)
# A body up to this size is read before forwarding, so that it can go to another key.
FAILOVER_BODY_BYTES: Final = 1024 * 1024
ZERO: Final = Decimal(0)


@dataclass(frozen=True)
class Inbound:
    """A request to forward, from the reverse-proxy path, the `/proxy` envelope, or a
    forward-proxy tunnel (gateway/fwdproxy.py)."""

    service: str
    method: str
    path: str  # raw, percent-encoded, after the service slug
    query: str  # raw query string
    headers: CIMultiDictProxy[str] | CIMultiDict[str]
    body: bytes | None
    stream_body: bool = False  # forward the client's own request body as it arrives
    # Forward proxy: the token of the tunnel's CONNECT (used when the request has none).
    token: Secret[str] | None = field(default=None, repr=False)
    mode: str = "reverse"  # which listener took the request: "reverse" or "forward"
    base_url: str | None = None  # forward proxy: another host the service claims


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


@dataclass
class Trace:
    """What a request used, for its usage record: filled in as the pipeline learns it."""

    caller: Caller | None = None
    key_id: str | None = None
    fallbacks: int = 0
    costs: CostModel | None = None
    admitted: Admitted | None = None  # by the client limits: its hold is settled at the end
    meter: Meter | None = None  # the last attempt's answer, for a token-priced cost


TRACE: Final = web.RequestKey("wallet_trace", Trace)


async def forward(request: web.Request, inbound: Inbound) -> web.StreamResponse:
    app = request.app
    timing = Timing()
    trace = Trace()
    started = asyncio.get_running_loop().time()
    label = UNKNOWN_SERVICE  # a metric label: only a known slug, never what the client sent
    try:
        # The caches answer most requests without waiting (`peek`, `cached`).
        catalog = app[CATALOG]
        service = catalog.peek(inbound.service) or await catalog.get(inbound.service)
        label = request[SERVICE] = service.slug
        if inbound.base_url is not None:
            service = replace(service, base_url=inbound.base_url)
        slot = auth_slot(service.auth_type, service.auth_name)
        token = find_token(inbound.headers, _query_pairs(inbound.query), slot) or inbound.token
        callers = app[CALLERS]
        caller = callers.cached(token, label) or await callers.authenticate(token, label)
        trace.caller = caller
        trace.costs = costs.model_of(service.slug, service.cost_model)
        request[TRACE] = trace
        plan = admission(request, caller, trace.costs)
        if inbound.stream_body and wsrelay.is_upgrade(request):
            key, _ = await (
                pick_key(request, service, caller)
                if plan is None
                else first_pick(request, service, caller, trace, plan)
            )
            trace.key_id = key.id
            outbound, _ = build_outbound(request, inbound, service, slot, key)
            response = await wsrelay.relay(request, outbound, timing)
        else:
            response = await _with_failover(
                request, inbound, service, slot, caller, timing, trace, plan
            )
    except WalletError as exc:
        count(request, label, exc.status, inbound.mode)
        if label != UNKNOWN_SERVICE:
            settle(request, trace, label, exc.status, timing)
            record(request, inbound, label, exc.status, started, timing, trace, ZERO)
        raise
    except BaseException:  # the client went away (the handler is cancelled), or a bug
        if label != UNKNOWN_SERVICE:
            count(request, label, CLIENT_GONE, inbound.mode)
            cost = settle(request, trace, label, CLIENT_GONE, timing)
            record(request, inbound, label, CLIENT_GONE, started, timing, trace, cost)
        raise
    finally:
        release_leases(request)  # the upstream exchange is over, however it ended
    account(request, label, response, started, timing, inbound.mode)
    cost = settle(request, trace, label, response.status, timing)
    record(request, inbound, label, response.status, started, timing, trace, cost)
    return response


def _query_pairs(raw: str) -> Iterator[tuple[str, str]]:
    """The query's parameters, parsed only if asked for (a token in a header is found first)."""
    yield from parse_qsl(raw, keep_blank_values=True)


def admission(request: web.Request, caller: Caller, model: CostModel | None) -> Plan | None:
    """What the client limits (gateway/limits.py) must check for this request: the token's
    rate limit and the budgets it draws on; None when there is nothing to check."""
    rate = request.app[LIMITS].rate_limit(caller.tier, caller.rate_limit)
    budgeted = model is not None and (caller.token_budget or caller.user_budget) is not None
    if rate is None and not budgeted:
        return None
    return Plan(
        caller.owner_id,
        caller.token_id,
        rate,
        caller.rate_limit is not None,
        model.hold if model is not None else Decimal(0),
        caller.token_budget if budgeted else None,
        caller.user_budget if budgeted else None,
    )


async def admit(request: web.Request, service: str, plan: Plan) -> Admitted | None:
    """One Redis script call. While Redis is down a rate limit alone fails open
    (RATE_LIMITS_FAIL_OPEN) and a budget fails closed."""
    app = request.app
    try:
        admitted = await app[LIMITS].admit(plan)
    except (RateLimited, BudgetExceeded):
        app[METRICS].client_limited.inc({"service": service})
        raise
    except REDIS_DOWN:
        budgeted = plan.token_budget is not None or plan.user_budget is not None
        if budgeted or not app[SETTINGS].rate_limits_fail_open:
            raise
        log.warning("rate_limit_skipped_redis_down", service=service)
        return None
    request[RATE_HEADERS] = admitted.headers
    return admitted


async def first_pick(
    request: web.Request,
    service: Service,
    caller: Caller,
    trace: Trace,
    plan: Plan,
) -> tuple[UsableKey, bool]:
    """The client limits' check and the first key's reservation, sent together: one Redis
    round trip for both. Whichever refuses, the other's charge is given back (a key's quota
    charge, a budget's hold), so a refused request spends nothing."""
    admitted, picked = await asyncio.gather(
        admit(request, service.slug, plan), pick_key(request, service, caller),
        return_exceptions=True,
    )  # fmt: skip
    if isinstance(admitted, BaseException):
        counter = request.get(CHARGED)
        if counter is not None and not isinstance(picked, BaseException):
            tasks.spawn(request.app, "refund-quota", _refund(request.app, counter))
        raise admitted
    trace.admitted = admitted  # settled when the request ends, however it ends
    if isinstance(picked, BaseException):
        raise picked
    return picked


async def _refund(app: web.Application, counter: str) -> None:
    try:
        await app[QUOTAS].refund(counter)
    except REDIS_DOWN as exc:
        log.warning("quota_refund_failed", error=type(exc).__name__)


def settle(
    request: web.Request, trace: Trace, service: str, status: int, timing: Timing
) -> Decimal:
    """The request's cost by its service's cost model, counted in metrics, and its budget
    hold corrected to it in the background. Nothing when the upstream was not called or
    answered with an error; the hold when what it cost cannot be known: a token-priced answer
    without `usage`, or a client that went away after the upstream was called."""
    model = trace.costs
    cost = ZERO
    if model is not None and timing.upstream_started:
        if status == CLIENT_GONE:
            cost = model.hold
        elif status < costs.SUCCESS_BELOW:
            usage = trace.meter.usage() if trace.meter is not None else None
            cost = model.cost(usage) if usage or not model.metered else model.unknown
        if cost:
            request.app[METRICS].cost.add({"service": service}, float(cost))
    admitted, trace.admitted = trace.admitted, None  # settled once
    if admitted is not None and admitted.spend_keys and nano(cost) != admitted.charged:
        tasks.spawn(request.app, "settle-budget", _settle(request.app, admitted, cost))
    return cost


async def _settle(app: web.Application, admitted: Admitted, cost: Decimal) -> None:
    try:
        await app[LIMITS].settle(admitted, cost)
    except REDIS_DOWN as exc:
        log.warning("budget_settle_failed", error=type(exc).__name__)


def record(
    request: web.Request,
    inbound: Inbound,
    service: str,
    status: int,
    started: float,
    timing: Timing,
    trace: Trace,
    cost: Decimal,
) -> None:
    """One usage record per request for a known service (an append to the writer's buffer)."""
    caller = trace.caller
    bytes_in = len(inbound.body) if inbound.body is not None else request.content_length or 0
    request.app[USAGE].take(
        service,
        trace.key_id,
        caller.token_id if caller else None,
        caller.owner_id if caller else None,
        status,
        (asyncio.get_running_loop().time() - started) * 1000,
        bytes_in,
        timing.bytes_out,
        cost,
        trace.fallbacks,
        inbound.mode,
    )


async def _replayable(request: web.Request, inbound: Inbound) -> Inbound:
    """`inbound` with its body in hand when it is small enough to send again to another key
    (FAILOVER_BODY_BYTES); a larger or chunked body stays streamed and is never retried."""
    if not inbound.stream_body:
        return inbound
    if not request.body_exists:
        return replace(inbound, stream_body=False)
    length = request.content_length
    if length is None or length > FAILOVER_BODY_BYTES:
        return inbound
    settings = request.app[SETTINGS]
    guard = BodyGuard(request, settings.gateway_max_body_bytes, settings.client_idle_timeout_s)
    return replace(inbound, body=await guard.read_all(), stream_body=False)


async def _with_failover(
    request: web.Request,
    inbound: Inbound,
    service: Service,
    slot: AuthSlot,
    caller: Caller,
    timing: Timing,
    trace: Trace,
    plan: Plan | None,
) -> web.StreamResponse:
    """Try the best key; when its upstream refuses it (rate, quota, invalid, or denied: see
    gateway/signals.py) before any byte has gone to the client, bench it and try the next, as
    long as the body can be sent again. The answer says which key served it and how many were
    refused first. A key the caller has no alternative to is benched too, and its refusal
    relayed."""
    app = request.app
    tried: set[str] = set()
    while True:
        if tried or plan is None:  # no client limit to check along with the first pick
            key, alternatives = await pick_key(request, service, caller, tried)
        else:
            key, alternatives = await first_pick(request, service, caller, trace, plan)
        trace.key_id, trace.fallbacks = key.id, len(tried)
        if alternatives and inbound.stream_body:  # worth keeping the body for a second try
            inbound = await _replayable(request, inbound)
        outbound, guard = build_outbound(request, inbound, service, slot, key, len(tried))
        refusable = alternatives and not inbound.stream_body
        result = await stream(request, outbound, guard, timing, refusable)
        if isinstance(result, Refusal):
            release_leases(request, key.id)  # its slot, before trying the next key
            await _refused(request, service, key, result.status, result.verdict)
            tried.add(key.id)
            app[METRICS].fallbacks.inc({"service": service.slug})
            continue
        if timing.verdict.benches:  # relayed as is (no other key), but the key is benched
            await _refused(request, service, key, result.status, timing.verdict)
        app[PRESSURE].note(key.id, result.headers)
        return result


async def _refused(
    request: web.Request, service: Service, key: UsableKey, status: int, verdict: Verdict
) -> None:
    """Rate or quota rests the key (signals.rest_s: as the upstream asked, else until its
    quota window ends, else a default); invalid rests it too (at once, everywhere) and marks
    it invalid in the database in the background, which takes it out of every key pool.
    Denied leaves it be: it may serve other calls."""
    if not verdict.benches:
        log.info("key_denied", service=service.slug, key_id=key.id, upstream_status=status)
        return
    app = request.app
    seconds = signals.rest_s(verdict, key.period if key.quota is not None else None)
    reason = verdict.signal.value
    if verdict.signal is Signal.INVALID_KEY:
        log.warning("key_rejected_as_invalid", service=service.slug, key_id=key.id)
        tasks.spawn(app, "mark-key-invalid", _mark_invalid(app, key.id, status))
    else:
        log.info(
            "key_cooling_down",
            service=service.slug,
            key_id=key.id,
            reason=reason,
            seconds=round(seconds, 3),
        )
    app[METRICS].cooldowns.inc({"service": service.slug, "reason": reason})
    await app[COOLDOWNS].rest(key.id, seconds)


async def _mark_invalid(app: web.Application, key_id: str, status: int) -> None:
    async with app[POOL].acquire() as conn:
        marked = await keys.mark_invalid(conn, key_id, status)
    if marked:
        await invalidation.publish(app[REDIS], "key", key_id)


async def pick_key(
    request: web.Request, service: Service, caller: Caller, tried: Set[str] = frozenset()
) -> tuple[UsableKey, bool]:
    """The best key the caller may use that is not resting, not already tried and has quota
    left, charged for this request; and whether another candidate remains after it."""
    app = request.app
    keypool = app[KEYPOOL]
    keys = keypool.peek(service.slug)
    if keys is None:
        keys = await keypool.usable(service.slug)
    mine = allowed(keys, caller.owner_id, caller.owner_is_admin)
    if not mine:
        raise NoKey(service.slug)
    cooldowns = app[COOLDOWNS]
    usable: list[UsableKey] = []
    waits: list[float] = []  # the resting keys' rests
    for k in mine:
        rest = cooldowns.resting(k.id)
        if rest:
            waits.append(rest)
        elif k.id not in tried:
            usable.append(k)
    if not usable:
        raise KeysResting(service.slug, math.ceil(min(waits)) if waits else 1)
    session = request.headers.get(SESSION_HEADER)
    sticky = app[STICKY]
    pinned = sticky.key_for(session, caller.token_id, service.slug)
    # A key nearly out upstream goes after the others; the session's key first.
    plan = arrange(usable, service.strategy, app[PRESSURE].low, pinned=pinned)
    first = plan.keys[0]
    if (
        service.strategy in LOCAL_STRATEGIES
        and first.quota is None
        and first.max_concurrency is None
    ):  # nothing to count, cap or rotate: no Redis round trip
        index = 0
    else:
        limits = [
            Limit(k.id, k.quota, k.period, k.max_concurrency, group)
            for k, group in zip(plan.keys, plan.groups, strict=True)
        ]
        lease_id = new_lease_id()
        # Held before the call: a request cancelled while the reply is on its way still
        # gives back whatever slot the script took (see Quotas.provisional).
        provisional = Quotas.provisional(service.slug, limits, lease_id)
        held = request.setdefault(LEASES, [])
        held += provisional
        reservation = await app[QUOTAS].reserve(
            service.slug,
            limits,
            strategy=service.strategy,
            lease_seconds=lease_s(app[SETTINGS].upstream_total_timeout_s),
            lease_id=lease_id,
        )
        request[LEASES] = held = [lease for lease in held if lease not in provisional]
        if reservation.counter is not None:
            request[CHARGED] = reservation.counter
        if reservation.lease is not None:
            held.append(reservation.lease)
        if reservation.index is None:
            if reservation.busy:
                raise KeysBusy(service.slug)
            raise QuotaExhausted(service.slug, reservation.retry_after_s)
        index = reservation.index
    key = plan.keys[index]
    sticky.remember(session, caller.token_id, service.slug, key.id)
    return key, index < len(plan.keys) - 1


def release_leases(request: web.Request, key_id: str | None = None) -> None:
    """Give back the concurrency slots the request holds (only `key_id`'s, when given), in
    the background: not on the latency path; a lost release frees itself at lease expiry."""
    held = request.get(LEASES)
    if not held:
        return
    done = [lease for lease in held if key_id is None or lease.key_id == key_id]
    request[LEASES] = [lease for lease in held if lease not in done]
    if done:
        tasks.spawn(request.app, "release-leases", request.app[QUOTAS].release(done))


def build_outbound(
    request: web.Request,
    inbound: Inbound,
    service: Service,
    slot: AuthSlot,
    key: UsableKey,
    fallbacks: int = 0,
) -> tuple[Outbound, BodyGuard | None]:
    url = routing.upstream_url(
        service.base_url, inbound.path, upstream_query(inbound.query, slot, key.secret)
    )
    headers = upstream_headers(inbound.headers, slot, key.secret)
    guard = None
    body: bytes | AsyncIterator[bytes] | None = inbound.body
    if inbound.stream_body and request.body_exists:
        settings = request.app[SETTINGS]
        limit = settings.gateway_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        guard = BodyGuard(request, limit, settings.client_idle_timeout_s)
        body = guard.chunks()
    extra = {"X-Wallet-Key-Id": key.id, "X-Wallet-Fallbacks": str(fallbacks)}
    extra.update(request.get(RATE_HEADERS, ()))
    meter = None
    trace = request.get(TRACE)
    if trace is not None and trace.costs is not None and trace.costs.metered:
        meter = trace.meter = Meter()
    outbound = Outbound(
        service=service.slug,
        method=inbound.method,
        url=url,
        headers=headers,
        body=body,
        key=key.secret,
        forms=key.forms or key_forms(key.secret.reveal()),
        extra_headers=extra,
        meter=meter,
    )
    return outbound, guard


def count(request: web.Request, service: str, status: int, mode: str) -> None:
    request.app[METRICS].proxied.tally((service, status_class(status), mode))


def account(
    request: web.Request,
    service: str,
    response: web.StreamResponse,
    started: float,
    timing: Timing,
    mode: str,
) -> None:
    metrics = request.app[METRICS]
    metrics.proxied.tally((service, status_class(response.status), mode))
    if timing.upstream_headers:
        labels = (service,)
        metrics.upstream_latency.record(labels, timing.upstream_headers - timing.upstream_started)
        overhead = (timing.upstream_started - started) + (
            timing.client_prepared - timing.upstream_headers
        )
        metrics.overhead.record(labels, max(overhead, 0.0))
