"""The console's token and audit pages over HTTP: a token is shown once with working snippets,
works at the gateway until revoked from the console, stays owner-scoped and escaped; the
audit page lists, searches and verifies the chain (ADMIN only). Pure parts are tested
without a server."""

from __future__ import annotations

import asyncio
import html
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient
from conftest import ADMIN_PASSWORD, USER_PASSWORD, login
from consoletools import ONCE, csrf_in, page, sign_in, submit

from admin.console import audit as audit_page
from admin.console import snippets
from admin.console import tokens as token_pages
from gateway import audit, tokens
from gateway.errors import ValidationFailed
from gateway.settings import Settings
from tests.fakes import FakeUpstream

Client = TestClient[Any, Any]
OPENAI_KEY = "sk-proj-" + "C" * 40
NEW_TOKEN = re.compile(r'<code id="new-token"[^>]*>([^<]+)</code>')


def element(html_text: str, element_id: str) -> str:
    """The unescaped text inside the element with this id (a <pre>, <code>, <p> or <table>)."""
    found = re.search(rf'<(\w+)[^>]* id="{element_id}"[^>]*>(.*?)</\1>', html_text, re.S)
    assert found is not None, f"no #{element_id} on the page"
    return html.unescape(found[2])


def table_rows(html_text: str, table_id: str) -> list[str]:
    return re.findall(r"<tr>(.*?)</tr>", element(html_text, table_id).split("</thead>")[-1], re.S)


async def post_form(client: Client, data: dict[str, str | list[str]]) -> tuple[int, str]:
    """Post the token form as a browser would (each checked service a `services` field)."""
    form = await page(client, "/ui/tokens/new")
    once = ONCE.search(form)
    assert once is not None, "the token form carries its once mark"
    pairs = [("csrf", csrf_in(form)), ("once", once[1])] + [
        (name, value)
        for name, values in data.items()
        for value in (values if isinstance(values, list) else [values])
    ]
    resp = await client.post("/ui/tokens/new", data=pairs, allow_redirects=False)
    if resp.status == 201:
        assert resp.headers["Cache-Control"] == "no-store"
    return resp.status, await resp.text()


