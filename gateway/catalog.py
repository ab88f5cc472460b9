"""The gateway's in-memory copy of the service catalog, refreshed on invalidation and on a
timer, so matching a request never touches PostgreSQL."""

from __future__ import annotations

import time
from typing import Final

from gateway import services
from gateway.db import Pool
from gateway.errors import UnknownService
from gateway.services import Service

REFRESH_S: Final = 30.0
MAX_SERVICES: Final = 10_000


class Catalog:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._by_slug: dict[str, Service] = {}
        self._loaded_at = 0.0

    async def refresh(self) -> None:
        async with self._pool.acquire() as conn:
            items, _ = await services.list_services(conn, MAX_SERVICES, 0)
        self._by_slug = {s.slug: s for s in items}
        self._loaded_at = time.monotonic()

    def invalidate(self) -> None:
        self._loaded_at = 0.0

    async def get(self, slug: str) -> Service:
        if time.monotonic() - self._loaded_at > REFRESH_S:
            await self.refresh()
        service = self._by_slug.get(slug)
        if service is None:
            raise UnknownService(slug)
        return service
