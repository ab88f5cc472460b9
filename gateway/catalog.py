"""The gateway's in-memory copy of the service catalog, reloaded in the background on a timer
and at once after an invalidation, so matching a request does not touch PostgreSQL (except
the first request after an admin changed a service)."""

from __future__ import annotations

import asyncio
from typing import Final

import structlog

from gateway import services
from gateway.db import DB_ERRORS, Pool
from gateway.errors import UnknownService
from gateway.services import Service

REFRESH_S: Final = 30.0
MAX_SERVICES: Final = 10_000


log = structlog.get_logger(__name__)


class Catalog:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._by_slug: dict[str, Service] = {}
        self._fresh = False
        self._generation = 0  # bumped by every invalidation

    async def refresh(self) -> None:
        generation = self._generation
        async with self._pool.acquire() as conn:
            items, _ = await services.list_services(conn, MAX_SERVICES, 0)
        self._by_slug = {s.slug: s for s in items}
        # A change announced while this load ran may be missing from it: load again next time.
        self._fresh = generation == self._generation

    def invalidate(self) -> None:
        self._generation += 1
        self._fresh = False

    async def keep_fresh(self) -> None:
        """Background: reload every REFRESH_S; while PostgreSQL is down the last good copy
        keeps serving."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except DB_ERRORS as exc:
                log.warning("catalog_refresh_failed", error=type(exc).__name__)

    async def get(self, slug: str) -> Service:
        if not self._fresh:
            await self.refresh()
        service = self._by_slug.get(slug)
        if service is None:
            raise UnknownService(slug)
        return service
