"""Cache invalidation across processes: the admin app publishes what changed on a Redis
channel; every gateway process drops the matching cache entries within a moment.

Messages are hints, never data: `{"kind": "token"|"user"|"key"|"service", "id": "..."}`;
`cooldown` carries `"<key id> <until epoch>"` (gateway/cooldown.py).
A subscriber that (re)connects clears everything, since it may have missed messages; the
caches' short TTLs bound staleness if Redis is unreachable.

On Redis Cluster the channel is a classic one (PUBLISH, not the sharded SPUBLISH): Redis
Cluster delivers a PUBLISH made on any node to the subscribers of every node, so the
listener subscribes on one node of its choosing over a plain connection (see _subscriber).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Final, Literal

import structlog
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from gateway import rkeys
from gateway.errors import REDIS_DOWN

log = structlog.get_logger(__name__)

Kind = Literal["token", "user", "key", "service", "cooldown", "ca"]
RECONNECT_DELAY_S: Final = 0.5
Listener = Callable[[str, str | None], None]


async def publish(redis: Redis | RedisCluster, kind: Kind, target_id: str | None = None) -> None:
    """Tell every gateway process that `kind` `target_id` changed (best effort)."""
    try:
        await redis.publish(
            rkeys.invalidation_channel(), json.dumps({"kind": kind, "id": target_id})
        )
    except (*REDIS_DOWN, RedisError) as exc:
        log.warning("invalidation_not_published", kind=kind, error=type(exc).__name__)


async def listen(
    redis: Redis | RedisCluster,
    on_message: Listener,
    on_reset: Callable[[], None],
    ready: asyncio.Event | None = None,
) -> None:
    """Forward invalidations until cancelled, resubscribing after any Redis failure."""
    attempt = 0
    while True:
        subscriber: Redis | None = None
        try:
            subscriber = redis if isinstance(redis, Redis) else await _subscriber(redis, attempt)
            async with subscriber.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(rkeys.invalidation_channel())
                on_reset()
                if ready is not None:
                    ready.set()
                async for message in pubsub.listen():
                    _dispatch(message.get("data"), on_message)
        except (*REDIS_DOWN, RedisError, OSError) as exc:
            log.warning("invalidation_listener_reconnecting", error=type(exc).__name__)
            attempt += 1
            await asyncio.sleep(RECONNECT_DELAY_S)
        finally:
            if subscriber is not None and subscriber is not redis:
                await subscriber.aclose()


async def _subscriber(cluster: RedisCluster, attempt: int) -> Redis:
    """A plain client of one of the cluster's primaries, the next one at each attempt (a node
    that went away is not tried forever). Not the cluster client's own pubsub(): redis-py
    has it only from 8.0 on, for sharded channels first, and a classic subscription needs no
    routing, only one live node."""
    if not cluster.get_primaries():
        await cluster.initialize()  # the first command discovers the nodes; none ran yet
    nodes = cluster.get_primaries()
    if not nodes:
        raise RedisError("the Redis Cluster has no primary")
    node = nodes[attempt % len(nodes)]
    # Connections made exactly as the cluster client makes its own to that node (address,
    # credentials, TLS, timeouts).
    pool = ConnectionPool(
        connection_class=node.connection_class, max_connections=1, **node.connection_kwargs
    )
    return Redis.from_pool(pool)


def _dispatch(data: object, on_message: Listener) -> None:
    try:
        body = json.loads(data) if isinstance(data, bytes | str) else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
        return
    target = body.get("id")
    on_message(body["kind"], target if isinstance(target, str) else None)
