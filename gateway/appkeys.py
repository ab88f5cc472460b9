"""Typed application state keys for both apps, declared in one place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import asyncpg
from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.callers import Callers
from gateway.catalog import Catalog
from gateway.cooldown import Cooldowns, Pressure
from gateway.keypool import KeyPool
from gateway.limits import Limits
from gateway.metrics import Metrics
from gateway.quota import Quotas
from gateway.selection import Stickiness
from gateway.settings import Settings
from gateway.vault import Vault

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
REDIS = web.AppKey[Redis | RedisCluster]("redis")  # RedisCluster when REDIS_CLUSTER
VAULT = web.AppKey("vault", Vault)
METRICS = web.AppKey("metrics", Metrics)
APP_NAME = web.AppKey("app_name", str)
CATALOG = web.AppKey("catalog", Catalog)
CALLERS = web.AppKey("callers", Callers)
KEYPOOL = web.AppKey("keypool", KeyPool)
QUOTAS = web.AppKey("quotas", Quotas)
LIMITS = web.AppKey("limits", Limits)
COOLDOWNS = web.AppKey("cooldowns", Cooldowns)
PRESSURE = web.AppKey("pressure", Pressure)
STICKY = web.AppKey("sticky", Stickiness)
# Gateway started with `--workers N`: the other workers' local sockets, for merged metrics.
SIBLINGS = web.AppKey("siblings", tuple[Path, ...])
# An app with HTML pages (the admin console) renders its own errors for the requests it
# claims: the renderer returns None for requests that get the one JSON shape.
ERROR_PAGE = web.AppKey[Callable[[web.Request, int, str, str], web.Response | None]]("error_page")