async def test_sending_the_token_form_again_issues_no_second_token(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    """A reload of the page that showed the token posts the same form again."""
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    form = await page(admin_client, "/ui/tokens/new")
    once = ONCE.search(form)
    assert once is not None
    pairs = [
        ("csrf", csrf_in(form)),
        ("once", once[1]),
        ("name", "twice"),
        ("services", "openai"),
    ]
    first = await admin_client.post("/ui/tokens/new", data=pairs)
    assert first.status == 201
    again = await admin_client.post("/ui/tokens/new", data=pairs)
    assert again.status == 409
    assert "already sent" in await again.text()
    listed = await (await admin_client.get("/tokens", headers=as_admin)).json()
    assert [t["name"] for t in listed["items"]].count("twice") == 1
    # A form that came back with errors may be sent again, corrected.
    form = await page(admin_client, "/ui/tokens/new")
    once = ONCE.search(form)
    assert once is not None
    base = [("csrf", csrf_in(form)), ("once", once[1]), ("name", "fixed")]
    assert (await admin_client.post("/ui/tokens/new", data=base)).status == 422
    fixed = await admin_client.post("/ui/tokens/new", data=[*base, ("services", "openai")])
    assert fixed.status == 201


async def issue(client: Client, **fields: str | list[str]) -> tuple[str, str, str]:
    """Create a token through the form: (its id, the token, the 201 page)."""
    status, text = await post_form(
        client, {"name": "billing-app", "services": ["openai"], **fields}
    )
    assert status == 201, text[:2000]
    found = NEW_TOKEN.search(text)
    token_id = re.search(r'href="/ui/tokens/([0-9a-f-]{36})"', text)
    assert found is not None
    assert token_id is not None
    return token_id[1], found[1], text


# --- tokens ---


async def test_a_new_token_is_shown_once_with_snippets(
    admin_client: Client, settings: Settings
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    form = await page(admin_client, "/ui/tokens/new")
    assert 'id="token-form"' in form
    for slug in ("openai", "stripe", "googlemaps", "openweather"):
        assert f'type="checkbox" name="services" value="{slug}"' in form
    assert 'name="rate_limit"' not in form  # ADMIN only

    token_id, token, created = await issue(
        admin_client, services=["openai", "stripe", "googlemaps"], name="billing-app"
    )
    assert tokens.looks_like_token(token)
    gw = settings.gateway_url
    assert gw.startswith("http://")
    openai = element(created, "snippet-openai")
    assert f'OpenAI(base_url="{gw}/openai/v1", api_key="{token}")' in openai
    stripe = element(created, "snippet-stripe")
    assert f'"{token}", base_addresses={{"api": "{gw}/stripe"}}' in stripe
    googlemaps = element(created, "snippet-googlemaps")
    assert f'googlemaps.Client(key="{token}", base_url="{gw}/googlemaps")' in googlemaps
    curl = element(created, "snippet-curl")
    assert f'curl "{gw}/openai/v1/models" -H "X-Wallet-Token: {token}"' in curl
    for target in ("new-token", "snippet-openai", "snippet-stripe", "snippet-googlemaps"):
        assert f'data-copy="{target}"' in created
    assert 'data-copy="snippet-curl"' in created

    # Never again: not in the list, not on the detail page.
    for path in ("/ui/tokens", f"/ui/tokens/{token_id}"):
        text = await page(admin_client, path)
        assert token not in text
        assert token[len(tokens.PREFIX) :] not in text
    listing = await page(admin_client, "/ui/tokens")
    rows = table_rows(listing, "tokens")
    assert len(rows) == 1
    assert "billing-app" in rows[0]
    assert "active" in rows[0]
    assert f"/ui/tokens/{token_id}" in rows[0]
    detail = await page(admin_client, f"/ui/tokens/{token_id}")
    assert 'id="token-revoke-form"' in detail
    assert "data-confirm=" in detail
    assert token[-4:] in detail  # the hint, as the API shows it


async def test_snippets_only_for_the_services_in_scope(admin_client: Client) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    _, token, created = await issue(admin_client, services=["openweather"])
    for absent in ("snippet-openai", "snippet-stripe", "snippet-googlemaps"):
        assert f'id="{absent}"' not in created
    assert "/openweather/data/2.5/weather?q=Paris" in element(created, "snippet-curl")
    assert token in element(created, "snippet-curl")


async def test_the_token_works_at_the_gateway_until_revoked_in_the_console(
    admin_client: Client,
    gateway_client: Client,
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    aiohttp_server: Any,
) -> None:
    upstream = FakeUpstream(OPENAI_KEY)
    server = await aiohttp_server(upstream.app())
    base_url = {"base_url": f"http://127.0.0.1:{server.port}"}
    resp = await admin_client.put("/services/openai", headers=as_admin, json=base_url)
    assert resp.status == 200, await resp.text()
    key = {"key": OPENAI_KEY, "service": "openai"}
    resp = await admin_client.post("/keys", headers=as_alice, json=key)
    assert resp.status == 201, await resp.text()

    await sign_in(admin_client, "alice", USER_PASSWORD)
    token_id, token, _ = await issue(admin_client)
    auth = {"Authorization": f"Bearer {token}"}
    resp = await gateway_client.get("/openai/v1/models", headers=auth)
    assert resp.status == 200, await resp.text()
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {OPENAI_KEY}"

    resp = await submit(admin_client, f"/ui/tokens/{token_id}", f"/ui/tokens/{token_id}/revoke", {})
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"].startswith(f"/ui/tokens/{token_id}?notice=")
    for _ in range(20):
        if (await gateway_client.get("/openai/v1/models", headers=auth)).status == 401:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("a token revoked in the console still works at the gateway")
    detail = await page(admin_client, f"/ui/tokens/{token_id}")
    assert "revoked" in detail
    assert 'id="token-revoke-form"' not in detail
    assert "revoked" in table_rows(await page(admin_client, "/ui/tokens"), "tokens")[0]
    resp = await admin_client.get(f"/tokens/{token_id}", headers=as_alice)
    assert (await resp.json())["revoked_at"] is not None


async def test_upper_case_id_revoke_reaches_the_gateway_too(
    admin_client: Client,
    gateway_client: Client,
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    """The gateways' caches hold canonical ids: the invalidation names the token that way."""
    upstream = FakeUpstream(OPENAI_KEY)
    server = await aiohttp_server(upstream.app())
    base_url = {"base_url": f"http://127.0.0.1:{server.port}"}
    assert (await admin_client.put("/services/openai", headers=as_admin, json=base_url)).ok
    resp = await admin_client.post("/keys", headers=as_admin, json={"key": OPENAI_KEY})
    assert resp.status == 201, await resp.text()
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "x", "services": ["openai"]}
    )
    created = await resp.json()
    auth = {"X-Wallet-Token": created["token"]}
    assert (await gateway_client.get("/openai/v1/models", headers=auth)).status == 200
    resp = await admin_client.delete(f"/tokens/{created['id'].upper()}", headers=as_admin)
    assert resp.status == 204
    for _ in range(20):
        if (await gateway_client.get("/openai/v1/models", headers=auth)).status == 401:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("a token revoked by its upper-case id still works at the gateway")


async def test_alice_cannot_see_or_revoke_bobs_token(
    admin_client: Client, as_bob: dict[str, str]
) -> None:
    resp = await admin_client.post(
        "/tokens", headers=as_bob, json={"name": "bobs-secret-app", "services": ["openai"]}
    )
    bobs = await resp.json()
    await sign_in(admin_client, "alice", USER_PASSWORD)
    listing = await page(admin_client, "/ui/tokens")
    assert "bobs-secret-app" not in listing
    assert table_rows(listing, "tokens")[0].count("<td") == 1  # the "no tokens yet" row
    not_found = await page(admin_client, f"/ui/tokens/{bobs['id']}", 404)
    assert "bobs-secret-app" not in not_found
    resp = await submit(admin_client, "/ui/tokens", f"/ui/tokens/{bobs['id']}/revoke", {})
    assert resp.status == 404
    assert "bobs-secret-app" not in await resp.text()
    await page(admin_client, "/ui/tokens/not-a-uuid", 404)
    await page(admin_client, f"/ui/tokens/{uuid.uuid4()}", 404)
    resp = await admin_client.get(f"/tokens/{bobs['id']}", headers=as_bob)
    assert (await resp.json())["revoked_at"] is None


async def test_an_admin_sees_every_token_with_its_owner(
    admin_client: Client, as_bob: dict[str, str]
) -> None:
    resp = await admin_client.post(
        "/tokens", headers=as_bob, json={"name": "bobs-app", "services": ["stripe"]}
    )
    assert resp.status == 201
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    rows = table_rows(await page(admin_client, "/ui/tokens"), "tokens")
    assert len(rows) == 1
    assert "bobs-app" in rows[0]
    assert "<td>bob</td>" in rows[0]
    assert 'name="rate_limit"' in await page(admin_client, "/ui/tokens/new")
    token_id, _, _ = await issue(admin_client, name="limited", rate_limit="30", budget="2.5")
    detail = await page(admin_client, f"/ui/tokens/{token_id}")
    assert "30 requests/minute" in detail
    assert "2.5 / monthly" in detail


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"name": "  ", "services": ["openai"]}, "name", "non-empty"),
        ({"name": "kept-name"}, "services", "non-empty list"),
        ({"name": "kept-name", "services": ["openai", "nope"]}, "services", "nope"),
        (
            {"name": "kept-name", "services": ["openai"], "expires_at": "2001-01-01T00:00"},
            "expires_at",
            "future",
        ),
        (
            {"name": "kept-name", "services": ["openai"], "expires_at": "soon"},
            "expires_at",
            "ISO 8601",
        ),
        ({"name": "kept-name", "services": ["openai"], "budget": "-3"}, "budget", ""),
        ({"name": "kept-name", "services": ["openai"], "budget": "lots"}, "budget", ""),
        (
            {"name": "kept-name", "services": ["openai"], "budget": "5", "budget_period": "year"},
            "budget_period",
            "monthly",
        ),
        (
            {"name": "kept-name", "services": ["openai"], "rate_limit": "fast"},
            "rate_limit",
            "whole number",
        ),
    ],
)
async def test_validation_errors_are_shown_next_to_their_field(
    admin_client: Client, fields: dict[str, Any], field: str, message: str
) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    status, text = await post_form(admin_client, fields)
    assert status == 422, text[:1000]
    assert f'id="e-{field}"' in text
    assert message in element(text, f"e-{field}")
    if fields["name"].strip():
        assert 'value="kept-name"' in text
    for slug in fields.get("services", []):
        if slug != "nope":
            assert f'value="{slug}" checked' in text
    for name in ("expires_at", "budget", "rate_limit"):
        if name in fields:
            assert f'value="{html.escape(fields[name])}"' in text
    assert NEW_TOKEN.search(text) is None
    resp = await admin_client.get("/tokens", headers=await login(admin_client))
    assert (await resp.json())["total"] == 0


