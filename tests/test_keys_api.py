"""`/keys` through the running admin app: CRUD per role, masking, duplicates, format detection,
filters and pagination, rotation by PUT, and validation errors in the one JSON error shape."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway import keys
from gateway.appkeys import POOL, VAULT
from tests.conftest import assert_error

Client = TestClient[Any, Any]


def openai_secret() -> str:
    return "sk-proj-" + secrets.token_hex(20)


def stripe_secret(prefix: str = "sk_test_") -> str:
    return prefix + secrets.token_hex(12)


async def add_key(
    client: Client, headers: dict[str, str], secret: str | None = None, **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"key": secret or openai_secret(), "service": "openai", **fields}
    resp = await client.post("/keys", headers=headers, json=body)
    assert resp.status == 201, await resp.text()
    assert body["key"] not in await resp.text()
    key: dict[str, Any] = await resp.json()
    return key


async def open_secret(client: Client, key_id: str) -> str:
    app = client.app
    assert app is not None
    async with app[POOL].acquire() as conn:
        return (await keys.open_secret(conn, app[VAULT], key_id)).reveal()


async def test_create_returns_masked_key_object_never_plaintext(
    admin_client: Client, as_alice: dict[str, str], world: Any
) -> None:
    secret = openai_secret()
    resp = await admin_client.post(
        "/keys",
        headers=as_alice,
        json={
            "key": secret,
            "service": "openai",
            "tier": "free",
            "name": "alice main",
            "priority": 5,
            "metadata": {"type": "chat", "quota": 1000, "quotaPeriod": "daily"},
        },
    )
    assert resp.status == 201, await resp.text()
    text = await resp.text()
    assert secret not in text
    assert secret[8:] not in text
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
    assert key["service"] == "openai"
    assert key["tier"] == "free"
    assert key["name"] == "alice main"
    assert key["priority"] == 5
    assert key["enabled"] is True
    assert key["status"] == "active"
    assert key["owner_id"] == world.user_id
    assert key["metadata"] == {"type": "chat", "quota": 1000, "quotaPeriod": "daily"}
    assert key["masked"] == f"sk-proj-…{secret[-4:]}"
    assert await open_secret(admin_client, key["id"]) == secret

    for path in ("/keys", f"/keys/{key['id']}"):
        resp = await admin_client.get(path, headers=as_alice)
        assert resp.status == 200
        assert secret not in await resp.text()


async def test_plaintext_is_not_stored_in_the_database(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    secret = openai_secret()
    key = await add_key(admin_client, as_admin, secret)
    assert admin_client.app is not None
    async with admin_client.app[POOL].acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM api_keys WHERE id = $1", uuid.UUID(key["id"]))
    assert row is not None
    for value in row.values():
        raw = value if isinstance(value, bytes) else str(value).encode()
        assert secret.encode() not in raw


async def test_defaults_when_only_key_and_service_are_given(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    secret = openai_secret()
    key = await add_key(admin_client, as_alice, secret)
    assert key["tier"] == "paid"
    assert key["priority"] == 0
    assert key["enabled"] is True
    assert key["metadata"] == {}
    assert key["name"] == f"openai {key['masked']}"
    assert secret not in key["name"]


async def test_user_sees_and_changes_only_own_keys(
    admin_client: Client, as_alice: dict[str, str], as_bob: dict[str, str]
) -> None:
    mine = await add_key(admin_client, as_alice)
    theirs = await add_key(admin_client, as_bob)

    resp = await admin_client.get("/keys", headers=as_alice)
    listing = await resp.json()
    assert listing["total"] == 1
    assert [k["id"] for k in listing["items"]] == [mine["id"]]

    resp = await admin_client.get(f"/keys/{mine['id']}", headers=as_alice)
    assert resp.status == 200
    assert (await resp.json())["id"] == mine["id"]

    other = f"/keys/{theirs['id']}"
    await assert_error(await admin_client.get(other, headers=as_alice), 404, "not_found")
    await assert_error(
        await admin_client.put(other, headers=as_alice, json={"name": "stolen"}), 404, "not_found"
    )
    await assert_error(await admin_client.delete(other, headers=as_alice), 404, "not_found")

    resp = await admin_client.get(other, headers=as_bob)
    assert resp.status == 200
    assert (await resp.json())["name"] == theirs["name"]


async def test_admin_sees_and_changes_every_key(
    admin_client: Client,
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    as_bob: dict[str, str],
) -> None:
    alice_key = await add_key(admin_client, as_alice)
    bob_key = await add_key(admin_client, as_bob)
    admin_key = await add_key(admin_client, as_admin)

    resp = await admin_client.get("/keys", headers=as_admin)
    listing = await resp.json()
    assert listing["total"] == 3
    assert {k["id"] for k in listing["items"]} == {alice_key["id"], bob_key["id"], admin_key["id"]}

    resp = await admin_client.put(
        f"/keys/{alice_key['id']}", headers=as_admin, json={"name": "renamed by admin"}
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["name"] == "renamed by admin"

    resp = await admin_client.delete(f"/keys/{bob_key['id']}", headers=as_admin)
    assert resp.status == 204
    resp = await admin_client.get("/keys", headers=as_bob)
    assert (await resp.json())["total"] == 0


async def test_malformed_id_answers_like_a_missing_one(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    missing = await assert_error(
        await admin_client.get(f"/keys/{uuid.uuid4()}", headers=as_admin), 404, "not_found"
    )
    for bad in ("not-a-uuid", "1", "'; DROP TABLE api_keys; --"):
        for method in ("GET", "PUT", "DELETE"):
            kwargs: dict[str, Any] = {"json": {"name": "x"}} if method == "PUT" else {}
            resp = await admin_client.request(method, f"/keys/{bad}", headers=as_admin, **kwargs)
            error = await assert_error(resp, 404, "not_found")
            assert error["message"] == missing["message"]
            assert set(error) == set(missing)


async def test_duplicate_secret_is_refused(
    admin_client: Client, as_alice: dict[str, str], as_bob: dict[str, str]
) -> None:
    secret = openai_secret()
    await add_key(admin_client, as_alice, secret)

    for headers in (as_alice, as_bob):
        resp = await admin_client.post(
            "/keys", headers=headers, json={"key": secret, "service": "openai"}
        )
        await assert_error(resp, 409, "conflict")
        assert secret not in await resp.text()

    # Surrounding whitespace does not make it a different key.
    resp = await admin_client.post(
        "/keys", headers=as_bob, json={"key": f"  {secret}\n", "service": "openai"}
    )
    await assert_error(resp, 409, "conflict")

    resp = await admin_client.get("/keys", headers=as_bob)
    assert (await resp.json())["total"] == 0


@pytest.mark.parametrize(
    ("secret", "service"),
    [
        ("sk_test_" + "a1B2c3D4e5F6g7H8i9J0k1L2", "stripe"),
        ("sk_live_" + "Z9y8X7w6V5u4T3s2R1q0P9o8", "stripe"),
        ("rk_live_" + "Q1w2E3r4T5y6U7i8O9p0A1s2", "stripe"),
        ("rk_test_" + "m1N2b3V4c5X6z7L8k9J0h1G2", "stripe"),
        ("sk-" + "T3BlbkFJ" + "x" * 24 + "abc123", "openai"),
        ("sk-proj-" + "Ab12Cd34Ef56Gh78Ij90Kl12Mn34", "openai"),
        ("AIza" + "SyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "googlemaps"),
        ("0123456789abcdef0123456789abcdef", "openweather"),
    ],
)
async def test_service_is_detected_from_the_key_format(
    admin_client: Client, as_alice: dict[str, str], secret: str, service: str
) -> None:
    resp = await admin_client.post("/keys", headers=as_alice, json={"key": secret})
    assert resp.status == 201, await resp.text()
    assert secret not in await resp.text()
    key = await resp.json()
    assert key["service"] == service
    assert await open_secret(admin_client, key["id"]) == secret


@pytest.mark.parametrize(
    "secret",
    [
        "totally-unknown-format-1234567890",
        "AIza" + "short",
        "0123456789ABCDEF0123456789ABCDEF",  # upper-case hex is not OpenWeather's format
        "sk-ant-" + "a" * 30,  # Anthropic, not OpenAI
    ],
)
async def test_unknown_format_asks_for_the_service(
    admin_client: Client, as_alice: dict[str, str], secret: str
) -> None:
    resp = await admin_client.post("/keys", headers=as_alice, json={"key": secret})
    error = await assert_error(resp, 400, "bad_request")
    assert set(error["candidates"]) >= {"stripe", "openai", "openweather", "googlemaps"}
    assert secret not in await resp.text()
    resp = await admin_client.get("/keys", headers=as_alice)
    assert (await resp.json())["total"] == 0


async def test_explicit_unknown_service_is_404(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    resp = await admin_client.post(
        "/keys", headers=as_alice, json={"key": openai_secret(), "service": "nope"}
    )
    await assert_error(resp, 404, "unknown_service")


async def test_filters_by_service_tier_and_status(
    admin_client: Client, as_alice: dict[str, str], as_bob: dict[str, str]
) -> None:
    free_ai = await add_key(admin_client, as_alice, tier="free")
    paid_ai = await add_key(admin_client, as_alice, tier="paid")
    stripe = await add_key(admin_client, as_alice, stripe_secret(), service="stripe", tier="free")
    await add_key(admin_client, as_bob, tier="free")  # never in alice's listings
    assert admin_client.app is not None
    async with admin_client.app[POOL].acquire() as conn:
        await conn.execute(
            "UPDATE api_keys SET status = 'exhausted' WHERE id = $1", uuid.UUID(paid_ai["id"])
        )

    async def ids(query: str) -> tuple[set[str], int]:
        resp = await admin_client.get(f"/keys?{query}", headers=as_alice)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        return {k["id"] for k in body["items"]}, body["total"]

    assert await ids("service=openai") == ({free_ai["id"], paid_ai["id"]}, 2)
    assert await ids("service=stripe") == ({stripe["id"]}, 1)
    assert await ids("tier=free") == ({free_ai["id"], stripe["id"]}, 2)
    assert await ids("status=exhausted") == ({paid_ai["id"]}, 1)
    assert await ids("status=active") == ({free_ai["id"], stripe["id"]}, 2)
    assert await ids("service=openai&tier=free&status=active") == ({free_ai["id"]}, 1)
    assert await ids("service=openweather") == (set(), 0)

    for query in ("tier=gold", "status=sleeping"):
        resp = await admin_client.get(f"/keys?{query}", headers=as_alice)
        await assert_error(resp, 422, "validation_error")


async def test_limit_and_offset_paginate_with_the_full_total(
    admin_client: Client, as_alice: dict[str, str], as_bob: dict[str, str]
) -> None:
    created = {(await add_key(admin_client, as_alice, priority=p))["id"] for p in range(5)}
    await add_key(admin_client, as_bob)

    seen: list[str] = []
    for offset in (0, 2, 4):
        resp = await admin_client.get(f"/keys?limit=2&offset={offset}", headers=as_alice)
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        assert page["total"] == 5
        assert len(page["items"]) == (1 if offset == 4 else 2)
        seen += [k["id"] for k in page["items"]]
    assert len(seen) == 5
    assert set(seen) == created

    # Higher priority first within a service and tier.
    resp = await admin_client.get("/keys?limit=5", headers=as_alice)
    assert [k["priority"] for k in (await resp.json())["items"]] == [4, 3, 2, 1, 0]

    resp = await admin_client.get("/keys?offset=10", headers=as_alice)
    assert await resp.json() == {"items": [], "total": 5}

    for query in ("limit=0", "limit=501", "limit=abc", "offset=-1", "limit=1.5", "limit=%C2%B3"):
        resp = await admin_client.get(f"/keys?{query}", headers=as_alice)
        await assert_error(resp, 422, "validation_error")


async def test_put_changes_fields_and_normalises_quota_period_aliases(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    key = await add_key(admin_client, as_alice, metadata={"quota": 10, "quotaPeriod": "minute"})
    path = f"/keys/{key['id']}"
    resp = await admin_client.put(
        path,
        headers=as_alice,
        json={"name": "renamed", "tier": "free", "priority": 7, "enabled": False},
    )
    assert resp.status == 200, await resp.text()
    updated = await resp.json()
    assert (updated["name"], updated["tier"], updated["priority"], updated["enabled"]) == (
        "renamed",
        "free",
        7,
        False,
    )
    assert updated["metadata"] == {"quota": 10, "quotaPeriod": "minute"}
    assert updated["masked"] == key["masked"]
    assert updated["updated_at"] >= key["updated_at"]

    for alias, period in (
        ("hourly", "hour"),
        ("day", "daily"),
        ("month", "monthly"),
        ("hour", "hour"),
        ("DAILY", "daily"),
    ):
        resp = await admin_client.put(
            path, headers=as_alice, json={"metadata": {"quota": 50, "quotaPeriod": alias}}
        )
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["metadata"] == {"quota": 50, "quotaPeriod": period}

    resp = await admin_client.get(path, headers=as_alice)
    shown = await resp.json()
    assert shown["metadata"] == {"quota": 50, "quotaPeriod": "daily"}
    assert shown["name"] == "renamed"


async def test_create_normalises_quota_period_alias(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    key = await add_key(admin_client, as_alice, metadata={"quota": 5, "quotaPeriod": "month"})
    assert key["metadata"]["quotaPeriod"] == "monthly"


async def test_put_with_a_new_key_replaces_the_secret(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    old, new = openai_secret(), openai_secret()
    key = await add_key(admin_client, as_alice, old, name="rotating")
    resp = await admin_client.put(f"/keys/{key['id']}", headers=as_alice, json={"key": new})
    assert resp.status == 200, await resp.text()
    text = await resp.text()
    assert new not in text
    assert old not in text
    updated = await resp.json()
    assert updated["id"] == key["id"]
    assert updated["name"] == "rotating"
    assert updated["masked"] == f"sk-proj-…{new[-4:]}"
    assert await open_secret(admin_client, key["id"]) == new

    # The old secret is free to be stored again; the new one is now a duplicate.
    await add_key(admin_client, as_alice, old)
    resp = await admin_client.post(
        "/keys", headers=as_alice, json={"key": new, "service": "openai"}
    )
    await assert_error(resp, 409, "conflict")


async def test_put_refuses_a_name_carrying_the_new_secret(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    old, new = openai_secret(), openai_secret()
    key = await add_key(admin_client, as_alice, old)
    resp = await admin_client.put(
        f"/keys/{key['id']}", headers=as_alice, json={"key": new, "name": f"copy of {new}"}
    )
    error = await assert_error(resp, 422, "validation_error")
    assert error["field"] == "name"
    assert new not in await resp.text()
    assert await open_secret(admin_client, key["id"]) == old


async def test_put_with_another_keys_secret_is_a_conflict(
    admin_client: Client, as_alice: dict[str, str], as_bob: dict[str, str]
) -> None:
    bobs_secret = openai_secret()
    await add_key(admin_client, as_bob, bobs_secret)
    mine_secret = openai_secret()
    mine = await add_key(admin_client, as_alice, mine_secret)
    resp = await admin_client.put(
        f"/keys/{mine['id']}", headers=as_alice, json={"key": bobs_secret}
    )
    await assert_error(resp, 409, "conflict")
    assert bobs_secret not in await resp.text()
    assert await open_secret(admin_client, mine["id"]) == mine_secret


async def test_put_cannot_change_the_service(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    key = await add_key(admin_client, as_alice)
    path = f"/keys/{key['id']}"
    error = await assert_error(
        await admin_client.put(path, headers=as_alice, json={"service": "stripe"}),
        422,
        "validation_error",
    )
    assert error["field"] == "service"
    # Naming the current service is harmless.
    resp = await admin_client.put(path, headers=as_alice, json={"service": "openai"})
    assert resp.status == 200, await resp.text()
    resp = await admin_client.get(path, headers=as_alice)
    assert (await resp.json())["service"] == "openai"


async def test_delete_then_gone(admin_client: Client, as_alice: dict[str, str]) -> None:
    key = await add_key(admin_client, as_alice)
    path = f"/keys/{key['id']}"
    resp = await admin_client.delete(path, headers=as_alice)
    assert resp.status == 204
    assert await resp.read() == b""
    await assert_error(await admin_client.get(path, headers=as_alice), 404, "not_found")
    await assert_error(await admin_client.delete(path, headers=as_alice), 404, "not_found")
    await assert_error(
        await admin_client.put(path, headers=as_alice, json={"name": "x"}), 404, "not_found"
    )
    resp = await admin_client.get("/keys", headers=as_alice)
    assert await resp.json() == {"items": [], "total": 0}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tier": "gold"}, "tier"),
        ({"metadata": {"quota": -1}}, "metadata.quota"),
        ({"metadata": {"quota": "many"}}, "metadata.quota"),
        ({"metadata": {"quota": True}}, "metadata.quota"),
        ({"metadata": {"quotaPeriod": "fortnight"}}, "metadata.quotaPeriod"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"metadata": "quota=5"}, "metadata"),
        ({"priority": "high"}, "priority"),
        ({"priority": 10**7}, "priority"),
        ({"enabled": "yes"}, "enabled"),
        ({"name": ""}, "name"),
        ({"owner_id": "00000000-0000-0000-0000-000000000000"}, "owner_id"),
        ({"color": "blue"}, "color"),
    ],
)
async def test_validation_errors_on_create(
    admin_client: Client, as_alice: dict[str, str], body: dict[str, Any], field: str
) -> None:
    secret = openai_secret()
    resp = await admin_client.post(
        "/keys", headers=as_alice, json={"key": secret, "service": "openai", **body}
    )
    error = await assert_error(resp, 422, "validation_error")
    assert error["field"] == field
    assert secret not in await resp.text()
    resp = await admin_client.get("/keys", headers=as_alice)
    assert (await resp.json())["total"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tier": "gold"}, "tier"),
        ({"metadata": {"quota": -5}}, "metadata.quota"),
        ({"metadata": {"quotaPeriod": "yearly"}}, "metadata.quotaPeriod"),
        ({"metadata": 42}, "metadata"),
        ({"status": "exhausted"}, "status"),
        ({"surprise": 1}, "surprise"),
        ({"key": ""}, "key"),
    ],
)
async def test_validation_errors_on_update_change_nothing(
    admin_client: Client, as_alice: dict[str, str], body: dict[str, Any], field: str
) -> None:
    key = await add_key(admin_client, as_alice, tier="free", metadata={"quota": 3})
    path = f"/keys/{key['id']}"
    error = await assert_error(
        await admin_client.put(path, headers=as_alice, json=body), 422, "validation_error"
    )
    assert error["field"] == field
    resp = await admin_client.get(path, headers=as_alice)
    assert await resp.json() == key


@pytest.mark.parametrize(
    "value", ["", "   ", 12345, None, "a\nb" + "c" * 20, "x" * (keys.MAX_SECRET_CHARS + 1)]
)
async def test_bad_secret_is_422(
    admin_client: Client, as_alice: dict[str, str], value: Any
) -> None:
    resp = await admin_client.post(
        "/keys", headers=as_alice, json={"key": value, "service": "openai"}
    )
    error = await assert_error(resp, 422, "validation_error")
    assert error["field"] == "key"


async def test_secret_may_not_hide_in_name_or_metadata(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    secret = openai_secret()
    for extra in ({"name": f"copy {secret}"}, {"metadata": {"note": secret}}):
        resp = await admin_client.post(
            "/keys", headers=as_alice, json={"key": secret, "service": "openai", **extra}
        )
        await assert_error(resp, 422, "validation_error")
        assert secret not in await resp.text()


async def test_body_must_be_a_json_object(admin_client: Client, as_alice: dict[str, str]) -> None:
    resp = await admin_client.post("/keys", headers=as_alice, json=[openai_secret()])
    await assert_error(resp, 422, "validation_error")
    resp = await admin_client.post(
        "/keys",
        headers={**as_alice, "Content-Type": "application/json"},
        data=b'{"key": "sk-',
    )
    await assert_error(resp, 400, "invalid_json")


async def test_keys_need_a_session(admin_client: Client) -> None:
    resp = await admin_client.get("/keys")
    await assert_error(resp, 401, "unauthenticated")
    resp = await admin_client.post("/keys", json={"key": openai_secret()})
    await assert_error(resp, 401, "unauthenticated")
