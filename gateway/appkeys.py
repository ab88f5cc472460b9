"""Typed application state keys for both apps, declared in one place."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.vault import Vault

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
REDIS = web.AppKey("redis", Redis)
VAULT = web.AppKey("vault", Vault)
METRICS = web.AppKey("metrics", Metrics)
APP_NAME = web.AppKey("app_name", str)
