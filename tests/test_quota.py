"""Per-key quotas: UTC calendar windows, exact under concurrency, spill-over to the next key,
429 with Retry-After at the window's end when every key is spent."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.hotredis import HotRedis
from gateway.quota import Limit, Quotas, window
from tests.fakes import FakeUpstream

OPENAI_KEY = "sk-proj-" + "Q" * 40
SECOND_KEY = "sk-proj-" + "S" * 40


@pytest.mark.parametrize(
    ("period", "now", "window_id", "end"),
    [
        ("minute", "2026-11-26T10:15:42", "m202611261015", "2026-11-26T10:16:00"),
        ("hour", "2026-11-26T10:15:42", "h2026112610", "2026-11-26T11:00:00"),
        ("daily", "2026-11-26T23:59:59", "d20261126", "2026-11-27T00:00:00"),
        ("monthly", "2026-12-31T12:00:00", "M202612", "2027-01-01T00:00:00"),
        ("monthly", "2028-02-10T00:00:00", "M202802", "2028-03-01T00:00:00"),
    ],
)
def test_windows_are_utc_calendar_windows(period: str, now: str, window_id: str, end: str) -> None:
    w = window(period, datetime.fromisoformat(now).replace(tzinfo=UTC))
    assert w.id == window_id
    assert w.end == datetime.fromisoformat(end).replace(tzinfo=UTC)


async def test_reservation_is_exact_under_concurrency(hot: HotRedis) -> None:
    quotas = Quotas(hot)
    limits = [Limit("k1", 100, "daily")]
    results = await asyncio.gather(*(quotas.reserve("svc", limits) for _ in range(500)))
    granted = [r for r in results if r.index is not None]
    assert len(granted) == 100
    assert sorted(r.used for r in granted) == list(range(1, 101))
    refused = [r for r in results if r.index is None]
    assert all(1 <= r.retry_after_s <= 86_400 for r in refused)


async def test_reservation_spills_over_to_the_next_key(hot: HotRedis) -> None:
    quotas = Quotas(hot)
    limits = [Limit("free", 3, "minute"), Limit("paid", None, "daily")]
    picks = [(await quotas.reserve("svc", limits)).index for _ in range(5)]
    assert picks == [0, 0, 0, 1, 1]


async def wire_quota(
    admin: TestClient[Any, Any],
    jwt: dict[str, str],
    aiohttp_server: Any,
    quota: int,
    period: str = "daily",
) -> tuple[FakeUpstream, str]:
    upstream = FakeUpstream(OPENAI_KEY)
    server = await aiohttp_server(upstream.app())
    resp = await admin.put(
        "/services/openai", headers=jwt, json={"base_url": f"http://127.0.0.1:{server.port}"}
    )
    assert resp.status == 200
    resp = await admin.post(
        "/keys",
        headers=jwt,
        json={
            "key": OPENAI_KEY,
            "service": "openai",
            "tier": "free",
            "metadata": {"quota": quota, "quotaPeriod": period},
        },
    )
    assert resp.status == 201, await resp.text()
    resp = await admin.post("/tokens", headers=jwt, json={"name": "q", "services": ["openai"]})
    assert resp.status == 201
    return upstream, (await resp.json())["token"]


async def test_500_concurrent_requests_against_a_quota_of_100(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    upstream, token = await wire_quota(admin_client, as_admin, aiohttp_server, 100)

    async def call() -> tuple[int, dict[str, str], dict[str, Any]]:
        resp = await gateway_client.get("/openai/v1/models", headers={"X-Wallet-Token": token})
        return resp.status, dict(resp.headers), await resp.json()

    results = await asyncio.gather(*(call() for _ in range(500)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 100
    assert statuses.count(429) == 400
    assert len(upstream.seen) == 100  # exactly the quota reached the upstream
    now = datetime.now(UTC)
    to_midnight = 86_400 - (now.hour * 3600 + now.minute * 60 + now.second)
    for status, headers, body in results:
        retry_after = headers.get("Retry-After")
        if status == 429:
            assert body["error"]["code"] == "quota_exhausted"
            assert headers["x-should-retry"] == "false"
            assert retry_after is not None
            assert abs(int(retry_after) - to_midnight) <= 2


async def test_a_second_key_takes_over_when_the_first_is_spent(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    upstream, token = await wire_quota(admin_client, as_admin, aiohttp_server, 2)
    resp = await admin_client.post(
        "/keys",
        headers=as_admin,
        json={"key": SECOND_KEY, "service": "openai", "tier": "paid"},
    )
    assert resp.status == 201
    second_id = (await resp.json())["id"]
    upstream.also = frozenset({SECOND_KEY})
    served = []
    for _ in range(4):
        resp = await gateway_client.get("/openai/v1/models", headers={"X-Wallet-Token": token})
        served.append((resp.status, resp.headers.get("X-Wallet-Key-Id")))
    # The free key serves its quota of 2, then the paid key takes over.
    assert [s for s, _ in served] == [200, 200, 200, 200]
    assert served[0][1] == served[1][1] != second_id
    assert served[2][1] == served[3][1] == second_id
    assert [seen.headers["Authorization"] for seen in upstream.seen] == [
        f"Bearer {OPENAI_KEY}",
        f"Bearer {OPENAI_KEY}",
        f"Bearer {SECOND_KEY}",
        f"Bearer {SECOND_KEY}",
    ]


async def test_openai_sdk_raises_its_rate_limit_error_without_hammering(
    admin_client: TestClient[Any, Any],
    gateway_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    openai = pytest.importorskip("openai")
    # A minute window: Retry-After of at most 60 s, which the SDK would otherwise wait out and
    # retry (it gives up by itself only past 120 s).
    upstream, token = await wire_quota(admin_client, as_admin, aiohttp_server, 1, "minute")
    client = openai.OpenAI(
        base_url=str(gateway_client.make_url("/openai/v1")), api_key=token, max_retries=2
    )
    seen: list[int] = []

    def calls() -> None:
        client.models.list()
        with pytest.raises(openai.RateLimitError) as refused:
            client.models.list()
        seen.append(refused.value.status_code)

    async with asyncio.timeout(20):
        await asyncio.to_thread(calls)
    assert seen == [429]
    text = await (await gateway_client.get("/monitoring/metrics")).text()
    # One success and one refusal: the SDK did not retry the 429 (x-should-retry: false).
    refused = (
        'wallet_proxied_requests_total{app="gateway",mode="reverse",service="openai",status="4xx"}'
    )
    assert f"{refused} 1" in text
    assert len(upstream.seen) == 1
