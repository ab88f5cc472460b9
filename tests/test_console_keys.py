"""The console's key pages over HTTP: list, filters and pages; add (explicit service, format
detection, the ambiguous/unknown case); edit; rotate; disable/enable; delete after a
confirmation; a USER kept to their own keys; CSRF; escaping; and no secret in any page."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from pathlib import Path
from typing import Any

import jinja2
import pytest
from aiohttp.test_utils import TestClient
from conftest import ADMIN_PASSWORD, USER_PASSWORD
from consoletools import page, sign_in, submit

from admin.console import keys as console_keys
from admin.console.keys import choose_message
from gateway import keys, rkeys
from gateway.appkeys import POOL, VAULT

Client = TestClient[Any, Any]

KEY_LINK = re.compile(r'<a href="/ui/keys/([0-9a-f-]{36})">')
DETAIL = re.compile(r"^/ui/keys/([0-9a-f-]{36})(\?|$)")


def openai_secret() -> str:
    return "sk-proj-" + secrets.token_hex(20)


def stripe_secret() -> str:
    return "sk_test_" + secrets.token_hex(12)


def unknown_secret() -> str:
    return "no-known-format-" + secrets.token_hex(12)


async def api_key(
    client: Client, headers: dict[str, str], secret: str | None = None, **fields: Any
) -> dict[str, Any]:
    body = {"key": secret or openai_secret(), "service": "openai", **fields}
    resp = await client.post("/keys", headers=headers, json=body)
    assert resp.status == 201, await resp.text()
    key: dict[str, Any] = await resp.json()
    return key


async def api_get(client: Client, headers: dict[str, str], key_id: str) -> dict[str, Any]:
    resp = await client.get(f"/keys/{key_id}", headers=headers)
    assert resp.status == 200, await resp.text()
    key: dict[str, Any] = await resp.json()
    return key


async def stored_secret(client: Client, key_id: str) -> str:
    assert client.app is not None
    async with client.app[POOL].acquire() as conn:
        return (await keys.open_secret(conn, client.app[VAULT], key_id)).reveal()


def table_ids(html: str) -> list[str]:
    """The key ids linked from the rows of <table id="keys">, in order."""
    table = html.split('<table id="keys">', 1)[1].split("</table>", 1)[0]
    return KEY_LINK.findall(table)


def added_id(location: str) -> str:
    found = DETAIL.match(location)
    assert found is not None, location
    return found[1]


async def test_list_filters_and_pages_show_only_own_keys_masked(
    admin_client: Client, as_alice: dict[str, str], as_bob: dict[str, str]
) -> None:
    made: dict[str, dict[str, Any]] = {}
    plaintexts = []
    for i in range(30):
        secret = stripe_secret() if i % 3 == 0 else openai_secret()
        plaintexts.append(secret)
        key = await api_key(
            admin_client,
            as_alice,
            secret,
            service="stripe" if i % 3 == 0 else "openai",
            tier="free" if i % 2 else "paid",
            name=f"alice key {i:02d}",
        )
        made[key["id"]] = key
    bobs = await api_key(admin_client, as_bob, name="bob's only key")
    await sign_in(admin_client, "alice", USER_PASSWORD)

    first = await page(admin_client, "/ui/keys")
    assert len(table_ids(first)) == 25
    assert "1–25 of 30" in first
    assert 'href="?offset=25" rel="next"' in first  # no filters: no stray "&"
    second = await page(admin_client, "/ui/keys?offset=25")
    assert len(table_ids(second)) == 5
    assert set(table_ids(first) + table_ids(second)) == set(made)
    assert 'rel="prev"' in second
    assert 'rel="next"' not in second
    for html in (first, second):
        assert "bob&#39;s only key" not in html
        assert bobs["id"] not in html
        assert not any(secret in html for secret in plaintexts)
    some = next(iter(made.values()))
    assert some["masked"] in first + second

    stripe_page = await page(admin_client, "/ui/keys?service=stripe")
    assert set(table_ids(stripe_page)) == {k for k, v in made.items() if v["service"] == "stripe"}
    assert len(table_ids(stripe_page)) == 10
    free_ai = await page(admin_client, "/ui/keys?service=openai&tier=free")
    assert set(table_ids(free_ai)) == {
        k for k, v in made.items() if v["service"] == "openai" and v["tier"] == "free"
    }
    # Paging keeps the filters.
    paid = await page(admin_client, "/ui/keys?tier=paid")
    assert "of 15" in paid
    assert 'rel="next"' not in paid

    assert admin_client.app is not None
    invalid_id = next(iter(made))
    async with admin_client.app[POOL].acquire() as conn:
        await conn.execute(
            "UPDATE api_keys SET status = 'invalid' WHERE id = $1", uuid.UUID(invalid_id)
        )
    assert table_ids(await page(admin_client, "/ui/keys?status=invalid")) == [invalid_id]
    assert table_ids(await page(admin_client, "/ui/keys?status=cooldown")) == []

    wrong = await page(admin_client, "/ui/keys?tier=gold")
    assert 'id="e-tier"' in wrong
    assert table_ids(wrong) == []


async def test_pager_links_keep_the_filters(admin_client: Client, as_alice: dict[str, str]) -> None:
    for _ in range(26):
        await api_key(admin_client, as_alice, tier="free")
    await api_key(admin_client, as_alice, tier="paid")
    await sign_in(admin_client, "alice", USER_PASSWORD)
    html = await page(admin_client, "/ui/keys?tier=free")
    assert "1–25 of 26" in html
    assert 'href="?tier=free&amp;offset=25" rel="next"' in html
    assert len(table_ids(await page(admin_client, "/ui/keys?tier=free&offset=25"))) == 1


async def test_add_with_an_explicit_service(admin_client: Client, as_alice: dict[str, str]) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    form = await page(admin_client, "/ui/keys/new")
    assert 'id="key-form"' in form
    assert "Detect from the key&#39;s format" in form
    secret = stripe_secret()
    resp = await submit(
        admin_client,
        "/ui/keys/new",
        "/ui/keys/new",
        {
            "key": secret,
            "service": "stripe",
            "tier": "free",
            "name": "billing",
            "priority": "7",
            "enabled": "on",
            "metadata": '{"type": "payments", "quota": 50, "quotaPeriod": "hourly"}',
        },
    )
    assert resp.status == 303, await resp.text()
    key_id = added_id(resp.headers["Location"])
    key = await api_get(admin_client, as_alice, key_id)
    assert (key["service"], key["tier"], key["name"], key["priority"], key["enabled"]) == (
        "stripe",
        "free",
        "billing",
        7,
        True,
    )
    assert key["metadata"] == {"type": "payments", "quota": 50, "quotaPeriod": "hour"}
    assert await stored_secret(admin_client, key_id) == secret

    detail = await page(admin_client, resp.headers["Location"])
    assert secret not in detail
    assert key["masked"] in detail
    assert "50 requests per window (hour, UTC)" in detail
    assert '<a href="/ui/keys?service=stripe">stripe</a>' in detail
    assert "Key added to stripe." in detail


async def test_add_detects_the_service_from_the_format_with_defaults(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    secret = openai_secret()
    resp = await submit(
        admin_client,
        "/ui/keys/new",
        "/ui/keys/new",
        {"key": secret, "service": "", "tier": "paid", "name": "", "priority": "", "metadata": ""},
    )
    assert resp.status == 303, await resp.text()
    key = await api_get(admin_client, as_alice, added_id(resp.headers["Location"]))
    assert key["service"] == "openai"
    assert key["name"] == f"openai {key['masked']}"
    assert key["priority"] == 0
    assert key["enabled"] is False  # the checkbox was not sent
    assert key["metadata"] == {}


async def test_unknown_format_asks_for_the_service_without_echoing_the_key(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    secret = unknown_secret()
    resp = await submit(
        admin_client,
        "/ui/keys/new",
        "/ui/keys/new",
        {
            "key": secret,
            "service": "",
            "tier": "free",
            "name": "kept name",
            "priority": "3",
            "enabled": "on",
            "metadata": '{"quota": 5}',
        },
    )
    assert resp.status == 422
    html = await resp.text()
    assert secret not in html
    error = html.split('id="e-service">', 1)[1].split("</small>", 1)[0]
    assert error == "The key&#39;s format does not say which service it is for: choose one."
    assert "`service`" not in html  # the API's wording stays the API's
    # The select now offers the candidates (every service), no longer "detect".
    options = html.split('id="f-service">', 1)[1].split("</select>", 1)[0]
    assert "Detect" not in options
    assert "Choose the key" in options
    for slug in ("stripe", "openai", "openweather", "googlemaps"):
        assert f'value="{slug}"' in options
    assert 'name="key" id="f-key" type="password" value=""' in html
    assert "not shown again" in html
    assert 'value="kept name"' in html
    assert 'value="3"' in html
    assert "{&#34;quota&#34;: 5}" in html
    resp = await admin_client.get("/keys", headers=as_alice)
    assert (await resp.json())["total"] == 0

    # Choosing one of the offered services then stores it.
    resp = await submit(
        admin_client, "/ui/keys/new", "/ui/keys/new", {"key": secret, "service": "openweather"}
    )
    assert resp.status == 303, await resp.text()
    key = await api_get(admin_client, as_alice, added_id(resp.headers["Location"]))
    assert key["service"] == "openweather"


async def test_form_errors_never_echo_the_key_from_any_field(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    secret = openai_secret()
    cases = [
        ({"name": f"copy of {secret}"}, "name"),
        ({"metadata": json.dumps({"note": secret})}, "metadata"),
        ({"metadata": json.dumps({"quota": -1, "note": secret})}, "metadata"),
        ({"metadata": "{quota: 5"}, "metadata"),
        ({"priority": "lots"}, "priority"),
        ({"tier": "gold"}, "tier"),
        ({"service": "nope"}, "service"),
    ]
    for fields, field in cases:
        data = {"key": secret, "service": "openai", "tier": "paid", "name": "n", **fields}
        resp = await submit(admin_client, "/ui/keys/new", "/ui/keys/new", data)
        html = await resp.text()
        assert resp.status == 422, (fields, html[:300])
        assert f'id="e-{field}"' in html, fields
        assert secret not in html, fields
    data = {"key": secret, "service": "openai", "metadata": '{"quota": -1}'}
    html = await (await submit(admin_client, "/ui/keys/new", "/ui/keys/new", data)).text()
    assert "quota: must be a whole number" in html.split('id="e-metadata">')[1]
    assert (await (await admin_client.get("/keys", headers=as_alice)).json())["total"] == 0

    # A key already in the wallet: 409, next to the key field, still not echoed.
    await api_key(admin_client, as_alice, secret)
    resp = await submit(
        admin_client, "/ui/keys/new", "/ui/keys/new", {"key": secret, "service": "openai"}
    )
    html = await resp.text()
    assert resp.status == 409
    assert "already stored" in html.split('id="e-key">')[1]
    assert secret not in html


async def test_edit_changes_the_metadata_fields(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    key = await api_key(admin_client, as_alice, name="before", metadata={"quota": 10})
    await sign_in(admin_client, "alice", USER_PASSWORD)
    detail = f"/ui/keys/{key['id']}"
    html = await page(admin_client, detail)
    assert 'id="key-edit-form"' in html
    assert 'value="before"' in html
    resp = await submit(
        admin_client,
        detail,
        detail,
        {
            "name": "after",
            "tier": "free",
            "priority": "-4",
            "metadata": '{"quota": 20, "quotaPeriod": "month", "type": "chat"}',
        },
    )
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"].startswith(detail)
    changed = await api_get(admin_client, as_alice, key["id"])
    assert (changed["name"], changed["tier"], changed["priority"], changed["enabled"]) == (
        "after",
        "free",
        -4,
        False,
    )
    assert changed["metadata"] == {"quota": 20, "quotaPeriod": "monthly", "type": "chat"}
    assert changed["masked"] == key["masked"]

    # Errors come back next to their field with what was typed; nothing changes.
    for fields, field in (
        ({"name": ""}, "name"),
        ({"priority": "1.5"}, "priority"),
        ({"metadata": "[1, 2]"}, "metadata"),
        ({"metadata": '{"quotaPeriod": "fortnight"}'}, "metadata"),
    ):
        data = {"name": "after", "tier": "free", "priority": "-4", "metadata": "", **fields}
        resp = await submit(admin_client, detail, detail, data)
        html = await resp.text()
        assert resp.status == 422, (fields, html[:300])
        assert f'id="e-{field}"' in html, fields
    assert await api_get(admin_client, as_alice, key["id"]) == changed

    # Clearing the textarea clears the metadata; ticking "enabled" enables.
    data = {"name": "after", "tier": "free", "priority": "-4", "metadata": "", "enabled": "on"}
    resp = await submit(admin_client, detail, detail, data)
    assert resp.status == 303
    cleared = await api_get(admin_client, as_alice, key["id"])
    assert cleared["metadata"] == {}
    assert cleared["enabled"] is True


async def test_rotate_replaces_the_secret_of_the_same_key(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    old = openai_secret()
    key = await api_key(admin_client, as_alice, old, name="rotating")
    await sign_in(admin_client, "alice", USER_PASSWORD)
    detail = f"/ui/keys/{key['id']}"
    assert 'id="key-rotate-form"' in await page(admin_client, detail)
    new = openai_secret()
    resp = await submit(admin_client, detail, f"{detail}/rotate", {"key": new})
    assert resp.status == 303, await resp.text()
    rotated = await api_get(admin_client, as_alice, key["id"])
    assert rotated["masked"] == f"sk-proj-…{new[-4:]}" != key["masked"]
    assert rotated["name"] == "rotating"
    assert await stored_secret(admin_client, key["id"]) == new
    html = await page(admin_client, resp.headers["Location"])
    assert rotated["masked"] in html
    assert new not in html
    assert old not in html

    # An empty key, or one stored already, is refused next to the field and not echoed.
    resp = await submit(admin_client, detail, f"{detail}/rotate", {"key": ""})
    assert resp.status == 422
    assert 'id="e-key"' in await resp.text()
    other = await api_key(admin_client, as_alice)
    taken = await stored_secret(admin_client, other["id"])
    resp = await submit(admin_client, detail, f"{detail}/rotate", {"key": taken})
    html = await resp.text()
    assert resp.status == 409
    assert 'id="e-key"' in html
    assert "not shown again" in html
    assert taken not in html
    assert await stored_secret(admin_client, key["id"]) == new


async def test_disable_enable_and_mark_active_publish_invalidations(
    admin_client: Client, as_alice: dict[str, str], redis_client: Any
) -> None:
    key = await api_key(admin_client, as_alice)
    await sign_in(admin_client, "alice", USER_PASSWORD)
    detail = f"/ui/keys/{key['id']}"
    async with redis_client.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(rkeys.invalidation_channel())

        async def published() -> dict[str, Any]:
            for _ in range(50):
                message = await pubsub.get_message(timeout=0.1)
                if message is not None:
                    found: dict[str, Any] = json.loads(message["data"])
                    return found
            raise AssertionError("no invalidation published")

        resp = await submit(admin_client, detail, f"{detail}/disable", {})
        assert resp.status == 303
        assert await published() == {"kind": "key", "id": key["id"]}
        assert (await api_get(admin_client, as_alice, key["id"]))["enabled"] is False
        html = await page(admin_client, detail)
        assert 'id="key-disabled"' in html
        assert 'id="key-enable-form"' in html

        resp = await submit(admin_client, detail, f"{detail}/enable", {})
        assert resp.status == 303
        assert await published() == {"kind": "key", "id": key["id"]}
        assert (await api_get(admin_client, as_alice, key["id"]))["enabled"] is True

        assert admin_client.app is not None
        async with admin_client.app[POOL].acquire() as conn:
            await conn.execute(
                "UPDATE api_keys SET status = 'invalid' WHERE id = $1", uuid.UUID(key["id"])
            )
        html = await page(admin_client, detail)
        assert 'id="key-status">invalid' in html
        assert "the upstream refused this key" in html
        resp = await submit(admin_client, detail, f"{detail}/activate", {})
        assert resp.status == 303
        assert await published() == {"kind": "key", "id": key["id"]}
        assert (await api_get(admin_client, as_alice, key["id"]))["status"] == "active"


async def test_delete_needs_the_confirmation_post(
    admin_client: Client, as_alice: dict[str, str], redis_client: Any
) -> None:
    key = await api_key(admin_client, as_alice, name="doomed")
    await sign_in(admin_client, "alice", USER_PASSWORD)
    confirm = f"/ui/keys/{key['id']}/delete"
    html = await page(admin_client, confirm)
    assert 'id="key-delete-form"' in html
    assert "doomed" in html
    await api_get(admin_client, as_alice, key["id"])  # a GET deletes nothing
    async with redis_client.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(rkeys.invalidation_channel())
        resp = await submit(admin_client, confirm, confirm, {})
        assert resp.status == 303
        after = resp.headers["Location"]
        assert after.startswith("/ui/keys?")
        message = None
        for _ in range(50):
            message = await pubsub.get_message(timeout=0.1)
            if message is not None:
                break
        assert message is not None
        assert json.loads(message["data"]) == {"kind": "key", "id": key["id"]}
    resp = await admin_client.get(f"/keys/{key['id']}", headers=as_alice)
    assert resp.status == 404
    await page(admin_client, f"/ui/keys/{key['id']}", 404)
    listing = await page(admin_client, after)
    assert "Key deleted." in listing
    assert table_ids(listing) == []


async def test_another_users_key_is_a_404_for_every_action(
    admin_client: Client, as_bob: dict[str, str]
) -> None:
    bob_secret = openai_secret()
    theirs = await api_key(
        admin_client, as_bob, bob_secret, name="bobs-private-name", metadata={"quota": 3}
    )
    await sign_in(admin_client, "alice", USER_PASSWORD)
    base = f"/ui/keys/{theirs['id']}"
    for path in (base, f"{base}/delete"):
        html = await page(admin_client, path, 404)
        assert "bobs-private-name" not in html
        assert "no such key" in html
    actions = {
        base: {"name": "hijacked", "tier": "free", "priority": "9", "metadata": ""},
        f"{base}/rotate": {"key": openai_secret()},
        f"{base}/disable": {},
        f"{base}/enable": {},
        f"{base}/activate": {},
        f"{base}/delete": {},
    }
    for action, data in actions.items():
        resp = await submit(admin_client, "/ui/keys", action, data)
        html = await resp.text()
        assert resp.status == 404, (action, html[:300])
        assert "bobs-private-name" not in html
        assert resp.content_type == "text/html"
    assert await api_get(admin_client, as_bob, theirs["id"]) == theirs
    assert await stored_secret(admin_client, theirs["id"]) == bob_secret
    for bad in ("not-a-uuid", str(uuid.uuid4())):
        await page(admin_client, f"/ui/keys/{bad}", 404)


async def test_admin_sees_every_users_key(admin_client: Client, as_bob: dict[str, str]) -> None:
    theirs = await api_key(admin_client, as_bob, name="bob for admin")
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    assert table_ids(await page(admin_client, "/ui/keys")) == [theirs["id"]]
    assert "bob for admin" in await page(admin_client, f"/ui/keys/{theirs['id']}")


async def test_posts_without_csrf_are_refused_and_change_nothing(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    key = await api_key(admin_client, as_alice, name="kept")
    await sign_in(admin_client, "alice", USER_PASSWORD)
    base = f"/ui/keys/{key['id']}"
    attempts = {
        "/ui/keys/new": {"key": openai_secret(), "service": "openai"},
        base: {"name": "changed", "tier": "free", "priority": "1", "metadata": ""},
        f"{base}/rotate": {"key": openai_secret()},
        f"{base}/disable": {},
        f"{base}/delete": {},
    }
    for action, data in attempts.items():
        resp = await admin_client.post(action, data=data, allow_redirects=False)
        assert resp.status == 403, action
        resp = await admin_client.post(
            action, data={**data, "csrf": "0" * 64}, allow_redirects=False
        )
        assert resp.status == 403, action
    assert await api_get(admin_client, as_alice, key["id"]) == key
    assert (await (await admin_client.get("/keys", headers=as_alice)).json())["total"] == 1


async def test_markup_in_a_key_name_is_escaped(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    name = "<script>alert(1)</script><img src=x onerror=alert(2)>"
    key = await api_key(admin_client, as_alice, name=name, metadata={"type": "<b>bold</b>"})
    await sign_in(admin_client, "alice", USER_PASSWORD)
    for path in ("/ui/keys", f"/ui/keys/{key['id']}", f"/ui/keys/{key['id']}/delete"):
        html = await page(admin_client, path)
        assert "<script>alert" not in html
        assert "<img src=x" not in html
        assert "<b>bold" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # Added through the form too, then shown again after an error.
    resp = await submit(
        admin_client,
        "/ui/keys/new",
        "/ui/keys/new",
        {"key": unknown_secret(), "service": "", "tier": "paid", "name": name},
    )
    assert resp.status == 422
    assert "<script>alert" not in await resp.text()


async def test_no_page_renders_a_plaintext_secret(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    secret = openai_secret()
    resp = await submit(
        admin_client, "/ui/keys/new", "/ui/keys/new", {"key": secret, "service": "openai"}
    )
    assert resp.status == 303
    key_id = added_id(resp.headers["Location"])
    detail = f"/ui/keys/{key_id}"
    new = openai_secret()
    resp = await submit(admin_client, detail, f"{detail}/rotate", {"key": new})
    assert resp.status == 303
    pages = [
        resp.headers["Location"],
        "/ui/keys",
        "/ui/keys?service=openai",
        "/ui/keys/new",
        detail,
        f"{detail}/delete",
    ]
    seen = await asyncio.gather(*(page(admin_client, p) for p in pages))
    for path, html in zip(pages, seen, strict=True):
        for value in (secret, new, secret[8:], new[8:]):
            assert value not in html, path


def summary(html: str) -> str:
    """The error summary at the top of a page shown again after a failed form."""
    assert html.count('id="form-errors"') == 1, html[:500]
    return html.split('id="form-errors">', 1)[1].split("</p>", 1)[0]


async def test_a_failed_edit_or_rotate_says_so_at_the_top_with_a_link_to_the_field(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    key = await api_key(admin_client, as_alice, name="summarised")
    await sign_in(admin_client, "alice", USER_PASSWORD)
    detail = f"/ui/keys/{key['id']}"
    assert 'id="form-errors"' not in await page(admin_client, detail)

    data = {"name": "summarised", "tier": "paid", "priority": "0", "metadata": '{"quota": -1}'}
    html = await (await submit(admin_client, detail, detail, data)).text()
    said = summary(html)
    assert said.startswith("Not saved:")
    assert '<a href="#f-metadata">metadata</a>: quota: must be a whole number' in said
    # Under the title, above the facts and the forms far below it.
    assert html.index("</h1>") < html.index('id="form-errors"') < html.index('id="key-facts"')
    assert 'id="f-metadata"' in html

    taken = await stored_secret(admin_client, (await api_key(admin_client, as_alice))["id"])
    resp = await submit(admin_client, detail, f"{detail}/rotate", {"key": taken})
    assert resp.status == 409
    html = await resp.text()
    assert '<a href="#f-key">key</a>: ' in summary(html)
    assert "already stored" in summary(html)
    assert taken not in html

    # The address a failed rotation leaves in the address bar leads back to the key's page.
    resp = await admin_client.get(f"{detail}/rotate", allow_redirects=False)
    assert (resp.status, resp.headers["Location"]) == (303, detail)


async def test_a_failed_add_says_so_at_the_top(
    admin_client: Client, as_alice: dict[str, str]
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    data = {"key": openai_secret(), "service": "openai", "priority": "lots"}
    html = await (await submit(admin_client, "/ui/keys/new", "/ui/keys/new", data)).text()
    assert '<a href="#f-priority">priority</a>' in summary(html)
    assert summary(html).startswith("Not added:")
    assert html.index('id="form-errors"') < html.index('id="key-form"')


async def test_the_rotate_address_of_another_users_key_is_a_404(
    admin_client: Client, as_bob: dict[str, str]
) -> None:
    theirs = await api_key(admin_client, as_bob)
    await sign_in(admin_client, "alice", USER_PASSWORD)
    await page(admin_client, f"/ui/keys/{theirs['id']}/rotate", 404)


def test_the_choose_message_names_the_fitting_services_in_plain_words() -> None:
    known = {"openai", "stripe", "custom"}
    assert choose_message(["custom", "openai", "stripe"], known) == (
        "The key's format does not say which service it is for: choose one."
    )
    assert choose_message(["openai", "custom"], known) == (
        "The key's format fits several services (openai, custom): choose one."
    )


async def test_an_admin_sees_each_keys_owner_and_a_user_does_not(
    admin_client: Client, as_alice: dict[str, str], as_bob: dict[str, str]
) -> None:
    alices = await api_key(admin_client, as_alice, name="alice owns")
    bobs = await api_key(admin_client, as_bob, name="bob owns")
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    html = await page(admin_client, "/ui/keys")
    head = html.split('<table id="keys">', 1)[1].split("</thead>", 1)[0]
    assert "<th>Owner</th>" in head
    rows = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0].split("<tr>")[1:]
    owner_of = {KEY_LINK.findall(row)[0]: row.split('class="owner">', 1)[1] for row in rows}
    assert ">alice</a>" in owner_of[alices["id"]]
    assert "bob" not in owner_of[alices["id"]]
    assert ">bob</a>" in owner_of[bobs["id"]]
    detail = await page(admin_client, f"/ui/keys/{bobs['id']}")
    owner = detail.split('id="key-owner">', 1)[1].split("</dd>", 1)[0]
    assert ">bob</a>" in owner
    assert f'href="/ui/users/{bobs["owner_id"]}"' in owner

    admin_client.session.cookie_jar.clear()  # signed out
    await sign_in(admin_client, "alice", USER_PASSWORD)
    html = await page(admin_client, "/ui/keys")
    assert "Owner" not in html.split('<table id="keys">', 1)[1]
    assert 'class="owner"' not in html
    assert 'id="key-owner"' not in await page(admin_client, f"/ui/keys/{alices['id']}")


@pytest.fixture(scope="module")
def macros() -> Any:
    """The console's macros.html, loaded as the console loads its templates."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(console_keys.__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return env.get_template("macros.html").module


