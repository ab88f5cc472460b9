"""Usage records: one per request for a service, buffered in memory and written to PostgreSQL
in batches by an owned background task, never on the request path.

Each batch goes in one transaction: the records (COPY) and the hourly rollup the analytics
read. While PostgreSQL is down the buffer keeps growing up to MAX_BUFFERED records and the
writer retries with a growing pause; past the bound the oldest records are dropped and
counted (`wallet_usage_dropped_total`), so memory stays bounded. A clean shutdown stops
taking requests first, then flushes what is buffered.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, NamedTuple

import asyncpg
import structlog
from aiohttp import web

from gateway import tasks
from gateway.appkeys import POOL
from gateway.db import DB_ERRORS, Pool

log = structlog.get_logger(__name__)

BATCH: Final = 1000
INTERVAL_S: Final = 1.0
MAX_BUFFERED: Final = 200_000  # about 60 MB; minutes of traffic at thousands of req/s
RETRY_MAX_S: Final = 30.0
SHUTDOWN_FLUSH_S: Final = 20.0
NONE: Final = str(uuid.UUID(int=0))  # "no key" / "no user" in the rollup's primary key
ERROR_STATUS: Final = 400

COLUMNS: Final = (
    "at",
    "service",
    "key_id",
    "token_id",
    "user_id",
    "status",
    "latency_ms",
    "bytes_in",
    "bytes_out",
    "cost",
    "fallbacks",
)
# The batch's totals per (hour, service, key, user), summed in Python: a batch of a thousand
# records is typically a handful of rows here.
ROLLUP: Final = """INSERT INTO usage_hourly AS h
    (hour, service, key_id, user_id, requests, errors, fallbacks, cost)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::uuid[], $4::uuid[], $5::bigint[],
                     $6::bigint[], $7::bigint[], $8::numeric[])
ON CONFLICT (hour, service, key_id, user_id) DO UPDATE SET
    requests = h.requests + excluded.requests,
    errors = h.errors + excluded.errors,
    fallbacks = h.fallbacks + excluded.fallbacks,
    cost = h.cost + excluded.cost"""


class UsageRecord(NamedTuple):
    """A tuple in the table's column order, so that COPY takes it as it is (converting a
    dataclass with `astuple` cost 30 µs a record, more than the rest of the request)."""

    at: datetime
    service: str
    key_id: str | None  # uuids as text: asyncpg encodes them, no parsing on the request path
    token_id: str | None
    user_id: str | None
    status: int
    latency_ms: float
    bytes_in: int
    bytes_out: int
    cost: Decimal
    fallbacks: int


def _rollup(batch: Sequence[UsageRecord]) -> list[tuple[object, ...]]:
    totals: dict[tuple[datetime, str, str, str], list[Any]] = {}
    for r in batch:
        group = (r.at.replace(minute=0, second=0, microsecond=0), r.service, r.key_id or NONE,
                 r.user_id or NONE)  # fmt: skip
        row = totals.get(group)
        if row is None:
            row = totals[group] = [0, 0, 0, Decimal(0)]
        row[0] += 1
        row[1] += r.status >= ERROR_STATUS
        row[2] += r.fallbacks
        row[3] += r.cost
    # In key order: two writers upserting overlapping rows lock them in the same order, so
    # they wait for each other instead of deadlocking.
    return [(*group, *totals[group]) for group in sorted(totals)]


class UsageWriter:
    def __init__(self, pool: Pool, max_buffered: int = MAX_BUFFERED) -> None:
        self._pool = pool
        self._buffer: deque[UsageRecord] = deque()
        self._max = max_buffered
        self._wake = asyncio.Event()
        self.dropped = 0
        self.written = 0

    def add(self, record: UsageRecord) -> None:
        """Take a record (on the request path: an append, nothing else)."""
        if len(self._buffer) >= self._max:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(record)
        if len(self._buffer) >= BATCH:
            self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def flush(self) -> None:
        """Write everything buffered now, batch by batch. If PostgreSQL is unreachable the
        batch goes back to the front of the buffer and the error is raised; a batch that
        PostgreSQL refuses as such (it should never happen) is dropped and counted, so that
        it cannot block the ones behind it."""
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(BATCH, len(self._buffer)))]
            try:
                await self._write(batch)
            except DB_ERRORS:
                self._put_back(batch)
                raise
            except asyncpg.PostgresError as exc:
                self.dropped += len(batch)
                log.error("usage_batch_refused", error=type(exc).__name__, records=len(batch))
                continue
            except BaseException:  # cancelled mid-write: keep the batch for the final flush
                self._put_back(batch)
                raise
            self.written += len(batch)

    def _put_back(self, batch: list[UsageRecord]) -> None:
        room = self._max - len(self._buffer)
        if room < len(batch):  # the buffer filled meanwhile: the oldest records go
            self.dropped += len(batch) - max(room, 0)
            batch = batch[len(batch) - max(room, 0) :]
        self._buffer.extendleft(reversed(batch))

    async def _write(self, batch: Sequence[UsageRecord]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.copy_records_to_table("usage_records", records=batch, columns=COLUMNS)
            await conn.execute(ROLLUP, *zip(*_rollup(batch), strict=True))

    async def run(self) -> None:
        """The owned task: flush every INTERVAL_S (or as soon as a batch is full); while
        PostgreSQL is down, keep the records and retry with a growing pause."""
        pause = INTERVAL_S
        while True:
            try:
                async with asyncio.timeout(pause):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
                pause = INTERVAL_S
            except DB_ERRORS as exc:
                pause = min(pause * 2, RETRY_MAX_S)
                log.warning(
                    "usage_flush_failed",
                    error=type(exc).__name__,
                    buffered=len(self._buffer),
                    retry_in_s=pause,
                )


USAGE = web.AppKey("usage", UsageWriter)


async def usage_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start the writer; at shutdown (requests already drained) flush what is left."""
    app[USAGE] = writer = UsageWriter(app[POOL])
    task = tasks.spawn(app, "usage-writer", writer.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    try:
        async with asyncio.timeout(SHUTDOWN_FLUSH_S):
            await writer.flush()
    except (TimeoutError, *DB_ERRORS) as exc:
        log.error("usage_not_flushed", error=type(exc).__name__, lost=writer.buffered)
    if writer.dropped:
        log.error("usage_dropped", dropped=writer.dropped)
