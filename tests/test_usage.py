"""Usage records: one per request for a service, written in batches off the request path,
rolled up by hour in the same transaction, flushed at shutdown, bounded in memory."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
from aiohttp.test_utils import TestClient

from gateway.app import create_app as create_gateway_app
from gateway.appkeys import POOL
from gateway.settings import Settings
from gateway.usage import USAGE, UsageRecord, UsageWriter
from tests.conftest import Servers, World
from tests.test_gateway_proxy import Wired, wire


async def rows(servers: Servers, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(servers.database_url.reveal())
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


async def test_each_request_leaves_one_record_and_the_hourly_rollup(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    servers: Servers,
    world: World,
) -> None:
    w: Wired = await wire(admin_client, gateway_client, as_admin, aiohttp_server)
    auth = {"X-Wallet-Token": w.token}
    assert (await gateway_client.post("/openai/v1/x", headers=auth, data=b"12345")).status == 200
    assert (await gateway_client.get("/openai/v1/models", headers=auth)).status == 200
    bad = {"X-Wallet-Token": "AIzaWT_" + "n" * 43}
    assert (await gateway_client.get("/openai/v1/models", headers=bad)).status == 401
    assert (await gateway_client.get("/nope/v1", headers=auth)).status == 404  # no service

    writer = gateway_client.app[USAGE]
    assert writer.buffered == 3  # nothing written on the request path
    text = await (await gateway_client.get("/monitoring/metrics")).text()
    assert 'wallet_usage_buffered{app="gateway"} 3' in text
    await writer.flush()
    records = await rows(servers, "SELECT * FROM usage_records ORDER BY id")
    assert [(r["service"], r["status"]) for r in records] == [
        ("openai", 200),
        ("openai", 200),
        ("openai", 401),
    ]
    first, _, refused = records
    assert str(first["key_id"]) == w.key_id
    assert str(first["token_id"]) == w.token_id
    assert str(first["user_id"]) == world.admin_id
    assert first["bytes_in"] == 5
    assert first["bytes_out"] > 0
    assert first["fallbacks"] == 0
    assert first["latency_ms"] > 0
    assert (refused["key_id"], refused["token_id"], refused["user_id"]) == (None, None, None)

    hourly = await rows(servers, "SELECT * FROM usage_hourly ORDER BY requests DESC")
    by_key = {(str(h["key_id"]), str(h["user_id"])): h for h in hourly}
    served = by_key[(w.key_id, world.admin_id)]
    assert (served["requests"], served["errors"]) == (2, 0)
    nobody = by_key[(str(uuid.UUID(int=0)), str(uuid.UUID(int=0)))]
    assert (nobody["requests"], nobody["errors"]) == (1, 1)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    assert all(hour - timedelta(hours=1) <= h["hour"] <= hour for h in hourly)


async def test_a_clean_shutdown_flushes_what_is_buffered(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
    servers: Servers,
) -> None:
    w = await wire(admin_client, gateway_client, as_admin, aiohttp_server)
    other: TestClient[Any, Any] = await aiohttp_client(create_gateway_app(settings))
    for _ in range(7):
        resp = await other.get("/openai/v1/models", headers={"X-Wallet-Token": w.token})
        assert resp.status == 200
    assert other.app[USAGE].buffered == 7
    await other.close()  # the app's cleanup: drain, then flush
    records = await rows(servers, "SELECT count(*) AS n FROM usage_records")
    assert records[0]["n"] == 7


async def test_the_buffer_is_bounded_and_counts_what_it_drops(
    gateway_client: TestClient[Any, Any], servers: Servers
) -> None:
    writer = UsageWriter(gateway_client.app[POOL], max_buffered=5)
    for i in range(8):
        writer.add(
            UsageRecord(
                at=datetime.now(UTC),
                service="openai",
                key_id=None,
                token_id=None,
                user_id=None,
                status=200 + i,
                latency_ms=1.0,
                bytes_in=0,
                bytes_out=0,
                cost=Decimal(0),
                fallbacks=0,
            )
        )
    assert (writer.buffered, writer.dropped) == (5, 3)
    await writer.flush()
    statuses = await rows(servers, "SELECT status FROM usage_records ORDER BY id")
    assert [r["status"] for r in statuses] == [203, 204, 205, 206, 207]  # the newest kept
    assert writer.written == 5