def test_pager_links_without_filters_have_no_stray_ampersand(macros: Any) -> None:
    html = str(macros.pager(60, 25, 25, {}))
    assert 'href="?offset=0" rel="prev"' in html
    assert 'href="?offset=50" rel="next"' in html
    assert "?&" not in html
    kept = str(macros.pager(60, 25, 25, {"tier": "free", "service": "a b"}))
    assert 'href="?tier=free&amp;service=a+b&amp;offset=50" rel="next"' in kept


def test_pager_for_no_items_and_past_the_end(macros: Any) -> None:
    empty = str(macros.pager(0, 25, 0, {}))
    assert "No items" in empty
    assert "none of" not in empty
    assert "<a " not in empty
    past = str(macros.pager(30, 25, 50, {"tier": "free"}))
    assert "none of 30 here" in past
    assert '<a href="?tier=free">First page</a>' in past


def test_the_error_summary_leaves_the_form_error_to_the_form(macros: Any) -> None:
    assert str(macros.error_summary({})).strip() == ""
    assert str(macros.error_summary({"form": "the database said no"})).strip() == ""
    both = str(macros.error_summary({"form": "f", "name": "<b>must not be empty</b>"}))
    assert '<a href="#f-name">name</a>: &lt;b&gt;must not be empty&lt;/b&gt;' in both
    assert both.count("<a ") == 1  # the form error is not listed
