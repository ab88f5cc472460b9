"""Cleanup contexts for the resources both apps share, registered in dependency order:
pool → Redis → vault (whose canary check needs the pool)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import structlog
from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster

from gateway import canary, db
from gateway.appkeys import POOL, REDIS, SETTINGS, VAULT
from gateway.vault import Vault

log = structlog.get_logger(__name__)

REDIS_MAX_CONNECTIONS: Final = 256
REDIS_TIMEOUT_S: Final = 5.0


async def pool_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert settings.database_url is not None, "DATABASE_URL is resolved before the app starts"
    app[POOL] = pool = await db.create_pool(settings.database_url)
    yield
    await pool.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    assert settings.redis_url is not None, "REDIS_URL is resolved before the app starts"
    client: Redis | RedisCluster
    if settings.redis_cluster:
        # Discovers the other nodes on its first command (so a Redis outage does not block
        # startup, as with one server) and routes each command by its key's slot. Its pool is
        # per node and does not block: past REDIS_MAX_CONNECTIONS concurrent commands on one
        # node a command fails as Redis being unavailable. Only the admin app and the
        # gateway's rarer commands use it; the hot path has gateway/hotredis.py.
        client = RedisCluster.from_url(
            settings.redis_url.reveal(),
            max_connections=REDIS_MAX_CONNECTIONS,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=30,
        )
    else:
        # A blocking pool: past REDIS_MAX_CONNECTIONS concurrent commands, a request waits
        # for a free connection (up to the socket timeout) instead of failing with "too many".
        pool = BlockingConnectionPool.from_url(
            settings.redis_url.reveal(),
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            health_check_interval=30,
        )
        client = Redis.from_pool(pool)  # the client owns (and closes) the pool
    app[REDIS] = client
    yield
    await client.aclose()


async def vault_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[VAULT] = vault = Vault(settings.encryption_key, settings.encryption_keys_previous)
    async with app[POOL].acquire() as conn:
        await canary.unseal(conn, vault)
    if not vault.unsealed:
        log.error(
            "vault_sealed_at_startup",
            hint="restart with the right ENCRYPTION_KEY; nothing will be decrypted",
        )
    yield


def install(app: web.Application) -> None:
    app.cleanup_ctx.extend((pool_ctx, redis_ctx, vault_ctx))
