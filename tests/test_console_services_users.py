"""The console's service and user pages over HTTP: forms that change what the API then sees,
errors beside their field, the ADMIN-only rule, the last-ADMIN rule, and no password or
markup echoed back."""

from __future__ import annotations

import json
from typing import Any

from aiohttp.test_utils import TestClient
from conftest import ADMIN_PASSWORD, USER_PASSWORD, World, login
from consoletools import csrf_in, page, sign_in, submit

from gateway import rkeys

Client = TestClient[Any, Any]

ACME = {
    "slug": "acme",
    "name": "Acme Weather",
    "base_url": "https://api.acme.test/v2/",
    "auth_type": "header",
    "auth_name": "X-Acme-Key",
    "hosts": "api.acme.test\r\nEU.acme.test\r\n",
    "strategy": "round_robin",
    "per_call": "0.002",
    "hold": "",
    "token_prices": "acme-large 1.5 6\r\n* 0.5 2",
}


async def api_get(client: Client, path: str, status: int = 200) -> Any:
    resp = await client.get(path, headers=await login(client))
    assert resp.status == status, await resp.text()
    return await resp.json()


async def create_acme(client: Client, **changes: str) -> None:
    resp = await submit(client, "/ui/services/new", "/ui/services/new", {**ACME, **changes})
    assert resp.status == 303, await resp.text()


