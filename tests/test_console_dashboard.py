"""The console's dashboard at `/ui/` over HTTP: totals, charts, quota, keys not serving, the
latest requests and the audit chain, after real requests through the gateway; what a USER
sees of it; and markup in a key's name kept as text everywhere it shows."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from admin.app import create_app
from admin.console.dashboard import RESTING_READY
from gateway.appkeys import POOL
from gateway.cooldown import Cooldowns
from gateway.quota import window
from gateway.usage import USAGE
from tests.conftest import ADMIN_PASSWORD, USER_PASSWORD, login
from tests.consoletools import page, sign_in
from tests.fakes import FakeUpstream
from tests.test_charts import parse, texts
from tests.test_failover import Picky

Client = TestClient[Any, Any]
ALICE_KEY = "sk-proj-" + "L" * 40
BOB_KEY = "sk-proj-" + "O" * 40
EVIL_KEY = "sk-proj-" + "V" * 40
EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
FREE_KEY = "sk-proj-" + "F" * 40  # the keys Picky knows
PAID_KEY = "sk-proj-" + "P" * 40
BROKEN_KEY = "sk-proj-" + "K" * 40


def element(html: str, ident: str) -> str:
    """The element with id `ident`, up to the first closing tag of its kind."""
    found = re.search(rf'<(\w+)[^>]*\bid="{re.escape(ident)}"', html)
    assert found is not None, f"no element with id {ident}"
    end = html.index(f"</{found[1]}>", found.start())
    return html[found.start() : end + len(found[1]) + 3]


def text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def rows(html: str, ident: str) -> list[list[str]]:
    """The cells' text of each body row of table `ident`."""
    body = element(html, ident).partition("<tbody>")[2]
    return [
        [text(cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    ]


def stat(html: str, name: str) -> str:
    return text(element(html, f"stat-{name}"))


async def switch_to(client: Client, username: str) -> None:
    client.session.cookie_jar.clear()
    await sign_in(client, username, ADMIN_PASSWORD if username == "admin" else USER_PASSWORD)


async def add_key(client: Client, jwt: dict[str, str], **fields: Any) -> str:
    resp = await client.post("/keys", headers=jwt, json={"service": "openai", **fields})
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def add_token(client: Client, jwt: dict[str, str]) -> dict[str, str]:
    resp = await client.post("/tokens", headers=jwt, json={"name": "app", "services": ["openai"]})
    assert resp.status == 201, await resp.text()
    return {"X-Wallet-Token": (await resp.json())["token"]}


async def point_openai_at(client: Client, jwt: dict[str, str], server: Any) -> None:
    base = f"http://127.0.0.1:{server.port}"
    resp = await client.put("/services/openai", headers=jwt, json={"base_url": base})
    assert resp.status == 200, await resp.text()


async def call(gateway: Client, auth: dict[str, str], times: int, status: int = 200) -> None:
    for _ in range(times):
        resp = await gateway.get("/openai/v1/models", headers=auth)
        assert resp.status == status, await resp.text()


# What a new installation shows.


async def test_the_page_renders_empty_for_an_admin_and_a_user(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    html = await page(admin_client, "/ui/")
    for name in ("requests", "errors", "fallbacks", "cost"):
        assert stat(html, name) == "0"
    assert rows(html, "recent-requests")[0][0].startswith("No requests")
    assert "Every key is serving" in text(element(html, "cooling"))
    assert "No key has a quota" in text(element(html, "quota"))
    assert "No data for this period" in element(html, "chart-traffic")
    audit = text(element(html, "audit-state"))
    assert re.search(r"\d+ entr", audit)  # seeding the services was audited
    assert 'href="/ui/?range=24h&amp;service=&amp;verify=1"' in element(html, "audit-state")

    await switch_to(admin_client, "alice")
    html = await page(admin_client, "/ui/")
    assert stat(html, "requests") == "0"
    assert "Not available" in text(element(html, "audit-state"))
    assert "verify=1" not in html


# Real requests through the gateway.


@dataclass
class Team:
    alice_key: str
    bob_key: str


@pytest.fixture
async def team(
    admin_client: Client,
    gateway_client: Client,
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    as_bob: dict[str, str],
    aiohttp_server: Any,
) -> Team:
    """Alice (a key with a monthly quota of 3) calls 3 times, Bob twice, and a caller with a
    wrong token once; the gateway's writer has flushed them."""
    upstream = FakeUpstream(ALICE_KEY, also=frozenset({BOB_KEY}))
    await point_openai_at(admin_client, as_admin, await aiohttp_server(upstream.app()))
    quota = {"quota": 3, "quotaPeriod": "monthly"}
    alice_key = await add_key(
        admin_client, as_alice, key=ALICE_KEY, name="alice-billing", metadata=quota
    )
    bob_key = await add_key(admin_client, as_bob, key=BOB_KEY, name="bob-private")
    await call(gateway_client, await add_token(admin_client, as_alice), 3)
    await call(gateway_client, await add_token(admin_client, as_bob), 2)
    await call(gateway_client, {"X-Wallet-Token": "AIzaWT_" + "n" * 43}, 1, status=401)
    await gateway_client.app[USAGE].flush()  # the writer's batch, written now
    return Team(alice_key, bob_key)


async def test_an_admin_sees_every_request_key_and_the_latest_requests(
    admin_client: Client, team: Team
) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    html = await page(admin_client, "/ui/")
    assert (stat(html, "requests"), stat(html, "errors"), stat(html, "fallbacks")) == (
        "6",
        "1",
        "0",
    )
    assert stat(html, "cost") == "0"
    recent = rows(html, "recent-requests")
    assert len(recent) == 6
    newest = recent[0]
    assert newest[1:4] == ["openai", "—", "401"]  # refused before a key was chosen
    assert [r[2] for r in recent[1:]] == ["bob-private"] * 2 + ["alice-billing"] * 3
    assert all(r[3] == "200" for r in recent[1:])
    assert all(r[4].isdigit() for r in recent[1:])  # latency in whole ms
    by_key = {r[0]: r for r in rows(html, "by-key")}
    assert (by_key["alice-billing"][3], by_key["bob-private"][3]) == ("3", "2")
    assert rows(html, "by-service") == [["openai", "6", "1", "0", "0"]]
    chart = element(html, "chart-traffic")
    [desc] = texts(parse(chart), "desc")  # well-formed inside the page
    assert "requests: total 6" in desc
    assert "errors: total 1" in desc
    assert f'href="/ui/keys/{team.alice_key}"' in element(html, "by-key")


async def test_a_user_sees_only_their_own_keys_and_usage(admin_client: Client, team: Team) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    html = await page(admin_client, "/ui/")
    assert "bob-private" not in html
    assert (stat(html, "requests"), stat(html, "errors")) == ("3", "0")
    assert [r[2] for r in rows(html, "recent-requests")] == ["alice-billing"] * 3
    assert [r[0] for r in rows(html, "by-key")] == ["alice-billing"]

    await switch_to(admin_client, "bob")
    html = await page(admin_client, "/ui/")
    assert "alice-billing" not in html
    assert stat(html, "requests") == "2"
    assert [r[2] for r in rows(html, "recent-requests")] == ["bob-private"] * 2
    assert "No key has a quota" in text(element(html, "quota"))


async def test_quota_used_left_and_reset_and_the_used_up_key_is_not_serving(
    admin_client: Client, team: Team
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    html = await page(admin_client, "/ui/")
    [row] = rows(html, "quota-table")
    month = window("monthly", datetime.now(UTC))
    assert row[:2] == ["alice-billing", "openai"]
    assert row[2] == "3 3 of 3"  # used, then the <progress> bar's own text
    assert row[3:5] == ["0", "3 per monthly"]
    assert row[5] == month.end.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert '<progress max="3" value="3"' in element(html, "quota")
    [cooling] = rows(html, "cooling-table")
    assert cooling[:2] == ["alice-billing", "openai"]
    assert "quota of 3 per monthly used up" in cooling[2]
    assert cooling[3] == row[5]


async def test_the_period_and_service_filters(admin_client: Client, team: Team) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    html = await page(admin_client, "/ui/?service=stripe")
    assert stat(html, "requests") == "0"
    assert rows(html, "recent-requests")[0][0].startswith("No requests")
    assert '<option value="stripe" selected>' in html
    html = await page(admin_client, "/ui/?service=openai&range=7d")
    assert stat(html, "requests") == "6"
    assert 168 <= len(rows(html, "series")) <= 169  # hourly buckets
    assert '<option value="7d" selected>' in html
    html = await page(admin_client, "/ui/?range=30d")
    assert 30 <= len(rows(html, "series")) <= 31  # daily buckets
    assert stat(html, "requests") == "6"
    html = await page(admin_client, "/ui/?service=../etc")  # no slug: matches nothing
    assert stat(html, "requests") == "0"
    assert rows(html, "recent-requests")[0][0].startswith("No requests")
    error = await page(admin_client, "/ui/?range=1y", 400)
    assert "range: must be one of 24h, 7d, 30d" in error


# Keys not serving: resting after an upstream refused them, marked invalid, disabled.


async def test_resting_invalid_and_disabled_keys_are_listed(
    admin_client: Client,
    gateway_client: Client,
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    upstream = Picky(refuse={FREE_KEY}, invalid={BROKEN_KEY})
    await point_openai_at(admin_client, as_admin, await aiohttp_server(upstream.app()))
    broken = await add_key(admin_client, as_admin, key=BROKEN_KEY, name="broken-key",
                           tier="free", priority=5)  # fmt: skip
    free = await add_key(admin_client, as_admin, key=FREE_KEY, name="free-key", tier="free")
    await add_key(admin_client, as_admin, key=PAID_KEY, name="paid-key", tier="paid")
    await add_key(admin_client, as_admin, key=EVIL_KEY, name="off-key", enabled=False)
    async with asyncio.timeout(5):  # the console hears the gateways' rests from now on
        await admin_client.app[RESTING_READY].wait()

    resp = await gateway_client.get(
        "/openai/v1/models", headers=await add_token(admin_client, as_admin)
    )
    assert resp.status == 200
    assert resp.headers["X-Wallet-Fallbacks"] == "2"  # broken (401), then free (429), then paid
    called = datetime.now(UTC)
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    cooling: dict[str, list[str]] = {}
    for _ in range(50):  # the rest arrives over Redis; the invalid mark is written meanwhile
        html = await page(admin_client, "/ui/")
        cooling = {r[0]: r for r in rows(html, "cooling-table")}
        if "free-key" in cooling and "invalid" in cooling.get("broken-key", ["", "", ""])[2]:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"not listed: {cooling}")
    assert "upstream refused it" in cooling["free-key"][2]
    until = datetime.strptime(cooling["free-key"][3], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
    assert (
        called + timedelta(seconds=25) <= until <= called + timedelta(seconds=31)
    )  # Retry-After: 30
    assert cooling["broken-key"][3] == "until changed"
    assert cooling["off-key"][2] == "disabled"
    assert "paid-key" not in cooling
    await gateway_client.app[USAGE].flush()
    assert stat(await page(admin_client, "/ui/"), "fallbacks") == "2"

    # An admin's change to a key ends its rest, on the gateways and here.
    resp = await admin_client.put(f"/keys/{free}", headers=as_admin, json={"priority": 1})
    assert resp.status == 200
    for _ in range(50):
        html = await page(admin_client, "/ui/")
        if "free-key" not in text(element(html, "cooling")):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the changed key is still listed as resting")
    assert broken  # still listed: invalid until set back to active
    assert "broken-key" in text(element(html, "cooling"))


# The audit chain, verified on demand.


async def test_the_audit_chain_is_verified_when_asked(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    html = await page(admin_client, "/ui/")
    assert "intact" not in element(html, "audit-state")
    html = await page(admin_client, "/ui/?verify=1")
    state = text(element(html, "audit-state"))
    assert re.search(r"intact \d+ records checked", state)
    async with admin_client.app[POOL].acquire() as conn:
        await conn.execute("UPDATE audit_log SET details = '{\"x\": 1}' WHERE seq = 1")
    html = await page(admin_client, "/ui/?verify=1")
    state = text(element(html, "audit-state"))
    assert "broken at record #1: content does not match its hash (edited)" in state

    await switch_to(admin_client, "alice")
    html = await page(admin_client, "/ui/?verify=1")
    assert "Not available" in text(element(html, "audit-state"))
    assert "broken" not in element(html, "audit-state")


# Markup in a key's name.


async def test_markup_in_a_key_name_stays_text_everywhere(
    admin_client: Client,
    gateway_client: Client,
    as_admin: dict[str, str],
    aiohttp_server: Any,
) -> None:
    upstream = FakeUpstream(EVIL_KEY)
    await point_openai_at(admin_client, as_admin, await aiohttp_server(upstream.app()))
    quota = {"quota": 1, "quotaPeriod": "daily"}
    await add_key(admin_client, as_admin, key=EVIL_KEY, name=EVIL, metadata=quota)
    await call(gateway_client, await add_token(admin_client, as_admin), 1)
    await gateway_client.app[USAGE].flush()
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    html = await page(admin_client, "/ui/")
    assert html.count("<script") == 1  # the console's own script file
    assert "alert(1)</script>" not in html
    for ident in ("by-key", "chart-key-requests", "quota", "cooling", "recent-requests"):
        assert ESCAPED in element(html, ident), ident
    titles = texts(parse(element(html, "chart-key-requests")), "title")
    assert f"{EVIL}: 1" in titles  # the name, as text, inside the SVG
    assert f'aria-label="{ESCAPED}: 1 of 1 used"' in element(html, "quota")


async def test_a_rest_announced_before_the_admin_started_is_listed(
    aiohttp_client: Any, settings: Any, world: Any, redis_client: Any
) -> None:
    """Rests are stored in Redis too: an admin (or gateway) process that starts later reads
    them when it subscribes."""
    first = await aiohttp_client(create_app(settings))
    jwt = await login(first)
    key_id = await add_key(first, jwt, key="sk-proj-" + "T" * 40, name="tired-key", tier="paid")
    await Cooldowns(redis_client).rest(key_id, 600)  # as a gateway does, before we listen

    later = await aiohttp_client(create_app(settings))
    await later.app[RESTING_READY].wait()
    await sign_in(later, "admin", ADMIN_PASSWORD)
    cooling: dict[str, list[str]] = {}
    for _ in range(50):  # the load runs right after the subscription
        html = await page(later, "/ui/")
        cooling = {r[0]: r for r in rows(html, "cooling-table")} if "cooling-table" in html else {}
        if "tired-key" in cooling:
            break
        await asyncio.sleep(0.1)
    assert "upstream refused it" in cooling["tired-key"][2]

    # An admin's change ends the stored rest too: a process starting after it knows nothing.
    resp = await first.put(f"/keys/{key_id}", json={"priority": 3}, headers=jwt)
    assert resp.status == 200
    fresh = Cooldowns(redis_client)
    await fresh.load()
    assert fresh.resting(key_id) == 0
