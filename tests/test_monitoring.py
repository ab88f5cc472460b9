"""`/monitoring/health` and `/monitoring/metrics` on both apps, against real dependencies."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from admin.app import create_app as create_admin_app
from admin.embedded import free_port
from gateway.app import create_app as create_gateway_app
from gateway.secret import Secret
from gateway.settings import Settings
from tests.conftest import World

APPS: dict[str, tuple[Callable[[Settings], web.Application], str]] = {
    "admin": (create_admin_app, "X-Request-Id"),
    "gateway": (create_gateway_app, "X-Wallet-Request-Id"),
}
# Label values may contain braces (route templates like "/{service}/{path}").
SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?'
    r" (?P<value>\S+)$"
)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition: (name, labels, value)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match["labels"] or ""))
        out.append((match["name"], labels, float(match["value"])))
    return out


@pytest.fixture(params=sorted(APPS))
def which(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def start(aiohttp_client: Any, which: str, settings: Settings) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(APPS[which][0](settings))
    return client


async def test_health_ok(aiohttp_client: Any, settings: Settings, world: World, which: str) -> None:
    client = await start(aiohttp_client, which, settings)
    resp = await client.get("/monitoring/health")
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    assert await resp.json() == {
        "status": "ok",
        "checks": {"postgres": "ok", "redis": "ok", "vault": "ok"},
    }
    assert resp.headers[APPS[which][1]]
    assert resp.headers["Cache-Control"] == "no-store"


async def test_health_degraded_when_redis_is_down(
    aiohttp_client: Any, settings: Settings, world: World, which: str
) -> None:
    # Nothing listens on a port we just freed: every Redis call is refused at once.
    closed = Secret(f"redis://127.0.0.1:{free_port()}/0")
    client = await start(aiohttp_client, which, replace(settings, redis_url=closed))
    resp = await client.get("/monitoring/health")
    assert resp.status == 503, await resp.text()
    body = await resp.json()
    assert body["status"] == "degraded"
    assert body["checks"]["redis"] != "ok"
    assert body["checks"]["redis"].startswith("down")
    assert body["checks"]["postgres"] == "ok"
    assert body["checks"]["vault"] == "ok"
    assert closed.reveal() not in await resp.text()
    # Health answers degraded, it does not fail: the same again, and metrics still work.
    assert (await client.get("/monitoring/health")).status == 503
    assert (await client.get("/monitoring/metrics")).status == 200


async def test_health_degraded_when_vault_is_sealed(
    aiohttp_client: Any, settings: Settings, world: World, as_admin: dict[str, str]
) -> None:
    # `as_admin` starts the admin app once with the right key, so a canary exists; a wrong
    # master key cannot open it.
    wrong = replace(settings, encryption_key=Secret(b"\x01" * 32))
    client = await start(aiohttp_client, "admin", wrong)
    resp = await client.get("/monitoring/health")
    assert resp.status == 503, await resp.text()
    body = await resp.json()
    if body["checks"]["vault"] == "ok":
        pytest.fail(f"a wrong master key left the vault unsealed: {body}")
    assert body == {
        "status": "degraded",
        "checks": {"postgres": "ok", "redis": "ok", "vault": "sealed"},
    }
    text = await (await client.get("/monitoring/metrics")).text()
    sealed = [v for n, _labels, v in samples(text) if n == "wallet_vault_sealed"]
    assert sealed == [1.0]


async def test_metrics_after_requests(
    aiohttp_client: Any, settings: Settings, world: World, which: str
) -> None:
    client = await start(aiohttp_client, which, settings)
    for _ in range(3):
        assert (await client.get("/monitoring/health")).status == 200
    assert (await client.get("/no/such/route/at/all")).status == 404

    resp = await client.get("/monitoring/metrics")
    assert resp.status == 200, await resp.text()
    assert resp.content_type.startswith("text/plain")
    text = await resp.text()
    assert "# TYPE wallet_http_requests_total counter" in text
    assert "wallet_http_request_duration_seconds" in text
    assert "wallet_vault_sealed" in text
    parsed = samples(text)

    health = [
        (labels, v)
        for n, labels, v in parsed
        if n == "wallet_http_requests_total" and labels.get("route") == "/monitoring/health"
    ]
    assert health, text
    assert sum(v for _labels, v in health) >= 3
    assert all(labels["app"] == which and labels["status"] == "2xx" for labels, _v in health)
    errors = [
        labels
        for n, labels, _v in parsed
        if n == "wallet_http_requests_total" and labels.get("status") == "4xx"
    ]
    assert errors, text
    # No raw unmatched path becomes a label value (label cardinality stays bounded).
    assert "/no/such/route/at/all" not in text

    durations = [
        labels
        for n, labels, _v in parsed
        if n.startswith("wallet_http_request_duration_seconds")
        and labels.get("route") == "/monitoring/health"
    ]
    assert durations, text
    assert [v for n, _labels, v in parsed if n == "wallet_vault_sealed"] == [0.0]


async def test_metrics_disabled_is_404(
    aiohttp_client: Any, settings: Settings, world: World, which: str
) -> None:
    client = await start(aiohttp_client, which, replace(settings, enable_metrics=False))
    resp = await client.get("/monitoring/metrics")
    assert resp.status == 404, await resp.text()
    assert resp.content_type == "application/json"
    error = (await resp.json())["error"]
    assert error["code"] == "not_found"
    assert error["message"]
    assert error["request_id"] == resp.headers[APPS[which][1]]
    assert "wallet_http_requests_total" not in await resp.text()
    # Health does not depend on metrics being enabled.
    assert (await client.get("/monitoring/health")).status == 200