async def test_admin_creates_edits_and_deletes_a_service(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    await create_acme(admin_client)
    acme = await api_get(admin_client, "/services/acme")
    assert acme == {
        "slug": "acme",
        "name": "Acme Weather",
        "base_url": "https://api.acme.test/v2",
        "auth": {"type": "header", "name": "X-Acme-Key"},
        "hosts": ["api.acme.test", "eu.acme.test"],
        "builtin": False,
        "strategy": "round_robin",
        "cost_model": {
            "per_call": "0.002",
            "per_million_tokens": {
                "acme-large": {"input": "1.5", "output": "6"},
                "*": {"input": "0.5", "output": "2"},
            },
        },
    }
    listing = await page(admin_client, "/ui/services")
    assert 'href="/ui/services/acme"' in listing
    assert "acme-large" in listing

    form = await page(admin_client, "/ui/services/acme")
    assert 'value="https://api.acme.test/v2"' in form
    prices = form.split('id="f-token_prices"', 1)[1].split(">", 1)[1].split("</textarea>")[0]
    assert sorted(prices.splitlines()) == ["* 0.5 2", "acme-large 1.5 6"]
    edited = {
        **ACME,
        "base_url": "https://api2.acme.test",
        "hosts": "api.acme.test\neu.acme.test",
        "auth_type": "query",
        "auth_name": "apikey",
        "strategy": "weighted",
        "per_call": "",
        "token_prices": "",
    }
    resp = await submit(admin_client, "/ui/services/acme", "/ui/services/acme", edited)
    assert resp.status == 303, await resp.text()
    acme = await api_get(admin_client, "/services/acme")
    assert acme["base_url"] == "https://api2.acme.test"
    assert acme["auth"] == {"type": "query", "name": "apikey"}
    assert acme["strategy"] == "weighted"
    assert acme["cost_model"] is None
    assert acme["hosts"] == ["api.acme.test", "eu.acme.test"]

    audit = await api_get(admin_client, "/audit?action=service.update")
    assert audit["items"][0]["details"]["changed"] == [
        "auth_name",
        "auth_type",
        "base_url",
        "cost_model",
        "strategy",
    ]
    # The same form again changes nothing.
    resp = await submit(admin_client, "/ui/services/acme", "/ui/services/acme", edited)
    assert "Nothing+changed" in resp.headers["Location"]

    confirm = await page(admin_client, "/ui/services/acme/delete")
    assert 'id="service-delete-form"' in confirm
    resp = await submit(admin_client, "/ui/services/acme/delete", "/ui/services/acme/delete", {})
    assert resp.status == 303
    await api_get(admin_client, "/services/acme", 404)


async def test_a_service_change_is_published_to_the_gateways(
    admin_client: Client, redis_client: Any
) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    async with redis_client.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(rkeys.invalidation_channel())
        resp = await submit(
            admin_client,
            "/ui/services/openai",
            "/ui/services/openai",
            {"name": "OpenAI", "base_url": "http://127.0.0.1:9", "auth_type": "bearer"}
            | {"hosts": "api.openai.com", "strategy": "priority"},
        )
        assert resp.status == 303, await resp.text()
        for _ in range(20):  # bounded: the subscription's own replies come first
            message = await pubsub.get_message(timeout=0.5)
            if message is not None:
                break
    assert message is not None
    assert json.loads(message["data"]) == {"kind": "service", "id": "openai"}


async def test_a_validation_error_shows_beside_its_field(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    cases = {
        "base_url": ({"base_url": "ftp://files.acme.test"}, "absolute http:// or https://"),
        "auth_name": ({"auth_name": ""}, "header or query parameter name is required"),
        "per_call": ({"per_call": "cheap"}, "decimal amount"),
        "token_prices": ({"token_prices": "acme-large 1.5"}, "line 1"),
        "slug": ({"slug": "Not A Slug"}, "lower-case letters"),
    }
    for field, (changes, message) in cases.items():
        resp = await submit(admin_client, "/ui/services/new", "/ui/services/new", ACME | changes)
        html = await resp.text()
        assert resp.status == 422, (field, html[:300])
        error = html.split(f'id="e-{field}">', 1)[1].split("</small>", 1)[0]
        assert message in error, (field, error)
        assert 'value="Acme Weather"' in html  # what was typed is kept
    resp = await submit(
        admin_client,
        "/ui/services/new",
        "/ui/services/new",
        ACME | {"token_prices": "acme-large 1.5 lots"},
    )
    assert resp.status == 422
    assert "acme-large.output: must be a decimal amount" in await resp.text()
    await api_get(admin_client, "/services/acme", 404)


async def test_a_claimed_host_or_a_taken_slug_is_a_conflict_beside_its_field(
    admin_client: Client,
) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    resp = await submit(
        admin_client,
        "/ui/services/new",
        "/ui/services/new",
        ACME | {"hosts": "api.acme.test\nAPI.openai.com"},
    )
    assert resp.status == 409
    html = await resp.text()
    assert "already claimed by service" in html.split('id="e-hosts">', 1)[1].split("</small>")[0]
    assert "api.acme.test\nAPI.openai.com</textarea>" in html
    resp = await submit(
        admin_client, "/ui/services/new", "/ui/services/new", ACME | {"slug": "stripe"}
    )
    assert resp.status == 409
    assert "exists" in (await resp.text()).split('id="e-slug">', 1)[1].split("</small>")[0]
    # Editing too.
    await create_acme(admin_client)
    resp = await submit(
        admin_client, "/ui/services/acme", "/ui/services/acme", ACME | {"hosts": "api.stripe.com"}
    )
    assert resp.status == 409
    assert 'id="e-hosts"' in await resp.text()
    assert (await api_get(admin_client, "/services/acme"))["hosts"] == [
        "api.acme.test",
        "eu.acme.test",
    ]


async def test_a_built_in_service_cannot_be_deleted(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    resp = await submit(
        admin_client, "/ui/services/stripe/delete", "/ui/services/stripe/delete", {}
    )
    assert resp.status == 409
    assert "cannot be deleted" in await resp.text()
    await api_get(admin_client, "/services/stripe")


async def test_a_user_sees_services_but_changes_none(admin_client: Client) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    listing = await page(admin_client, "/ui/services")
    assert '<table id="services">' in listing
    assert "api.openweathermap.org" in listing
    assert "/ui/services/new" not in listing
    assert 'href="/ui/services/stripe' not in listing
    token = csrf_in(listing)
    for path in ("/ui/services/new", "/ui/services/stripe", "/ui/services/stripe/delete"):
        await page(admin_client, path, 403)
    posts = {
        "/ui/services/new": ACME,
        "/ui/services/stripe": {**ACME, "base_url": "https://evil.test"},
        "/ui/services/stripe/delete": {},
    }
    for path, data in posts.items():
        resp = await admin_client.post(path, data={"csrf": token, **data}, allow_redirects=False)
        assert resp.status == 403, path
        assert "ADMIN" in await resp.text()
    await api_get(admin_client, "/services/acme", 404)
    assert (await api_get(admin_client, "/services/stripe"))["base_url"] == "https://api.stripe.com"


async def test_a_post_without_csrf_is_refused(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    resp = await admin_client.post("/ui/services/new", data=ACME, allow_redirects=False)
    assert resp.status == 403
    resp = await admin_client.post(
        "/ui/users/new",
        data={"username": "mallory", "password": "mallory-password-1", "role": "ADMIN"},
        allow_redirects=False,
    )
    assert resp.status == 403
    await api_get(admin_client, "/services/acme", 404)
    names = [u["username"] for u in (await api_get(admin_client, "/users"))["items"]]
    assert "mallory" not in names


async def test_markup_is_escaped(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    await create_acme(admin_client, name="<script>alert(1)</script>")
    for path in ("/ui/services", "/ui/services/acme", "/ui/services/acme/delete"):
        html = await page(admin_client, path)
        assert "<script>alert" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    resp = await submit(
        admin_client,
        "/ui/users/new",
        "/ui/users/new",
        {"username": '"><b>x</b>', "password": "a-long-enough-password", "role": "USER"},
    )
    assert resp.status == 422
    html = await resp.text()
    assert "<b>x</b>" not in html
    assert "&#34;&gt;&lt;b&gt;x&lt;/b&gt;" in html


async def test_admin_creates_a_user_who_can_sign_in(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    form = await page(admin_client, "/ui/users/new")
    assert 'id="user-form"' in form
    resp = await submit(
        admin_client,
        "/ui/users/new",
        "/ui/users/new",
        {"username": "carol", "password": "carol-password-123", "role": "USER", "tier": "pro"},
    )
    assert resp.status == 303, await resp.text()
    users = (await api_get(admin_client, "/users"))["items"]
    carol = next(u for u in users if u["username"] == "carol")
    assert (carol["role"], carol["tier"], carol["enabled"]) == ("USER", "pro", True)
    listing = await page(admin_client, "/ui/users")
    assert f'href="/ui/users/{carol["id"]}">carol</a>' in listing
    assert "carol-password-123" not in listing
    assert "argon2" not in listing

    resp = await submit(admin_client, "/ui/users", "/ui/logout", {})
    await sign_in(admin_client, "carol", "carol-password-123")
    assert "carol" in await page(admin_client, "/ui/")


async def test_a_typed_password_is_never_shown_again(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    secret = "typed-secret-password-42"
    for data in (
        {"username": "x", "password": secret, "role": "USER"},  # username too short
        {"username": "alice", "password": secret, "role": "USER"},  # taken
        {"username": "dave", "password": secret, "role": "ROOT"},
    ):
        resp = await submit(admin_client, "/ui/users/new", "/ui/users/new", data)
        assert resp.status in (409, 422)
        html = await resp.text()
        assert secret not in html
        assert 'class="error"' in html
    resp = await submit(
        admin_client,
        "/ui/users/new",
        "/ui/users/new",
        {"username": "alice", "password": secret, "role": "USER"},
    )
    assert resp.status == 409
    assert "is taken" in (await resp.text()).split('id="e-username">', 1)[1]


async def test_password_reset(admin_client: Client, world: World) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    path = f"/ui/users/{world.other_user_id}"
    html = await page(admin_client, path)
    assert 'name="new_password"' in html
    assert 'name="current_password"' not in html
    resp = await submit(admin_client, path, path, {"new_password": "short"})
    assert resp.status == 422
    assert 'id="e-new_password"' in await resp.text()
    resp = await submit(admin_client, path, path, {"new_password": "bobs-brand-new-password"})
    assert resp.status == 303, await resp.text()

    refused = await admin_client.post(
        "/auth/login", json={"username": "bob", "password": USER_PASSWORD}
    )
    assert refused.status == 401
    await login(admin_client, "bob", "bobs-brand-new-password")


async def test_own_password_needs_the_current_one(admin_client: Client, world: World) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    path = f"/ui/users/{world.admin_id}"
    assert 'name="current_password"' in await page(admin_client, path)
    data = {"current_password": "not-my-password", "new_password": "admins-new-password"}
    resp = await submit(admin_client, path, path, data)
    assert resp.status == 422
    html = await resp.text()
    assert "is wrong" in html.split('id="e-current_password">', 1)[1]
    assert "not-my-password" not in html
    assert "admins-new-password" not in html
    await login(admin_client, "admin", ADMIN_PASSWORD)


async def test_admin_edits_role_status_tier_and_budget(admin_client: Client, world: World) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    path = f"/ui/users/{world.user_id}"
    data = {"role": "USER", "enabled": "off", "tier": "pro", "budget": "12.50"}
    resp = await submit(admin_client, path, path, {**data, "budget_period": "daily"})
    assert resp.status == 303, await resp.text()
    alice = await api_get(admin_client, f"/users/{world.user_id}")
    assert alice["enabled"] is False
    assert alice["tier"] == "pro"
    assert alice["budget"] == {"amount": "12.5", "period": "daily"}
    html = await page(admin_client, path)
    assert 'id="f-enabled" value="on">' in html  # unchecked
    refused = await admin_client.post(
        "/auth/login", json={"username": "alice", "password": USER_PASSWORD}
    )
    assert refused.status == 401

    # Checked again, the default tier, no budget; a bad budget first.
    data = {"role": "USER", "enabled": "on", "tier": "", "budget": "-1"}
    resp = await submit(admin_client, path, path, {**data, "budget_period": "monthly"})
    assert resp.status == 422
    assert 'id="e-budget"' in await resp.text()
    resp = await submit(
        admin_client, path, path, {**data, "budget": "", "budget_period": "monthly"}
    )
    assert resp.status == 303
    alice = await api_get(admin_client, f"/users/{world.user_id}")
    assert (alice["enabled"], alice["tier"], alice["budget"]) == (True, "free", None)


async def test_the_last_admin_stays(admin_client: Client, world: World) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    path = f"/ui/users/{world.admin_id}"
    for data in (
        {"role": "USER", "enabled": "on"},
        {"role": "ADMIN", "enabled": "off"},
    ):
        resp = await submit(admin_client, path, path, {**data, "tier": "", "budget": ""})
        assert resp.status == 409
        assert "last active ADMIN cannot be disabled, demoted or deleted" in await resp.text()
    resp = await submit(admin_client, f"{path}/delete", f"{path}/delete", {})
    assert resp.status == 409
    assert "last active ADMIN" in await resp.text()
    me = await api_get(admin_client, f"/users/{world.admin_id}")
    assert (me["role"], me["enabled"]) == ("ADMIN", True)


async def test_admin_deletes_a_user(admin_client: Client, world: World) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    path = f"/ui/users/{world.other_user_id}/delete"
    assert 'id="user-delete-form"' in await page(admin_client, path)
    resp = await submit(admin_client, path, path, {})
    assert resp.status == 303
    await api_get(admin_client, f"/users/{world.other_user_id}", 404)


async def test_users_pages_are_for_admins_only(admin_client: Client, world: World) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    token = csrf_in(await page(admin_client, "/ui/"))
    assert "/ui/users" not in await page(admin_client, "/ui/services")
    for path in ("/ui/users", "/ui/users/new", f"/ui/users/{world.admin_id}"):
        await page(admin_client, path, 403)
    await page(admin_client, f"/ui/users/{world.admin_id}/delete", 403)
    posts = {
        "/ui/users/new": {"username": "eve", "password": "eve-password-123", "role": "ADMIN"},
        f"/ui/users/{world.user_id}": {"role": "ADMIN"},
        f"/ui/users/{world.admin_id}": {"new_password": "taken-over-password"},
        f"/ui/users/{world.other_user_id}/delete": {},
    }
    for path, data in posts.items():
        resp = await admin_client.post(path, data={"csrf": token, **data}, allow_redirects=False)
        assert resp.status == 403, path
    me = await api_get(admin_client, f"/users/{world.user_id}")
    assert me["role"] == "USER"
    await login(admin_client, "admin", ADMIN_PASSWORD)
    await login(admin_client, "bob", USER_PASSWORD)
