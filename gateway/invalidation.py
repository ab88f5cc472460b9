"""Cache invalidation across processes: the admin app publishes what changed on a Redis
channel; every gateway process drops the matching cache entries within a moment.

Messages are hints, never data: `{"kind": "token"|"user"|"key"|"service", "id": "..."}`;
`cooldown` carries `"<key id> <until epoch>"` (gateway/cooldown.py).
A subscriber that (re)connects clears everything, since it may have missed messages; the
caches' short TTLs bound staleness if Redis is unreachable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Final, Literal

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway import rkeys

log = structlog.get_logger(__name__)

Kind = Literal["token", "user", "key", "service", "cooldown", "ca"]
RECONNECT_DELAY_S: Final = 0.5
Listener = Callable[[str, str | None], None]


async def publish(redis: Redis, kind: Kind, target_id: str | None = None) -> None:
    """Tell every gateway process that `kind` `target_id` changed (best effort)."""
    try:
        await redis.publish(
            rkeys.invalidation_channel(), json.dumps({"kind": kind, "id": target_id})
        )
    except RedisError as exc:
        log.warning("invalidation_not_published", kind=kind, error=type(exc).__name__)


async def listen(
    redis: Redis,
    on_message: Listener,
    on_reset: Callable[[], None],
    ready: asyncio.Event | None = None,
) -> None:
    """Forward invalidations until cancelled, resubscribing after any Redis failure."""
    while True:
        try:
            async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(rkeys.invalidation_channel())
                on_reset()
                if ready is not None:
                    ready.set()
                async for message in pubsub.listen():
                    _dispatch(message.get("data"), on_message)
        except (RedisError, OSError) as exc:
            log.warning("invalidation_listener_reconnecting", error=type(exc).__name__)
            await asyncio.sleep(RECONNECT_DELAY_S)


def _dispatch(data: object, on_message: Listener) -> None:
    try:
        body = json.loads(data) if isinstance(data, bytes | str) else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
        return
    target = body.get("id")
    on_message(body["kind"], target if isinstance(target, str) else None)
