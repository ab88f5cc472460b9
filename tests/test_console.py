"""The web console's shell over HTTP: sign-in, sessions, CSRF, logout, idle expiry and error
pages (each page's own behaviour is tested next to it; a real browser in
test_console_browser.py)."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from conftest import ADMIN_PASSWORD, USER_PASSWORD
from consoletools import csrf_in, page, sign_in, submit

from admin.console import session
from gateway import rkeys
from gateway.settings import Settings
from tests.conftest import with_settings

Client = TestClient[Any, Any]


async def test_pages_need_a_session(admin_client: Client) -> None:
    resp = await admin_client.get("/ui/?service=x", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/ui/login?next=/ui/?service%3Dx")


async def test_sign_in_sets_a_strict_http_only_cookie(admin_client: Client) -> None:
    html = await page(admin_client, "/ui/login")
    resp = await admin_client.post(
        "/ui/login",
        data={"csrf": csrf_in(html), "username": "admin", "password": ADMIN_PASSWORD},
        allow_redirects=False,
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/ui/"
    cookie = resp.cookies[session.SESSION_COOKIE]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/ui/"
    assert not cookie["secure"]  # plain http here; `auto` marks it Secure over TLS
    dashboard = await page(admin_client, "/ui/")
    assert "admin" in dashboard
    assert (
        "default-src 'none'" in (await admin_client.get("/ui/")).headers["Content-Security-Policy"]
    )


async def test_wrong_password_shows_the_form_again(admin_client: Client) -> None:
    html = await page(admin_client, "/ui/login")
    resp = await admin_client.post(
        "/ui/login",
        data={"csrf": csrf_in(html), "username": "admin", "password": "nope-nope-nope"},
    )
    assert resp.status == 401
    text = await resp.text()
    assert "wrong username or password" in text
    assert "nope-nope-nope" not in text


async def test_login_without_csrf_is_refused(admin_client: Client) -> None:
    await page(admin_client, "/ui/login")
    resp = await admin_client.post(
        "/ui/login", data={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert resp.status == 403
    assert session.SESSION_COOKIE not in resp.cookies


async def test_post_without_csrf_is_refused_and_changes_nothing(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    resp = await admin_client.post("/ui/logout", data={}, allow_redirects=False)
    assert resp.status == 403
    assert "CSRF" in await resp.text()
    await page(admin_client, "/ui/")  # still signed in


async def test_foreign_origin_is_refused(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    token = csrf_in(await page(admin_client, "/ui/"))
    resp = await admin_client.post(
        "/ui/logout",
        data={"csrf": token},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert resp.status == 403


async def test_logout_ends_the_session_server_side(admin_client: Client, redis_client: Any) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    cookie = admin_client.session.cookie_jar.filter_cookies(admin_client.make_url("/ui/"))
    token = cookie[session.SESSION_COOKIE].value
    resp = await submit(admin_client, "/ui/", "/ui/logout", {})
    assert resp.status == 303
    assert await redis_client.keys(rkeys.console_session("*")) == []
    # The old cookie, replayed, is worthless.
    admin_client.session.cookie_jar.update_cookies(
        {session.SESSION_COOKIE: token}, admin_client.make_url("/ui/")
    )
    assert (await admin_client.get("/ui/", allow_redirects=False)).status == 303


async def test_idle_sessions_expire(
    aiohttp_client: Any, settings: Settings, world: Any, redis_client: Any
) -> None:
    from admin.app import create_app

    client = await aiohttp_client(create_app(with_settings(settings, console_idle_timeout_s=1)))
    await sign_in(client, "alice", USER_PASSWORD)
    (key,) = await redis_client.keys(rkeys.console_session("*"))
    assert 0 < await redis_client.ttl(key) <= 1
    # Redis expires the record after a second without requests (waited for, not slept).
    for _ in range(40):
        if not await redis_client.exists(key):
            break
        import asyncio

        await asyncio.sleep(0.1)
    resp = await client.get("/ui/", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/ui/login")


async def test_no_open_redirect_after_login(admin_client: Client) -> None:
    html = await page(admin_client, "/ui/login?next=//evil.example/x")
    assert "evil.example" not in html.split('name="next"')[1][:60]
    resp = await admin_client.post(
        "/ui/login",
        data={
            "csrf": csrf_in(html),
            "username": "admin",
            "password": ADMIN_PASSWORD,
            "next": "https://evil.example/",
        },
        allow_redirects=False,
    )
    assert resp.headers["Location"] == "/ui/"


async def test_unknown_console_page_is_an_html_404(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    resp = await admin_client.get("/ui/nope")
    assert resp.status == 404
    assert resp.content_type == "text/html"
