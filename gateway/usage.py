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
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
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
    "mode",
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
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND: Final = timedelta(microseconds=1)
HOUR_US: Final = 3_600_000_000
# COPY's text format: a row is one line of tab-separated values, NULL is `\N`.
NULL: Final = "\\N"
ROW_FORMAT: Final = "%s.%06d+00\t%s\t%s\t%s\t%s\t%d\t%.3f\t%d\t%d\t%s\t%d\t%s\n"


class UsageRecord(NamedTuple):
    """One request's usage, in the table's column order (what tests and other writers hand
    to `UsageWriter.add`; the proxy uses the cheaper `UsageWriter.take`)."""

    at: datetime
    service: str
    key_id: str | None  # uuids as text
    token_id: str | None
    user_id: str | None
    status: int
    latency_ms: float
    bytes_in: int
    bytes_out: int
    cost: Decimal
    fallbacks: int
    mode: str = "reverse"  # the listener that took the request: "reverse" or "forward"


# A buffered record: UsageRecord's fields with `at` as whole microseconds since the epoch (an
# int from the clock, turned into a timestamp only when the batch is written).
Row = tuple[int, str, str | None, str | None, str | None, int, float, int, int, Decimal, int, str]


def _copy_text(value: str) -> str:
    """A value as COPY's text format wants it: backslash, tab, newline and CR escaped."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        value = value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
        value = value.replace("\r", "\\r")
    return value


class _Escaped(dict[str | None, str]):
    """Text values escaped for COPY, each worked out once per batch (they repeat: a batch has
    a handful of services, keys and tokens)."""

    def __missing__(self, value: str | None) -> str:
        escaped = self[value] = NULL if value is None else _copy_text(value)
        return escaped


def encode(batch: Iterable[Row]) -> bytes:
    """The batch as COPY text-format input. Cheaper than asyncpg's binary COPY, which encodes
    value by value through its codecs (a datetime, a Decimal and three uuids per record)."""
    escaped = _Escaped()
    lines = []
    second = -1
    stamp = ""
    for (
        at,
        service,
        key_id,
        token_id,
        user_id,
        status,
        latency,
        b_in,
        b_out,
        cost,
        fb,
        mode,
    ) in batch:
        whole, micros = divmod(at, 1_000_000)
        if whole != second:  # a batch spans a second or so: formatted once per second
            second = whole
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole))
        lines.append(
            ROW_FORMAT
            % (stamp, micros, escaped[service], escaped[key_id], escaped[token_id],
               escaped[user_id], status, latency, b_in, b_out, cost, fb, escaped[mode])
        )  # fmt: skip
    return "".join(lines).encode()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    """COPY input in one piece (asyncpg takes plain bytes for a file name, and reads a file
    object in a thread)."""
    yield data


def _rollup(batch: Iterable[Row]) -> list[tuple[object, ...]]:
    totals: dict[tuple[int, str, str, str], list[Any]] = {}
    for at, service, key_id, _, user_id, status, _, _, _, cost, fallbacks, _ in batch:
        group = (at // HOUR_US, service, key_id or NONE, user_id or NONE)
        row = totals.get(group)
        if row is None:
            row = totals[group] = [0, 0, 0, Decimal(0)]
        row[0] += 1
        row[1] += status >= ERROR_STATUS
        row[2] += fallbacks
        row[3] += cost
    # In key order: two writers upserting overlapping rows lock them in the same order, so
    # they wait for each other instead of deadlocking.
    return [
        (EPOCH + timedelta(hours=group[0]), *group[1:], *totals[group]) for group in sorted(totals)
    ]


class UsageWriter:
    def __init__(self, pool: Pool, max_buffered: int = MAX_BUFFERED) -> None:
        self._pool = pool
        self._buffer: deque[Row] = deque()
        self._max = max_buffered
        self._wake = asyncio.Event()
        self.dropped = 0
        self.written = 0

    def add(self, record: UsageRecord) -> None:
        """Take a record."""
        r = record
        at = r.at if r.at.tzinfo else r.at.astimezone(UTC)  # naive: local time, as in asyncpg
        self._append(
            ((at - EPOCH) // MICROSECOND, r.service, r.key_id, r.token_id, r.user_id, r.status,
             r.latency_ms, r.bytes_in, r.bytes_out, r.cost, r.fallbacks, r.mode)
        )  # fmt: skip

    def take(
        self,
        service: str,
        key_id: str | None,
        token_id: str | None,
        user_id: str | None,
        status: int,
        latency_ms: float,
        bytes_in: int,
        bytes_out: int,
        cost: Decimal,
        fallbacks: int,
        mode: str = "reverse",
    ) -> None:
        """Take a request's record, stamped now (on the request path: a tuple and an append,
        nothing else; the time is formatted and the latency rounded when it is written)."""
        self._append(
            (time.time_ns() // 1000, service, key_id, token_id, user_id, status, latency_ms,
             bytes_in, bytes_out, cost, fallbacks, mode)
        )  # fmt: skip

    def _append(self, row: Row) -> None:
        buffer = self._buffer
        if len(buffer) >= self._max:
            buffer.popleft()
            self.dropped += 1
        buffer.append(row)
        if len(buffer) >= BATCH:
            self._wake.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def flush(self) -> None:
        """Write what is buffered now, batch by batch (what arrives meanwhile waits for the
        next flush: under steady traffic the writer would otherwise chase the requests with
        a transaction every few records). If PostgreSQL is unreachable the batch goes back to
        the front of the buffer and the error is raised; a batch that PostgreSQL refuses as
        such (it should never happen) is dropped and counted, so that it cannot block the
        ones behind it."""
        left = len(self._buffer)
        while left > 0 and self._buffer:
            size = min(BATCH, left, len(self._buffer))
            left -= size
            batch = [self._buffer.popleft() for _ in range(size)]
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

    def _put_back(self, batch: list[Row]) -> None:
        room = self._max - len(self._buffer)
        if room < len(batch):  # the buffer filled meanwhile: the oldest records go
            self.dropped += len(batch) - max(room, 0)
            batch = batch[len(batch) - max(room, 0) :]
        self._buffer.extendleft(reversed(batch))

    async def _write(self, batch: Sequence[Row]) -> None:
        data = encode(batch)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.copy_to_table("usage_records", source=_once(data), columns=COLUMNS)
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
