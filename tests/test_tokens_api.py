"""`/tokens` through the running admin app: shown once, stored as a hash, SDK-compatible,
owner-scoped, revocable."""

from __future__ import annotations

import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway import tokens
from gateway.appkeys import POOL
from gateway.secret import Secret
from gateway.settings import Settings
from tests.conftest import assert_error

Client = TestClient[Any, Any]
URL_UNRESERVED = re.compile(r"^[A-Za-z0-9._~-]+$")


async def create_token(client: Client, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    body = {"name": "billing-app", "services": ["openai", "stripe"], "expires_at": None, **fields}
    resp = await client.post("/tokens", headers=headers, json=body)
    assert resp.status == 201, await resp.text()
    token: dict[str, Any] = await resp.json()
    return token


async def test_create_shows_the_token_once(
    admin_client: Client, as_alice: dict[str, str], world: Any
) -> None:
    created = await create_token(admin_client, as_alice)
    assert set(created) >= {"id", "name", "services", "token", "created_at", "expires_at"}
    assert created["name"] == "billing-app"
    assert created["services"] == ["openai", "stripe"]
    assert created["expires_at"] is None
    assert created["owner_id"] == world.user_id
    token = created["token"]

    for path in ("/tokens", f"/tokens/{created['id']}"):
        resp = await admin_client.get(path, headers=as_alice)
        assert resp.status == 200, await resp.text()
        text = await resp.text()
        assert token not in text
        assert token[len(tokens.PREFIX) :] not in text

    resp = await admin_client.get(f"/tokens/{created['id']}", headers=as_alice)
    shown = await resp.json()
    assert "token" not in shown
    assert shown["id"] == created["id"]
    assert shown["services"] == ["openai", "stripe"]
    assert shown["revoked_at"] is None
    assert shown["hint"].endswith(token[-4:])

    resp = await admin_client.get("/tokens", headers=as_alice)
    listing = await resp.json()
    assert listing["total"] == 1
    assert [t["id"] for t in listing["items"]] == [created["id"]]
    assert "token" not in listing["items"][0]


async def test_token_format_suits_sdks(admin_client: Client, as_alice: dict[str, str]) -> None:
    seen = set()
    for _ in range(5):
        token = (await create_token(admin_client, as_alice))["token"]
        assert token.startswith("AIza")
        assert URL_UNRESERVED.match(token), token
        assert len(token) >= 40
        assert tokens.looks_like_token(token)
        seen.add(token)
    assert len(seen) == 5


async def test_token_passes_the_googlemaps_client_check(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    googlemaps = pytest.importorskip("googlemaps")
    token = (await create_token(admin_client, as_alice, services=["googlemaps"]))["token"]
    client = googlemaps.Client(key=token)
    assert client.key == token


async def test_database_stores_only_a_hash(
    admin_client: Client, as_alice: dict[str, str], settings: Settings
) -> None:
    created = await create_token(admin_client, as_alice)
    token = created["token"]
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        row = await conn.fetchrow("SELECT * FROM tokens WHERE id = $1", uuid.UUID(created["id"]))
        audit_rows = await conn.fetch("SELECT * FROM audit_log")
    finally:
        await conn.close()
    assert row is not None
    assert bytes(row["token_hash"]) == hashlib.sha256(token.encode()).digest()
    for value in row.values():
        raw = bytes(value) if isinstance(value, bytes) else str(value).encode()
        assert token.encode() not in raw
        assert token[len(tokens.PREFIX) :].encode() not in raw
    assert audit_rows, "creating a token leaves an audit record"
    for audit_row in audit_rows:
        assert token not in str(dict(audit_row))


async def test_find_by_token_finds_the_presented_token(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    created = await create_token(admin_client, as_alice, name="finder")
    token = created["token"]
    tampered_token = token[:-1] + ("B" if token.endswith("A") else "A")
    assert admin_client.app is not None
    async with admin_client.app[POOL].acquire() as conn:
        found = await tokens.find_by_token(conn, Secret(token))
        missing = await tokens.find_by_token(conn, tokens.generate())
        tampered = await tokens.find_by_token(conn, Secret(tampered_token))
    assert found is not None
    assert found.id == created["id"]
    assert found.name == "finder"
    assert found.services == ("openai", "stripe")
    assert found.usable(datetime.now(UTC))
    assert missing is None
    assert tampered is None


async def test_services_are_deduplicated_and_expiry_is_kept(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    created = await create_token(
        admin_client,
        as_alice,
        services=["openweather", "openweather", "googlemaps"],
        expires_at=expires.isoformat().replace("+00:00", "Z"),
    )
    assert created["services"] == ["openweather", "googlemaps"]
    assert datetime.fromisoformat(created["expires_at"]) == expires


async def test_unknown_service_is_404(admin_client: Client, as_alice: dict[str, str]) -> None:
    resp = await admin_client.post(
        "/tokens", headers=as_alice, json={"name": "x", "services": ["openai", "nope"]}
    )
    await assert_error(resp, 404, "unknown_service")
    resp = await admin_client.get("/tokens", headers=as_alice)
    assert (await resp.json())["total"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "services": []}, "services"),
        ({"name": "x"}, "services"),
        ({"name": "x", "services": "openai"}, "services"),
        ({"name": "x", "services": [1, 2]}, "services"),
        ({"services": ["openai"]}, "name"),
        ({"name": "   ", "services": ["openai"]}, "name"),
        ({"name": "x", "services": ["openai"], "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "x", "services": ["openai"], "expires_at": "next tuesday"}, "expires_at"),
        ({"name": "x", "services": ["openai"], "expires_at": 1893456000}, "expires_at"),
        ({"name": "x", "services": ["openai"], "expires_at": "2030-02-30"}, "expires_at"),
        (
            {"name": "x", "services": ["openai"], "expires_at": "9999-12-31T23:59:59-14:00"},
            "expires_at",
        ),
        ({"name": "x", "services": ["openai"], "owner_id": "someone"}, "owner_id"),
    ],
)
async def test_validation_errors(
    admin_client: Client, as_alice: dict[str, str], body: dict[str, Any], field: str
) -> None:
    resp = await admin_client.post("/tokens", headers=as_alice, json=body)
    error = await assert_error(resp, 422, "validation_error")
    assert error["field"] == field


async def test_expiry_a_moment_ago_is_refused(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    resp = await admin_client.post(
        "/tokens", headers=as_alice, json={"name": "x", "services": ["openai"], "expires_at": past}
    )
    await assert_error(resp, 422, "validation_error")


async def test_revoke_marks_the_token_revoked(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    created = await create_token(admin_client, as_alice)
    path = f"/tokens/{created['id']}"
    resp = await admin_client.delete(path, headers=as_alice)
    assert resp.status == 204
    resp = await admin_client.get(path, headers=as_alice)
    assert resp.status == 200
    shown = await resp.json()
    revoked_at = datetime.fromisoformat(shown["revoked_at"])
    assert abs(datetime.now(UTC) - revoked_at) < timedelta(minutes=1)

    # Revoking again is harmless and keeps the first time.
    resp = await admin_client.delete(path, headers=as_alice)
    assert resp.status == 204
    resp = await admin_client.get(path, headers=as_alice)
    assert (await resp.json())["revoked_at"] == shown["revoked_at"]

    assert admin_client.app is not None
    async with admin_client.app[POOL].acquire() as conn:
        found = await tokens.find_by_token(conn, Secret(created["token"]))
    assert found is not None
    assert not found.usable(datetime.now(UTC))


async def test_user_cannot_see_or_revoke_another_users_token(
    admin_client: Client, as_alice: dict[str, str], as_bob: dict[str, str]
) -> None:
    bobs = await create_token(admin_client, as_bob)
    alices = await create_token(admin_client, as_alice)
    path = f"/tokens/{bobs['id']}"

    await assert_error(await admin_client.get(path, headers=as_alice), 404, "not_found")
    await assert_error(await admin_client.delete(path, headers=as_alice), 404, "not_found")

    resp = await admin_client.get("/tokens", headers=as_alice)
    listing = await resp.json()
    assert listing["total"] == 1
    assert [t["id"] for t in listing["items"]] == [alices["id"]]

    resp = await admin_client.get(path, headers=as_bob)
    assert resp.status == 200
    assert (await resp.json())["revoked_at"] is None


async def test_admin_sees_and_revokes_every_token(
    admin_client: Client,
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    as_bob: dict[str, str],
) -> None:
    alices = await create_token(admin_client, as_alice)
    bobs = await create_token(admin_client, as_bob)
    resp = await admin_client.get("/tokens", headers=as_admin)
    listing = await resp.json()
    assert listing["total"] == 2
    assert {t["id"] for t in listing["items"]} == {alices["id"], bobs["id"]}
    text = await resp.text()
    assert alices["token"] not in text
    assert bobs["token"] not in text

    resp = await admin_client.delete(f"/tokens/{bobs['id']}", headers=as_admin)
    assert resp.status == 204
    resp = await admin_client.get(f"/tokens/{bobs['id']}", headers=as_bob)
    assert (await resp.json())["revoked_at"] is not None


async def test_list_paginates(admin_client: Client, as_alice: dict[str, str]) -> None:
    ids = {(await create_token(admin_client, as_alice, name=f"t{i}"))["id"] for i in range(3)}
    resp = await admin_client.get("/tokens?limit=2", headers=as_alice)
    first = await resp.json()
    resp = await admin_client.get("/tokens?limit=2&offset=2", headers=as_alice)
    second = await resp.json()
    assert first["total"] == second["total"] == 3
    assert len(first["items"]) == 2
    assert len(second["items"]) == 1
    assert {t["id"] for t in first["items"] + second["items"]} == ids


async def test_malformed_and_missing_ids_answer_alike(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    missing = await assert_error(
        await admin_client.get(f"/tokens/{uuid.uuid4()}", headers=as_admin), 404, "not_found"
    )
    for method in ("GET", "DELETE"):
        error = await assert_error(
            await admin_client.request(method, "/tokens/not-an-id", headers=as_admin),
            404,
            "not_found",
        )
        assert error["message"] == missing["message"]


async def test_tokens_need_a_session(admin_client: Client) -> None:
    resp = await admin_client.post("/tokens", json={"name": "x", "services": ["openai"]})
    await assert_error(resp, 401, "unauthenticated")
    await assert_error(await admin_client.get("/tokens"), 401, "unauthenticated")
