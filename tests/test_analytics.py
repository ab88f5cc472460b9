"""Analytics: `/analytics/overview` and `/analytics/usage` on the admin app, read from the hourly
rollup the usage writer keeps, with each key's current quota window from Redis; and the
per-key quota gauges on the gateway's `/monitoring/metrics`."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from admin.analytics_api import bucket_count, bucket_start, money, parse_time
from admin.app import create_app as create_admin_app
from admin.embedded import free_port
from gateway.app import create_app as create_gateway_app
from gateway.appkeys import POOL, SIBLINGS
from gateway.errors import BadRequest
from gateway.quota import window
from gateway.secret import Secret
from gateway.settings import Settings
from gateway.usage import USAGE, UsageRecord, UsageWriter
from tests.conftest import World, assert_error
from tests.test_monitoring import samples
from tests.test_quota import wire_quota

ADMIN_KEY = "sk-proj-" + "B" * 40
QUOTA_5 = {"quota": 5, "quotaPeriod": "month"}  # an alias: stored as "monthly"
CENT = "0.0010000001"
ALICE_KEY = "sk-proj-" + "A" * 40
BOB_KEY = "sk-proj-" + "C" * 40


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# Pure parts: UTC buckets, ranges, money, dates.


@pytest.mark.parametrize(
    ("ts", "granularity", "start"),
    [
        ("2026-03-31T23:59:59.999999", "hour", "2026-03-31T23:00:00"),
        ("2026-03-31T23:59:59.999999", "day", "2026-03-31T00:00:00"),
        ("2026-03-31T23:59:59.999999", "month", "2026-03-01T00:00:00"),
        ("2026-04-01T00:00:00", "month", "2026-04-01T00:00:00"),
    ],
)
def test_buckets_are_utc_calendar_units(ts: str, granularity: str, start: str) -> None:
    assert bucket_start(utc(ts), granularity) == utc(start)


def test_a_local_time_falls_in_its_utc_bucket() -> None:
    # 00:30 at +02:00 is 22:30 UTC the day before.
    local = datetime.fromisoformat("2026-04-01T00:30:00+02:00")
    assert bucket_start(local, "day") == utc("2026-03-31T00:00:00")


@pytest.mark.parametrize(
    ("start", "end", "granularity", "count"),
    [
        ("2026-04-01T00:00:00", "2026-04-01T00:00:00", "hour", 0),
        ("2026-04-01T00:00:00", "2026-04-01T00:00:01", "hour", 1),
        ("2026-04-01T00:00:00", "2026-04-02T00:00:00", "hour", 24),
        ("2026-04-01T00:00:00", "2026-04-02T00:00:01", "day", 2),
        ("2026-11-01T00:00:00", "2027-02-01T00:00:00", "month", 3),
        ("2026-11-01T00:00:00", "2027-02-01T00:00:01", "month", 4),
    ],
)
def test_bucket_count(start: str, end: str, granularity: str, count: int) -> None:
    assert bucket_count(utc(start), utc(end), granularity) == count


def test_times_and_money() -> None:
    assert parse_time("from", "2026-04-01") == utc("2026-04-01T00:00:00")
    assert parse_time("from", "2026-04-01T10:00:00Z") == utc("2026-04-01T10:00:00")
    # An unencoded "+" in a query string arrives as a space.
    assert parse_time("from", "2026-04-01T10:00:00 02:00") == utc("2026-04-01T08:00:00")
    with pytest.raises(BadRequest):
        parse_time("to", "yesterday")
    assert money(Decimal("12.3400000000")) == "12.34"
    assert money(Decimal("0E-10")) == "0"
    assert money(None) == "0"
    assert money(Decimal("10.0000000000")) == "10"


# Records written by the gateway's own writer at chosen instants.


async def add_key(
    admin: TestClient[Any, Any], jwt: dict[str, str], secret: str, metadata: dict[str, Any]
) -> str:
    resp = await admin.post(
        "/keys", headers=jwt, json={"key": secret, "service": "openai", "metadata": metadata}
    )
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


def record(
    at: str,
    service: str,
    key_id: str | None,
    user_id: str | None,
    status: int,
    cost: str = "0",
    fallbacks: int = 0,
) -> UsageRecord:
    return UsageRecord(utc(at), service, key_id, None, user_id, status, 12.5, 10, 20,
                       Decimal(cost), fallbacks)  # fmt: skip


@pytest.fixture
async def history(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    as_bob: dict[str, str],
    world: World,
) -> dict[str, str]:
    """Three keys (admin's with a monthly quota of 5, alice's, bob's) and seven records around
    the turn of a month, day and hour, written through the usage writer."""
    keys = {
        "admin": await add_key(admin_client, as_admin, ADMIN_KEY, QUOTA_5),
        "alice": await add_key(admin_client, as_alice, ALICE_KEY, {}),
        "bob": await add_key(admin_client, as_bob, BOB_KEY, {}),
    }  # fmt: skip
    writer = UsageWriter(admin_client.app[POOL])
    for r in (
        record("2026-03-31T23:59:59.999", "openai", keys["admin"], world.admin_id, 200, CENT),
        record("2026-04-01T00:00:00", "openai", keys["admin"], world.admin_id, 500),
        record("2026-04-01T00:59:59", "openai", keys["alice"], world.user_id, 200, "1.25", 1),
        record("2026-04-01T00:10:00", "openai", None, None, 401),
        record("2026-04-01T01:00:00", "stripe", None, world.user_id, 429),
        record("2026-04-01T01:30:00", "openai", keys["bob"], world.other_user_id, 200, "2"),
        record("2026-04-02T00:00:00", "openai", keys["alice"], world.user_id, 404, "0.5"),
    ):  # fmt: skip
        writer.add(r)
    await writer.flush()
    return keys


def points(body: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    return [(p["ts"], p["requests"], p["errors"], p["cost"]) for p in body["series"]]


async def get_json(
    client: TestClient[Any, Any], jwt: dict[str, str], path: str, **query: str
) -> dict[str, Any]:
    resp = await client.get(path, headers=jwt, params=query)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


APRIL = {"from": "2026-03-31T23:30:00Z", "to": "2026-04-03T00:00:00Z"}


async def test_series_by_hour_day_and_month_in_utc(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], history: dict[str, str]
) -> None:
    body = await get_json(admin_client, as_admin, "/analytics/usage", **APRIL)
    assert body["granularity"] == "hour"
    assert body["from"] == "2026-03-31T23:00:00+00:00"  # from goes back to its hour
    assert points(body) == [
        ("2026-03-31T23:00:00+00:00", 1, 0, "0.0010000001"),
        ("2026-04-01T00:00:00+00:00", 3, 2, "1.25"),
        ("2026-04-01T01:00:00+00:00", 2, 1, "2"),
        ("2026-04-02T00:00:00+00:00", 1, 1, "0.5"),
    ]
    body = await get_json(admin_client, as_admin, "/analytics/usage", granularity="day", **APRIL)
    assert points(body) == [
        ("2026-03-31T00:00:00+00:00", 1, 0, "0.0010000001"),
        ("2026-04-01T00:00:00+00:00", 5, 3, "3.25"),
        ("2026-04-02T00:00:00+00:00", 1, 1, "0.5"),
    ]
    body = await get_json(admin_client, as_admin, "/analytics/usage", granularity="month", **APRIL)
    assert points(body) == [
        ("2026-03-01T00:00:00+00:00", 1, 0, "0.0010000001"),
        ("2026-04-01T00:00:00+00:00", 6, 4, "3.75"),
    ]
    assert [p["fallbacks"] for p in body["series"]] == [0, 1]
    # `to` is excluded: the 01:00 bucket is not in [23:30, 01:00).
    early = {"from": APRIL["from"], "to": "2026-04-01T01:00:00Z"}
    body = await get_json(admin_client, as_admin, "/analytics/usage", **early)
    assert [p["ts"][11:16] for p in body["series"]] == ["23:00", "00:00"]
    # The same instant written with an offset.
    body = await get_json(
        admin_client, as_admin, "/analytics/usage", **{**early, "to": "2026-04-01T03:00:00+02:00"}
    )
    assert [p["ts"][11:16] for p in body["series"]] == ["23:00", "00:00"]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"service": "stripe"}, [("2026-04-01T01:00:00+00:00", 1, 1, "0")]),
        ({"key": "alice"}, [("2026-04-01T00:00:00+00:00", 1, 0, "1.25"),
                            ("2026-04-02T00:00:00+00:00", 1, 1, "0.5")]),
        ({"user": "alice"}, [("2026-04-01T00:00:00+00:00", 1, 0, "1.25"),
                             ("2026-04-01T01:00:00+00:00", 1, 1, "0"),
                             ("2026-04-02T00:00:00+00:00", 1, 1, "0.5")]),
        ({"user": "alice", "service": "stripe"}, [("2026-04-01T01:00:00+00:00", 1, 1, "0")]),
        ({"user": "bob", "key": "alice"}, []),
        ({"service": "openai", "key": "bob"}, [("2026-04-01T01:00:00+00:00", 1, 0, "2")]),
    ],
)  # fmt: skip
async def test_filters_combine(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    history: dict[str, str],
    world: World,
    filters: dict[str, str],
    expected: list[tuple[str, int, int, str]],
) -> None:
    ids = {"alice": world.user_id, "bob": world.other_user_id}
    query = dict(APRIL)
    for name, value in filters.items():
        query[name] = {"key": history, "user": ids}.get(name, {}).get(value, value)
    body = await get_json(admin_client, as_admin, "/analytics/usage", **query)
    assert points(body) == expected


async def test_overview_for_an_admin(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], history: dict[str, str]
) -> None:
    spring = {"from": "2026-03-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}
    body = await get_json(admin_client, as_admin, "/analytics/overview", **spring)
    assert body["totals"] == {"requests": 7, "errors": 4, "fallbacks": 1, "cost": "3.7510000001"}
    assert body["by_service"] == [
        {"service": "openai", "requests": 6, "errors": 3, "fallbacks": 1, "cost": "3.7510000001"},
        {"service": "stripe", "requests": 1, "errors": 1, "fallbacks": 0, "cost": "0"},
    ]
    by_key = {k["key_id"]: k for k in body["by_key"]}
    assert [k["key_id"] for k in body["by_key"]] == [
        *sorted([history["admin"], history["alice"]]),  # 2 requests each, then by id
        history["bob"],
    ]
    requests = {k: by_key[history[k]]["requests"] for k in history}
    assert requests == {"admin": 2, "alice": 2, "bob": 1}
    assert by_key[history["alice"]]["cost"] == "1.75"
    mine = by_key[history["admin"]]
    month = window("monthly", datetime.now(UTC))
    assert (mine["quota"], mine["period"], mine["quota_used"], mine["quota_left"]) == (
        5,
        "monthly",
        0,
        5,
    )
    assert mine["resets_at"] == month.end.isoformat()
    bob = by_key[history["bob"]]
    assert (bob["quota"], bob["quota_used"], bob["quota_left"], bob["resets_at"]) == (None,) * 4
    assert body["quota_state"] == "ok"
    # The top keys only, when asked.
    body = await get_json(admin_client, as_admin, "/analytics/overview", limit="1", **spring)
    assert len(body["by_key"]) == 1
    # A range without usage still lists the keys, with their quota state.
    body = await get_json(admin_client, as_admin, "/analytics/overview")
    assert body["totals"] == {"requests": 0, "errors": 0, "fallbacks": 0, "cost": "0"}
    assert body["by_service"] == []
    assert len(body["by_key"]) == 3


async def test_a_user_sees_only_their_own_usage_and_keys(
    admin_client: TestClient[Any, Any],
    as_alice: dict[str, str],
    history: dict[str, str],
    world: World,
) -> None:
    spring = {"from": "2026-03-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}
    body = await get_json(admin_client, as_alice, "/analytics/overview", **spring)
    assert body["totals"] == {"requests": 3, "errors": 2, "fallbacks": 1, "cost": "1.75"}
    assert [(s["service"], s["requests"]) for s in body["by_service"]] == [
        ("openai", 2),
        ("stripe", 1),
    ]
    assert [(k["key_id"], k["requests"]) for k in body["by_key"]] == [(history["alice"], 2)]
    own = await get_json(admin_client, as_alice, "/analytics/usage", **APRIL)
    assert sum(p["requests"] for p in own["series"]) == 3
    mine = await get_json(admin_client, as_alice, "/analytics/usage", user=world.user_id, **APRIL)
    assert mine["series"] == own["series"]
    # Someone else's usage or key: nothing, never their data.
    for query in ({"user": world.other_user_id}, {"user": world.admin_id}, {"key": history["bob"]}):
        body = await get_json(admin_client, as_alice, "/analytics/usage", **query, **APRIL)
        assert body["series"] == []
        body = await get_json(admin_client, as_alice, "/analytics/overview", **query, **spring)
        assert body["totals"]["requests"] == 0
        assert body["by_service"] == []
        assert all(k["key_id"] == history["alice"] for k in body["by_key"])


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01"}, "to"),
        ({"from": "2026-04-02", "to": "2026-04-01"}, "from"),
        ({"granularity": "week"}, "granularity"),
        ({"from": "2026-01-01", "to": "2026-03-01"}, "from"),  # 1,416 hourly points
        ({"from": "1900-01-01", "to": "2026-01-01", "granularity": "day"}, "from"),
        ({"servcie": "openai"}, "servcie"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], query: dict[str, str], field: str
) -> None:
    resp = await admin_client.get("/analytics/usage", headers=as_admin, params=query)
    error = await assert_error(resp, 400, "bad_request")
    assert error["field"] == field
    assert error["message"].startswith(f"{field}:")


@pytest.mark.parametrize(
    "query",
    [
        {"from": "2026-04-02", "to": "2026-04-01"},
        {"limit": "0"},
        {"limit": "x"},
        {"to": "nope"},
        {"to": "0001-01-01T00:00:00Z"},
    ],
)
async def test_bad_overview_parameters_are_400(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], query: dict[str, str]
) -> None:
    resp = await admin_client.get("/analytics/overview", headers=as_admin, params=query)
    await assert_error(resp, 400, "bad_request")


@pytest.mark.parametrize(
    "query",
    [
        {"key": "not-a-uuid"},
        {"user": "1' OR '1'='1"},
        {"key": str(uuid.uuid4())},
        {"service": "../etc"},
        {"service": "nul\x00"},
        {"service": "nope"},
    ],
)
async def test_filters_that_match_nothing_answer_empty(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    history: dict[str, str],
    query: dict[str, str],
) -> None:
    body = await get_json(admin_client, as_admin, "/analytics/usage", **query, **APRIL)
    assert body["series"] == []
    body = await get_json(admin_client, as_admin, "/analytics/overview", **query, **APRIL)
    assert body["totals"]["requests"] == 0
    if "key" in query:
        assert body["by_key"] == []


async def test_analytics_need_a_login(admin_client: TestClient[Any, Any]) -> None:
    for path in ("/analytics/overview", "/analytics/usage"):
        await assert_error(await admin_client.get(path), 401, "unauthenticated")


async def test_documented_in_openapi(admin_client: TestClient[Any, Any]) -> None:
    paths = (await (await admin_client.get("/openapi.json")).json())["paths"]
    assert {"/analytics/overview", "/analytics/usage"} <= set(paths)
    names = {p["name"] for p in paths["/analytics/usage"]["get"]["parameters"]}
    assert names == {"service", "key", "user", "from", "to", "granularity"}


# Real requests through the gateway: records, quota windows and the gauges.


async def test_proxied_requests_show_in_the_overview_with_their_quota(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    upstream, token = await wire_quota(admin_client, as_admin, aiohttp_server, 5, "monthly")
    key_id = ""
    for _ in range(3):
        resp = await gateway_client.get("/openai/v1/models", headers={"X-Wallet-Token": token})
        assert resp.status == 200
        key_id = resp.headers["X-Wallet-Key-Id"]
    bad = {"X-Wallet-Token": "AIzaWT_" + "n" * 43}
    assert (await gateway_client.get("/openai/v1/models", headers=bad)).status == 401
    await gateway_client.app[USAGE].flush()

    body = await get_json(admin_client, as_admin, "/analytics/overview")
    assert body["totals"] == {"requests": 4, "errors": 1, "fallbacks": 0, "cost": "0"}
    assert body["by_service"] == [
        {"service": "openai", "requests": 4, "errors": 1, "fallbacks": 0, "cost": "0"}
    ]
    [key] = body["by_key"]
    assert (key["key_id"], key["service"], key["requests"], key["errors"]) == (
        key_id,
        "openai",
        3,
        0,
    )
    assert (key["quota"], key["quota_used"], key["quota_left"]) == (5, 3, 2)
    assert key["resets_at"] == window("monthly", datetime.now(UTC)).end.isoformat()
    series = await get_json(admin_client, as_admin, "/analytics/usage")
    assert sum(p["requests"] for p in series["series"]) == 4
    assert len(upstream.seen) == 3

    text = await (await gateway_client.get("/monitoring/metrics")).text()
    gauges = {
        (name, labels["service"], labels["key_id"]): value
        for name, labels, value in samples(text)
        if name.startswith("wallet_key_quota_")
    }
    assert gauges == {
        ("wallet_key_quota_used", "openai", key_id): 3.0,
        ("wallet_key_quota_remaining", "openai", key_id): 2.0,
    }
    own = await (await gateway_client.get("/monitoring/metrics?scope=worker")).text()
    assert "wallet_key_quota_used" not in own  # a worker's own part: merged ones add them once
    admin_text = await (await admin_client.get("/monitoring/metrics")).text()
    assert "wallet_key_quota_used" not in admin_text


async def test_quota_gauges_are_not_multiplied_by_workers(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    aiohttp_client: Any,
    settings: Settings,
    tmp_path: Path,
) -> None:
    _, token = await wire_quota(admin_client, as_admin, aiohttp_server, 10, "monthly")
    for _ in range(4):
        resp = await gateway_client.get("/openai/v1/models", headers={"X-Wallet-Token": token})
        assert resp.status == 200
    # A sibling worker on its private socket, and the worker answering the scrape.
    sibling = web.AppRunner(create_gateway_app(settings))
    await sibling.setup()
    socket = tmp_path / "gateway-1.sock"
    await web.UnixSite(sibling, str(socket)).start()
    try:
        app = create_gateway_app(settings)
        app[SIBLINGS] = (socket,)
        scraped: TestClient[Any, Any] = await aiohttp_client(app)
        resp = await scraped.get("/monitoring/metrics")
        assert resp.headers["X-Wallet-Workers"] == "2/2"
        found = [
            (name, value)
            for name, _labels, value in samples(await resp.text())
            if name.startswith("wallet_key_quota_")
        ]
    finally:
        await sibling.cleanup()
    assert sorted(found) == [("wallet_key_quota_remaining", 6.0), ("wallet_key_quota_used", 4.0)]


async def test_the_overview_answers_without_redis(
    aiohttp_client: Any,
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    history: dict[str, str],
    settings: Settings,
) -> None:
    closed = Secret(f"redis://127.0.0.1:{free_port()}/0")
    client: TestClient[Any, Any] = await aiohttp_client(
        create_admin_app(replace(settings, redis_url=closed))
    )
    spring = {"from": "2026-03-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}
    body = await get_json(client, as_admin, "/analytics/overview", **spring)
    assert body["quota_state"] == "unavailable"
    assert body["totals"]["requests"] == 7
    mine = next(k for k in body["by_key"] if k["key_id"] == history["admin"])
    assert mine["quota"] == 5
    assert (mine["quota_used"], mine["quota_left"], mine["resets_at"]) == (None, None, None)
