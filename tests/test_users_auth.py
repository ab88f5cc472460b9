"""Login, JWT sessions and `/users` through the running admin app: throttling, sessions that
end at once when an account changes, the last-admin rule, and self-service passwords."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from conftest import ADMIN_PASSWORD, USER_PASSWORD, login

from admin import auth
from gateway import users
from gateway.appkeys import POOL
from gateway.settings import Settings
from tests.conftest import assert_error

Client = TestClient[Any, Any]


async def assert_unauthenticated(resp: ClientResponse) -> None:
    await assert_error(resp, 401, "unauthenticated")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def post_login(client: Client, username: str, password: str) -> ClientResponse:
    return await client.post("/auth/login", json={"username": username, "password": password})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_login_returns_token_expiry_and_user(admin_client: Client, world: Any) -> None:
    before = int(time.time())
    resp = await post_login(admin_client, "admin", ADMIN_PASSWORD)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"token", "expires_at", "user"}
    assert body["user"] == {"id": world.admin_id, "username": "admin", "role": "ADMIN"}
    assert ADMIN_PASSWORD not in await resp.text()

    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert {"sub", "role", "exp", "iat", "jti"} <= set(claims)
    assert claims["sub"] == world.admin_id
    assert claims["role"] == "ADMIN"
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] > claims["iat"]
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert expires_at.tzinfo is not None
    assert int(expires_at.timestamp()) == claims["exp"]

    again = await (await post_login(admin_client, "admin", ADMIN_PASSWORD)).json()
    assert jwt.decode(again["token"], options={"verify_signature": False})["jti"] != claims["jti"]

    resp = await admin_client.get("/users/me", headers=bearer(body["token"]))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["username"] == "admin"


async def test_login_is_case_insensitive_on_username(admin_client: Client, world: Any) -> None:
    resp = await post_login(admin_client, "Alice", USER_PASSWORD)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["user"]["id"] == world.user_id


@pytest.mark.parametrize(
    ("username", "password"),
    [("admin", "wrong-password-123"), ("nobody", ADMIN_PASSWORD), ("alice", ADMIN_PASSWORD)],
)
async def test_wrong_credentials_are_401(
    admin_client: Client, username: str, password: str
) -> None:
    resp = await post_login(admin_client, username, password)
    error = await assert_error(resp, 401, "unauthenticated")
    assert error["message"] == "wrong username or password"
    assert password not in await resp.text()


@pytest.mark.parametrize(
    "body",
    [{"username": "admin"}, {"password": "x" * 12}, {"username": "", "password": "x" * 12}],
)
async def test_login_needs_both_fields(admin_client: Client, body: dict[str, Any]) -> None:
    resp = await admin_client.post("/auth/login", json=body)
    await assert_error(resp, 422, "validation_error")


async def test_five_failures_lock_the_username(admin_client: Client, world: Any) -> None:
    for attempt in range(5):
        # Case does not give an attacker fresh attempts.
        name = "alice" if attempt % 2 else "ALICE"
        resp = await post_login(admin_client, name, "not-the-password")
        await assert_error(resp, 401, "unauthenticated")
    resp = await post_login(admin_client, "alice", USER_PASSWORD)
    error = await assert_error(resp, 429, "too_many_requests")
    assert error["message"]
    retry_after = resp.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= auth.FAILURE_WINDOW_S

    # Another username is not locked out by alice's failures.
    resp = await post_login(admin_client, "bob", USER_PASSWORD)
    assert resp.status == 200, await resp.text()


async def test_a_success_resets_the_failure_count(admin_client: Client, world: Any) -> None:
    for _ in range(4):
        resp = await post_login(admin_client, "alice", "nope-nope-nope")
        await assert_error(resp, 401, "unauthenticated")
    assert (await post_login(admin_client, "alice", USER_PASSWORD)).status == 200
    for _ in range(4):
        resp = await post_login(admin_client, "alice", "nope-nope-nope")
        await assert_error(resp, 401, "unauthenticated")
    assert (await post_login(admin_client, "alice", USER_PASSWORD)).status == 200


async def test_disabled_user_session_ends_at_once(
    admin_client: Client, as_admin: dict[str, str], as_alice: dict[str, str], world: Any
) -> None:
    assert (await admin_client.get("/keys", headers=as_alice)).status == 200
    resp = await admin_client.put(
        f"/users/{world.user_id}", headers=as_admin, json={"enabled": False}
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["enabled"] is False

    await assert_unauthenticated(await admin_client.get("/keys", headers=as_alice))
    await assert_unauthenticated(await post_login(admin_client, "alice", USER_PASSWORD))

    resp = await admin_client.put(
        f"/users/{world.user_id}", headers=as_admin, json={"enabled": True}
    )
    assert resp.status == 200
    assert (await admin_client.get("/keys", headers=as_alice)).status == 200


async def test_deleted_user_session_ends(
    admin_client: Client, as_admin: dict[str, str], as_alice: dict[str, str], world: Any
) -> None:
    resp = await admin_client.delete(f"/users/{world.user_id}", headers=as_admin)
    assert resp.status == 204
    await assert_unauthenticated(await admin_client.get("/keys", headers=as_alice))
    await assert_error(
        await admin_client.get(f"/users/{world.user_id}", headers=as_admin), 404, "not_found"
    )
    await assert_unauthenticated(await post_login(admin_client, "alice", USER_PASSWORD))


async def test_promotion_and_demotion_take_effect_at_once(
    admin_client: Client, as_admin: dict[str, str], as_bob: dict[str, str], world: Any
) -> None:
    await assert_error(await admin_client.get("/users", headers=as_bob), 403, "forbidden")
    resp = await admin_client.put(
        f"/users/{world.other_user_id}", headers=as_admin, json={"role": "ADMIN"}
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["role"] == "ADMIN"
    # Bob's JWT still says USER; the database decides.
    assert (await admin_client.get("/users", headers=as_bob)).status == 200

    resp = await admin_client.put(
        f"/users/{world.other_user_id}", headers=as_admin, json={"role": "USER"}
    )
    assert resp.status == 200, await resp.text()
    await assert_error(await admin_client.get("/users", headers=as_bob), 403, "forbidden")


async def test_last_active_admin_is_kept(
    admin_client: Client, as_admin: dict[str, str], world: Any
) -> None:
    path = f"/users/{world.admin_id}"
    await assert_error(
        await admin_client.put(path, headers=as_admin, json={"enabled": False}), 409, "conflict"
    )
    await assert_error(
        await admin_client.put(path, headers=as_admin, json={"role": "USER"}), 409, "conflict"
    )
    await assert_error(await admin_client.delete(path, headers=as_admin), 409, "conflict")
    await assert_error(
        await admin_client.put("/users/me", headers=as_admin, json={"role": "USER"}),
        409,
        "conflict",
    )

    # A disabled second admin does not count as active.
    bob = f"/users/{world.other_user_id}"
    resp = await admin_client.put(bob, headers=as_admin, json={"role": "ADMIN", "enabled": False})
    assert resp.status == 200, await resp.text()
    await assert_error(await admin_client.delete(path, headers=as_admin), 409, "conflict")

    shown = await (await admin_client.get(path, headers=as_admin)).json()
    assert shown["role"] == "ADMIN"
    assert shown["enabled"] is True

    # With a second active admin, the first may step down.
    resp = await admin_client.put(bob, headers=as_admin, json={"enabled": True})
    assert resp.status == 200
    resp = await admin_client.put(path, headers=as_admin, json={"role": "USER"})
    assert resp.status == 200, await resp.text()
    await assert_error(await admin_client.get("/users", headers=as_admin), 403, "forbidden")


async def test_create_user_and_log_in(admin_client: Client, as_admin: dict[str, str]) -> None:
    password = "carol-password-long"
    resp = await admin_client.post(
        "/users", headers=as_admin, json={"username": "carol", "password": password}
    )
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["username"] == "carol"
    assert created["role"] == "USER"
    assert created["enabled"] is True
    assert "password" not in created
    assert "password_hash" not in created
    assert password not in await resp.text()

    resp = await post_login(admin_client, "carol", password)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["user"] == {"id": created["id"], "username": "carol", "role": "USER"}

    resp = await admin_client.get("/users", headers=as_admin)
    listing = await resp.json()
    assert listing["total"] == 4
    assert "carol" in {u["username"] for u in listing["items"]}
    assert password not in await resp.text()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "carol", "password": "short"}, "password"),
        ({"username": "carol", "password": 123456789012}, "password"),
        ({"username": "carol"}, "password"),
        ({"username": "carol", "password": "long-enough-pw", "role": "ROOT"}, "role"),
        ({"username": "carol", "password": "long-enough-pw", "role": "admin"}, "role"),
        ({"username": "c", "password": "long-enough-pw"}, "username"),
        ({"username": "carol smith", "password": "long-enough-pw"}, "username"),
        ({"username": "carol\n", "password": "long-enough-pw"}, "username"),
        ({"password": "long-enough-pw"}, "username"),
        ({"username": "carol", "password": "long-enough-pw", "enabled": False}, "enabled"),
    ],
)
async def test_create_user_validation(
    admin_client: Client, as_admin: dict[str, str], body: dict[str, Any], field: str
) -> None:
    resp = await admin_client.post("/users", headers=as_admin, json=body)
    error = await assert_error(resp, 422, "validation_error")
    assert error["field"] == field
    resp = await admin_client.get("/users", headers=as_admin)
    assert (await resp.json())["total"] == 3


@pytest.mark.parametrize("username", ["alice", "ALICE", "admin"])
async def test_duplicate_username_is_409(
    admin_client: Client, as_admin: dict[str, str], username: str
) -> None:
    resp = await admin_client.post(
        "/users", headers=as_admin, json={"username": username, "password": "another-password"}
    )
    await assert_error(resp, 409, "conflict")
    # The existing account is untouched.
    assert (await post_login(admin_client, "alice", USER_PASSWORD)).status == 200


async def test_user_cannot_manage_users(
    admin_client: Client, as_alice: dict[str, str], world: Any
) -> None:
    await assert_error(await admin_client.get("/users", headers=as_alice), 403, "forbidden")
    await assert_error(
        await admin_client.post(
            "/users", headers=as_alice, json={"username": "eve", "password": "eve-password-123"}
        ),
        403,
        "forbidden",
    )
    await assert_error(
        await admin_client.put(f"/users/{world.user_id}", headers=as_alice, json={"role": "ADMIN"}),
        403,
        "forbidden",
    )
    await assert_error(
        await admin_client.delete(f"/users/{world.other_user_id}", headers=as_alice),
        403,
        "forbidden",
    )
    resp = await admin_client.get("/users/me", headers=as_alice)
    assert resp.status == 200
    assert (await resp.json())["role"] == "USER"
    await assert_error(
        await admin_client.get(f"/users/{world.other_user_id}", headers=as_alice),
        404,
        "not_found",
    )


async def test_change_own_password_ends_older_sessions(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    new_password = "alice-new-password-2"
    # JWT `iat` has whole-second resolution; move past the second the session began in.
    await asyncio.sleep(1.1)

    resp = await admin_client.put(
        "/users/me/password",
        headers=as_alice,
        json={"current_password": "not-my-password", "new_password": new_password},
    )
    await assert_error(resp, 403, "forbidden")
    resp = await admin_client.put(
        "/users/me/password",
        headers=as_alice,
        json={"current_password": USER_PASSWORD, "new_password": "short"},
    )
    await assert_error(resp, 422, "validation_error")
    resp = await admin_client.put(
        "/users/me/password", headers=as_alice, json={"new_password": new_password}
    )
    await assert_error(resp, 422, "validation_error")
    assert (await admin_client.get("/keys", headers=as_alice)).status == 200

    resp = await admin_client.put(
        "/users/me/password",
        headers=as_alice,
        json={"current_password": USER_PASSWORD, "new_password": new_password},
    )
    assert resp.status == 204, await resp.text()

    await assert_unauthenticated(await admin_client.get("/keys", headers=as_alice))
    await assert_unauthenticated(await post_login(admin_client, "alice", USER_PASSWORD))
    fresh = await login(admin_client, "alice", new_password)
    assert (await admin_client.get("/keys", headers=fresh)).status == 200


async def test_user_cannot_change_another_users_password(
    admin_client: Client, as_alice: dict[str, str], world: Any
) -> None:
    resp = await admin_client.put(
        f"/users/{world.other_user_id}/password",
        headers=as_alice,
        json={"current_password": USER_PASSWORD, "new_password": "bob-is-mine-now"},
    )
    await assert_error(resp, 404, "not_found")
    assert (await post_login(admin_client, "bob", USER_PASSWORD)).status == 200


async def test_admin_resets_a_password_without_the_current_one(
    admin_client: Client, as_admin: dict[str, str], world: Any
) -> None:
    resp = await admin_client.put(
        f"/users/{world.user_id}/password",
        headers=as_admin,
        json={"new_password": "reset-by-admin-1"},
    )
    assert resp.status == 204, await resp.text()
    assert (await post_login(admin_client, "alice", "reset-by-admin-1")).status == 200
    await assert_unauthenticated(await post_login(admin_client, "alice", USER_PASSWORD))


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer   "},
        {"Authorization": "Bearer not.a.jwt"},
        {"Authorization": "Bearer garbage"},
        {"Authorization": "Basic YWRtaW46eA=="},
        {"Authorization": "Token abc"},
    ],
)
async def test_missing_or_garbage_bearer_is_401(
    admin_client: Client, headers: dict[str, str]
) -> None:
    for path in ("/keys", "/users", "/tokens", "/services", "/users/me"):
        await assert_unauthenticated(await admin_client.get(path, headers=headers))


def craft(settings: Settings, world: Any, secret: str | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "sub": world.admin_id,
        "role": "ADMIN",
        "iat": now,
        "exp": now + 600,
        "jti": "0" * 32,
        "aud": auth.AUDIENCE,
        "iss": auth.ISSUER,
        **claims,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret or settings.jwt_secret.reveal(), algorithm="HS256")


async def test_crafted_tokens_are_checked(
    admin_client: Client, settings: Settings, world: Any
) -> None:
    # A correctly signed token is accepted: the refusals below are about the one change each.
    assert (await admin_client.get("/users", headers=bearer(craft(settings, world)))).status == 200

    now = int(time.time())
    refused = [
        craft(settings, world, iat=now - 120, exp=now - 60),  # expired
        craft(settings, world, secret="another-secret-of-at-least-32-chars!"),
        craft(settings, world, aud="someone-else"),
        craft(settings, world, iss="someone-else"),
        craft(settings, world, jti=None),
        craft(settings, world, sub="not-a-uuid"),
        craft(settings, world, sub="00000000-0000-4000-8000-000000000000"),
        jwt.encode(
            {"sub": world.admin_id, "exp": now + 600, "iat": now, "jti": "x"},
            key=None,
            algorithm="none",
        ),
    ]
    for token in refused:
        await assert_unauthenticated(await admin_client.get("/users", headers=bearer(token)))


async def test_expired_session_is_401(admin_client: Client, settings: Settings, world: Any) -> None:
    assert admin_client.app is not None
    async with admin_client.app[POOL].acquire() as conn:
        user = await users.get_user(conn, world.user_id)
    live, _ = auth.issue_token(settings.jwt_secret, user, 60)
    assert (await admin_client.get("/keys", headers=bearer(live))).status == 200
    # Issued by the app's own code, with a lifetime that ended a minute ago.
    expired, expires_at = auth.issue_token(settings.jwt_secret, user, -60)
    assert expires_at < datetime.now(UTC)
    resp = await admin_client.get("/keys", headers=bearer(expired))
    await assert_unauthenticated(resp)
    assert "expired" in (await resp.json())["error"]["message"]
