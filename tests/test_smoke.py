"""The walk-through of the README, through the running admin app."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient


async def test_walkthrough(admin_client: TestClient[Any, Any], as_admin: dict[str, str]) -> None:
    resp = await admin_client.put(
        "/services/openai", headers=as_admin, json={"base_url": "http://127.0.0.1:9000"}
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["base_url"] == "http://127.0.0.1:9000"

    secret = "sk-proj-" + "a1" * 20
    resp = await admin_client.post(
        "/keys",
        headers=as_admin,
        json={
            "key": secret,
            "service": "openai",
            "tier": "free",
            "name": "main",
            "priority": 0,
            "metadata": {"type": "chat", "quota": 1000, "quotaPeriod": "daily"},
        },
    )
    assert resp.status == 201, await resp.text()
    key = await resp.json()
    assert set(key) >= {
        "id",
        "service",
        "tier",
        "name",
        "priority",
        "enabled",
        "status",
        "masked",
        "metadata",
        "created_at",
        "updated_at",
    }
    assert secret not in await resp.text()
    assert key["masked"] == "sk-proj-…a1a1"

    resp = await admin_client.get("/keys?service=openai", headers=as_admin)
    listing = await resp.json()
    assert listing["total"] == 1
    assert listing["items"][0]["id"] == key["id"]
    assert secret not in await resp.text()

    resp = await admin_client.post(
        "/tokens",
        headers=as_admin,
        json={"name": "billing-app", "services": ["openai", "stripe"], "expires_at": None},
    )
    assert resp.status == 201, await resp.text()
    token = await resp.json()
    assert token["token"].startswith("AIza")
    resp = await admin_client.get(f"/tokens/{token['id']}", headers=as_admin)
    assert token["token"] not in await resp.text()
