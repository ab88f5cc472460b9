"""The web console in a real headless Chromium: sign in, add a key, create a token, see a
proxied call on the dashboard, revoke the token; a USER kept out of another user's key; a
form without its CSRF token refused. The apps run on real loopback ports in the test's event
loop; the browser is driven from a worker thread (see browser.py).

Without a browser these tests are skipped, loudly (a banner in the summary), and fail instead
when WALLET_REQUIRE_BROWSER=1 (CI). `make screenshots` (WALLET_SCREENSHOTS=1) also redraws
the console's pictures in docs/.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final

import pytest
from aiohttp.test_utils import TestClient, TestServer
from browser import (
    REQUIRE_ENV,
    SKIP_PREFIX,
    Browser,
    Chromium,
    require,
    skipped_banner,
    started,
)
from conftest import ADMIN_PASSWORD, USER_PASSWORD, World, login
from fakes import FakeUpstream
from selenium.webdriver.chrome.webdriver import WebDriver

from gateway.usage import USAGE, UsageRecord

Client = TestClient[Any, Any]

OPENAI_KEY: Final = "sk-proj-" + "B" * 40
STRIPE_KEY: Final = "sk_test_" + "Br0wserTe5tKey0123456789ab"
BOB_KEY: Final = "sk-proj-" + "O" * 40
DOCS: Final = Path(__file__).resolve().parent.parent / "docs"
HELLO: Final = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def chromium() -> Chromium:
    return require()


@pytest.fixture(scope="module")
def driver(chromium: Chromium) -> Iterator[WebDriver]:
    """One browser for the module (starting one takes a second); cookies cleared per test."""
    with started(chromium) as driver:
        yield driver


@pytest.fixture
async def browser(driver: WebDriver, admin_client: Client) -> AsyncIterator[Browser]:
    """The browser on this test's admin app (a real server on a loopback port)."""
    browser = Browser(driver, str(admin_client.make_url("")))
    await browser.forget_cookies()
    try:
        yield browser
    finally:
        await browser.forget_cookies()


async def sign_in(browser: Browser, username: str, password: str) -> None:
    await browser.open("/ui/")
    assert (await browser.path()).startswith("/ui/login?next=/ui/")
    await browser.fill("#login-form", {"username": username, "password": password})
    await browser.submit("#login-form")
    assert await browser.path() == "/ui/"


async def fake_upstream(
    admin_client: Client, aiohttp_server: Any, service: str, key: str
) -> FakeUpstream:
    """Point `service` at a new fake upstream that accepts only `key` (set up over the JSON
    API: the services pages are not what these tests are about)."""
    upstream = FakeUpstream(key)
    server: TestServer = await aiohttp_server(upstream.app())
    resp = await admin_client.put(
        f"/services/{service}",
        headers=await login(admin_client),
        json={"base_url": f"http://127.0.0.1:{server.port}"},
    )
    assert resp.status == 200, await resp.text()
    return upstream


async def error_page(browser: Browser) -> tuple[str, str]:
    """The status and message of the console's error page being shown."""
    return await browser.text("main h1"), await browser.text("main p.error")


def test_without_a_browser_the_tests_skip_loudly_or_fail_in_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require()
    reason = str(skipped.value)
    assert reason.startswith(SKIP_PREFIX)
    assert "apt-get install chromium chromium-driver" in reason
    report = SimpleNamespace(longrepr=(__file__, 1, f"Skipped: {reason}"))
    assert skipped_banner([report]) == f"{SKIP_PREFIX}: " + reason.split("; ", 1)[1]
    other = SimpleNamespace(longrepr=(__file__, 1, "Skipped: screenshots: run `make screenshots`"))
    assert skipped_banner([other]) is None

    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        require()


# The shell: sign in and out, CSRF.


async def test_sign_in_wrong_password_then_right_then_out(browser: Browser) -> None:
    await browser.open("/ui/keys")
    assert (await browser.path()).startswith("/ui/login?next=/ui/keys")
    await browser.fill("#login-form", {"username": "alice", "password": "not-her-password"})
    await browser.submit("#login-form")
    assert "wrong username or password" in await browser.text("#login-form .error")
    assert "not-her-password" not in await browser.source()

    await browser.fill("#login-form", {"username": "alice", "password": USER_PASSWORD})
    await browser.submit("#login-form")
    assert (await browser.path()).startswith("/ui/keys")
    assert "alice" in await browser.text("header .who")

    await browser.submit("form.logout")
    assert (await browser.path()).startswith("/ui/login")
    await browser.open("/ui/")
    assert (await browser.path()).startswith("/ui/login?next=/ui/")