async def test_a_user_may_not_set_a_rate_limit(admin_client: Client) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    status, text = await post_form(
        admin_client, {"name": "x", "services": ["openai"], "rate_limit": "5"}
    )
    assert status == 403
    assert "ADMIN" in text


async def test_a_future_expiry_from_the_form_is_kept(admin_client: Client) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    when = (datetime.now(UTC) + timedelta(days=3)).replace(second=0, microsecond=0)
    token_id, _, _ = await issue(admin_client, expires_at=when.strftime("%Y-%m-%dT%H:%M"))
    detail = await page(admin_client, f"/ui/tokens/{token_id}")
    assert when.strftime("%Y-%m-%d %H:%M UTC") in detail


async def test_markup_in_a_token_name_is_escaped(admin_client: Client) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    name = '<img src=x onerror="alert(1)">'
    token_id, _, created = await issue(admin_client, name=name)
    for text in (
        created,
        await page(admin_client, "/ui/tokens"),
        await page(admin_client, f"/ui/tokens/{token_id}"),
    ):
        assert "<img src=x" not in text
        assert "&lt;img src=x onerror=" in text


# --- audit ---


async def test_the_audit_page_lists_searches_and_verifies(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    token_id, _, _ = await issue(admin_client, name="audited-app")
    resp = await submit(admin_client, f"/ui/tokens/{token_id}", f"/ui/tokens/{token_id}/revoke", {})
    assert resp.status == 303

    everything = await page(admin_client, "/ui/audit")
    assert element(everything, "audit-verify") == "intact"
    rows = table_rows(everything, "audit")
    assert "token.revoke" in rows[0]
    assert token_id in rows[0]
    assert "token.create" in rows[1]
    assert "audited-app" in rows[1]
    assert len(rows) > 2  # the seeded services too

    by_name = table_rows(await page(admin_client, "/ui/audit?q=AUDITED-app"), "audit")
    assert len(by_name) == 1
    assert "token.create" in by_name[0]
    by_action = table_rows(await page(admin_client, "/ui/audit?action=token.revoke"), "audit")
    assert len(by_action) == 1
    assert "token.revoke" in by_action[0]
    by_target = table_rows(await page(admin_client, f"/ui/audit?q={token_id}"), "audit")
    assert len(by_target) == 2
    literal = table_rows(await page(admin_client, "/ui/audit?q=%25"), "audit")
    assert len(literal) == 1
    assert "No record matches" in literal[0]
    assert 'option value="token.revoke"' in everything


async def test_a_large_audit_log_is_verified_when_asked(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Verifying reads every record: past AUTO_VERIFY_MAX the page waits to be asked."""
    monkeypatch.setattr(audit_page, "AUTO_VERIFY_MAX", 0)
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    await issue(admin_client, name="one-more-record")
    html = await page(admin_client, "/ui/audit?q=token")
    assert element(html, "audit-verify").startswith("Not verified yet")
    assert "verify=1" in html
    asked = await page(admin_client, "/ui/audit?q=token&verify=1")
    assert element(asked, "audit-verify") == "intact"


async def test_the_audit_api_searches_as_the_page_does(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "searchable_app", "services": ["openai"]}
    )
    assert resp.status == 201
    resp = await admin_client.get("/audit", headers=as_admin, params={"q": "SEARCHABLE_APP"})
    body = await resp.json()
    assert body["total"] == 1
    assert body["items"][0]["action"] == "token.create"
    resp = await admin_client.get("/audit", headers=as_admin, params={"q": "searchable%app"})
    assert (await resp.json())["total"] == 0  # % matches itself, not anything
    resp = await admin_client.get("/audit", headers=as_admin, params={"q": "x" * 201})
    assert resp.status == 422
    assert (await resp.json())["error"]["field"] == "q"


async def test_an_overlong_search_is_an_error_next_to_the_field(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    text = await page(admin_client, "/ui/audit?q=" + "x" * 201, 422)
    assert 'id="e-q"' in text
    assert element(text, "audit-verify") == "intact"


async def test_a_tampered_record_shows_the_chain_broken(
    admin_client: Client, settings: Settings
) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    await issue(admin_client, name="one")
    await issue(admin_client, name="two")
    assert settings.database_url is not None
    conn = await asyncpg.connect(settings.database_url.reveal())
    try:
        seq = await conn.fetchval("SELECT max(seq) - 1 FROM audit_log")
        await conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = $1", seq)
    finally:
        await conn.close()
    verdict = element(await page(admin_client, "/ui/audit"), "audit-verify")
    assert verdict.startswith(f"broken at seq {seq}:")
    assert "edited" in verdict
    assert "intact" not in verdict


async def test_the_audit_page_is_for_admins_only(admin_client: Client) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    text = await page(admin_client, "/ui/audit", 403)
    assert 'id="audit"' not in text
    assert "/ui/audit" not in await page(admin_client, "/ui/tokens")  # not in the nav either


# --- pure parts ---


def test_budget_periods_offer_the_default_first() -> None:
    assert token_pages.BUDGET_PERIODS == ("monthly", "daily", "hour", "minute")


def test_snippets_use_the_gateway_url_without_a_trailing_slash() -> None:
    found = snippets.for_token("https://gw.example.com/", "AIzaWT_t", ["openai", "custom"])
    assert [s.id for s in found] == ["snippet-openai", "snippet-curl"]
    assert 'base_url="https://gw.example.com/openai/v1"' in found[0].code
    assert found[1].code.splitlines() == [
        'curl "https://gw.example.com/openai/v1/models" -H "X-Wallet-Token: AIzaWT_t"',
        'curl "https://gw.example.com/custom/" -H "X-Wallet-Token: AIzaWT_t"',
    ]


def test_token_status() -> None:
    now = datetime.now(UTC)
    record = tokens.TokenRecord("i", "o", "n", ("openai",), "h", now, None, None)
    assert token_pages.token_status(record, now) == "active"
    later = tokens.TokenRecord("i", "o", "n", (), "h", now, now + timedelta(seconds=1), None)
    assert token_pages.token_status(later, now) == "active"
    assert token_pages.token_status(later, now + timedelta(seconds=1)) == "expired"
    gone = tokens.TokenRecord("i", "o", "n", (), "h", now, now - timedelta(days=1), now)
    assert token_pages.token_status(gone, now) == "revoked"


def test_the_form_becomes_the_apis_body() -> None:
    typed = {
        "name": "n",
        "services": ["a", "b"],
        "expires_at": " ",
        "budget": " 10 ",
        "budget_period": "daily",
        "rate_limit": "",
    }
    assert token_pages.body_from_form(typed) == {
        "name": "n",
        "services": ["a", "b"],
        "expires_at": None,
        "budget": {"amount": "10", "period": "daily"},
        "rate_limit": None,
    }
    body = token_pages.body_from_form({**typed, "budget": "", "rate_limit": "12"})
    assert body["budget"] is None
    assert body["rate_limit"] == 12
    assert token_pages.body_from_form({**typed, "rate_limit": "1.5"})["rate_limit"] == "1.5"


def test_search_text_is_matched_literally() -> None:
    assert audit.like_pattern("50%_off\\") == "%50\\%\\_off\\\\%"
    assert audit.validate_search("  ") is None
    assert audit.validate_search(" key.add ") == "key.add"
    for bad in ("x" * 201, "a\x00b"):
        with pytest.raises(ValidationFailed):
            audit.validate_search(bad)


def test_verdict_text() -> None:
    intact = audit.Verdict(3, 3, "h", ())
    assert audit_page.verdict_text(intact) == "intact"
    broken = audit.Verdict(3, 3, "h", (audit.Break(2, "edited"), audit.Break(3, "x")))
    assert audit_page.verdict_text(broken) == "broken at seq 2: edited"
