"""The gateway's in-memory copy of the service catalog, reloaded in the background on a timer
and at once after an invalidation, so matching a request does not touch PostgreSQL (except
the first request after an admin changed a service).

While PostgreSQL is unreachable the last good copy keeps serving for up to STALE_MAX_S after
it was loaded; a copy invalidated meanwhile (a service changed) or older than that is not
served: requests get 503 `database_unavailable` within LOOKUP_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from gateway import services
from gateway.db import DB_ERRORS, LOOKUP_TIMEOUT_S, STALE_MAX_S, OutageLog, Pool
from gateway.errors import DatabaseUnavailable, UnknownService
from gateway.services import Service

REFRESH_S: Final = 30.0
MAX_SERVICES: Final = 10_000


class Catalog:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._by_slug: dict[str, Service] = {}
        self._fresh = False
        self._loaded_at = 0.0  # monotonic clock
        self._generation = 0  # bumped by every invalidation
        self._hosts: dict[str, Service] = {}  # built from the _by_slug it names
        self._hosts_of: dict[str, Service] | None = None
        self._outage = OutageLog("services")

    async def refresh(self) -> None:
        generation = self._generation
        async with self._pool.acquire() as conn:
            items, _ = await services.list_services(conn, MAX_SERVICES, 0)
        self._by_slug = {s.slug: s for s in items}
        self._loaded_at = time.monotonic()
        # A change announced while this load ran may be missing from it: load again next time.
        self._fresh = generation == self._generation

    def invalidate(self) -> None:
        self._generation += 1
        self._fresh = False

    async def keep_fresh(self) -> None:
        """Background: reload every REFRESH_S; while PostgreSQL is down the last good copy
        keeps serving (logged once per outage)."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except DB_ERRORS as exc:
                self._outage.failed(exc)
            else:
                self._outage.succeeded()

    async def _ensure_fresh(self) -> None:
        if not self._fresh or time.monotonic() - self._loaded_at >= STALE_MAX_S:
            try:
                async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                    await self.refresh()
            except DB_ERRORS as exc:
                self._outage.failed(exc)
                raise DatabaseUnavailable("the service catalog") from exc
            self._outage.succeeded()

    def peek(self, slug: str) -> Service | None:
        """`get` without waiting: the service when the copy in hand may serve it; None when
        `get` has more to do (a reload, or an UnknownService to raise)."""
        if self._fresh and time.monotonic() - self._loaded_at < STALE_MAX_S:
            return self._by_slug.get(slug)
        return None

    async def get(self, slug: str) -> Service:
        await self._ensure_fresh()
        service = self._by_slug.get(slug)
        if service is None:
            raise UnknownService(slug)
        return service

    async def by_host(self, host: str) -> Service | None:
        """The service whose `hosts` claim `host` (forward-proxy mode), or None. Hosts are
        unique to one service in practice; if two claim one, the first slug wins."""
        await self._ensure_fresh()
        if self._hosts_of is not self._by_slug:
            self._hosts = {}
            for service in sorted(self._by_slug.values(), key=lambda s: s.slug):
                for name in service.hosts:
                    self._hosts.setdefault(name, service)
            self._hosts_of = self._by_slug
        return self._hosts.get(host)