async def test_a_form_without_its_csrf_token_is_refused(
    browser: Browser, admin_client: Client
) -> None:
    bob = await login(admin_client, "bob", USER_PASSWORD)
    resp = await admin_client.post(
        "/keys", headers=bob, json={"key": BOB_KEY, "service": "openai", "name": "bob's key"}
    )
    assert resp.status == 201, await resp.text()
    key_id = (await resp.json())["id"]
    await sign_in(browser, "bob", USER_PASSWORD)

    await browser.post_form(f"/ui/keys/{key_id}/delete", {})
    status, message = await error_page(browser)
    assert status == "403"
    assert "CSRF" in message
    assert (await admin_client.get(f"/keys/{key_id}", headers=bob)).status == 200

    await browser.post_form("/ui/logout", {})
    assert (await error_page(browser))[0] == "403"
    await browser.open("/ui/")
    assert await browser.path() == "/ui/"  # still signed in


async def test_a_user_is_kept_out_of_another_users_key(
    browser: Browser, admin_client: Client
) -> None:
    bob = await login(admin_client, "bob", USER_PASSWORD)
    resp = await admin_client.post(
        "/keys", headers=bob, json={"key": BOB_KEY, "service": "openai", "name": "bobs-secret-key"}
    )
    assert resp.status == 201, await resp.text()
    key_id = (await resp.json())["id"]
    await sign_in(browser, "alice", USER_PASSWORD)

    for path in (f"/ui/keys/{key_id}", f"/ui/keys/{key_id}/delete"):
        await browser.open(path)
        assert (await error_page(browser))[0] == "404"
        assert "bobs-secret-key" not in await browser.source()
    await browser.open("/ui/keys")
    assert await browser.count("#keys") == 1
    assert "bobs-secret-key" not in await browser.source()

    # With her own valid CSRF token, a form aimed at bob's key finds nothing either.
    csrf = await browser.attribute('form.logout input[name="csrf"]', "value")
    assert csrf
    await browser.post_form(f"/ui/keys/{key_id}/disable", {"csrf": csrf})
    assert (await error_page(browser))[0] == "404"
    resp = await admin_client.get(f"/keys/{key_id}", headers=bob)
    assert (await resp.json())["enabled"] is True


# The walk-through: key, token, a proxied call on the dashboard, revocation.


async def test_add_a_key_create_a_token_see_the_call_revoke(
    browser: Browser, admin_client: Client, gateway_client: Client, aiohttp_server: Any
) -> None:
    upstream = await fake_upstream(admin_client, aiohttp_server, "openai", OPENAI_KEY)
    await sign_in(browser, "alice", USER_PASSWORD)

    await browser.open("/ui/keys/new")
    await browser.fill(
        "#key-form", {"key": OPENAI_KEY, "service": "openai", "name": "alice-openai"}
    )
    await browser.submit("#key-form")
    assert not (await browser.path()).startswith("/ui/keys/new"), await browser.text("main")
    await browser.open("/ui/keys")
    key_page = await browser.link_to("#keys", "alice-openai")
    assert OPENAI_KEY not in await browser.source()
    await browser.open(key_page)
    assert OPENAI_KEY not in await browser.source()

    await browser.open("/ui/tokens/new")
    await browser.fill("#token-form", {"name": "alice-app", "services": "openai"})
    await browser.submit("#token-form")
    token = (await browser.text("#new-token")).strip()
    assert token
    assert token in await browser.text("#snippet-openai")

    resp = await gateway_client.post(
        "/openai/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}, json=HELLO
    )
    assert resp.status == 200, await resp.text()
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {OPENAI_KEY}"

    await gateway_client.app[USAGE].flush()  # the writer's batch, written now (or within 1 s)

    async def call_shown() -> bool:
        rows = await browser.texts("#recent-requests tbody tr")
        return any("openai" in row and "alice-openai" in row for row in rows)

    await browser.reload_until("/ui/", call_shown, show="#recent-requests")
    assert (await browser.text("#stat-requests")).strip() == "1"

    await browser.open("/ui/tokens")
    await browser.open(await browser.link_to("#tokens", "alice-app"))
    assert token not in await browser.source()
    await browser.submit("#token-revoke-form")
    # Gateways drop a revoked token within a second (told over Redis): asked for a while.
    for _ in range(20):
        resp = await gateway_client.get("/openai/v1/models", headers={"X-Wallet-Token": token})
        if resp.status == 401:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the token revoked in the console is still accepted after a second")


# Pictures of the main pages for the README (`make screenshots`).

PICTURES: Final = (
    "login",
    "dashboard",
    "keys",
    "key-form-error",
    "token-created",
    "services",
    "audit",
)


async def past_traffic(
    gateway_client: Client, admin_client: Client, admin: dict[str, str], me: str, token_id: str
) -> None:
    """A day of earlier calls (as the gateway's usage writer records them), so that the
    dashboard's charts have a shape; today's calls are made for real through the gateway."""
    resp = await admin_client.get("/keys", headers=admin)
    keys = {k["name"]: k for k in (await resp.json())["items"]}
    writer = gateway_client.app[USAGE]
    now = datetime.now(UTC)
    for hours_ago in range(1, 25):
        at = now - timedelta(hours=hours_ago) + timedelta(minutes=5)
        busy = 4 + (hours_ago * 7) % 11 + (6 if 9 <= (at.hour + 24) % 24 <= 17 else 0)
        for i in range(busy):
            service, key = ("stripe", "stripe-main") if i % 3 == 0 else ("openai", "openai-free")
            status = 429 if i == 5 else 502 if (i == 7 and hours_ago % 4 == 0) else 200
            writer.add(
                UsageRecord(
                    at=at + timedelta(seconds=i * 20),
                    service=service,
                    key_id=keys[key]["id"],
                    token_id=token_id,
                    user_id=me,
                    status=status,
                    latency_ms=80.0 + 37 * (i % 5),
                    bytes_in=220,
                    bytes_out=1400,
                    cost=Decimal("0.0042") if service == "openai" else Decimal("0.0300"),
                    fallbacks=1 if status == 429 else 0,
                )
            )
    await writer.flush()


@pytest.mark.skipif(
    os.environ.get("WALLET_SCREENSHOTS") != "1", reason="screenshots: run `make screenshots`"
)
async def test_screenshots(
    browser: Browser,
    admin_client: Client,
    gateway_client: Client,
    aiohttp_server: Any,
    world: World,
) -> None:
    await fake_upstream(admin_client, aiohttp_server, "openai", OPENAI_KEY)
    await fake_upstream(admin_client, aiohttp_server, "stripe", STRIPE_KEY)
    admin = await login(admin_client)
    keys = [
        {"key": OPENAI_KEY, "service": "openai", "tier": "free", "name": "openai-free",
         "metadata": {"quota": 500, "quotaPeriod": "daily"}},
        # Refused by the upstream: tried first (higher priority), marked invalid, fallen back.
        {"key": "sk-proj-" + "S" * 40, "service": "openai", "tier": "free", "name": "openai-old",
         "priority": 5},
        {"key": "sk-proj-" + "P" * 40, "service": "openai", "tier": "paid", "name": "openai-paid"},
        {"key": STRIPE_KEY, "service": "stripe", "tier": "paid", "name": "stripe-main",
         "metadata": {"quota": 100, "quotaPeriod": "hour"}},
    ]  # fmt: skip
    for key in keys:
        resp = await admin_client.post("/keys", headers=admin, json=key)
        assert resp.status == 201, await resp.text()

    await browser.open("/ui/login")
    await browser.screenshot(DOCS / "console-login.png")
    await sign_in(browser, "admin", ADMIN_PASSWORD)

    await browser.open("/ui/tokens/new")
    await browser.fill("#token-form", {"name": "billing-app", "services": "openai"})
    await browser.fill("#token-form", {"services": "stripe"})
    await browser.submit("#token-form")
    token = (await browser.text("#new-token")).strip()
    await browser.screenshot(DOCS / "console-token-created.png")
    await browser.open("/ui/tokens")
    token_id = (await browser.link_to("#tokens", "billing-app")).rsplit("/", 1)[1]

    bearer = {"Authorization": f"Bearer {token}"}
    for _ in range(6):
        resp = await gateway_client.post("/openai/v1/chat/completions", headers=bearer, json=HELLO)
        assert resp.status == 200, await resp.text()
    for i in range(4):
        charge = {"amount": str(1000 + i), "currency": "eur"}
        resp = await gateway_client.post("/stripe/v1/charges", headers=bearer, data=charge)
        assert resp.status == 200, await resp.text()
    await past_traffic(gateway_client, admin_client, admin, world.admin_id, token_id)

    await browser.reload_until(
        "/ui/", lambda: _shows_requests(browser, 10), show="#recent-requests"
    )
    await browser.screenshot(DOCS / "console-dashboard.png", full_page=True)
    await browser.open("/ui/keys")
    await browser.screenshot(DOCS / "console-keys.png")
    await browser.open("/ui/keys/new")
    typo = {"quota": 1000, "quotaPeriod": "fortnight"}
    fields = {"key": "sk-proj-" + "N" * 40, "name": "openai-spare", "metadata": json.dumps(typo)}
    await browser.fill("#key-form", fields)
    await browser.submit("#key-form")
    assert await browser.count("#key-form .error") >= 1
    await browser.screenshot(DOCS / "console-key-form-error.png")
    await browser.open("/ui/services")
    await browser.screenshot(DOCS / "console-services.png")
    await browser.open("/ui/audit")
    assert await browser.text("#audit-verify")
    await browser.screenshot(DOCS / "console-audit.png")
    for name in PICTURES:
        assert (DOCS / f"console-{name}.png").stat().st_size > 10_000, name


async def _shows_requests(browser: Browser, at_least: int) -> bool:
    return await browser.count("#recent-requests tbody tr") >= at_least
