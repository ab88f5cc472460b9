"""The web console's shell over HTTP: sign-in, sessions, CSRF, logout, idle expiry and error
pages (each page's own behaviour is tested next to it; a real browser in
test_console_browser.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient
from conftest import ADMIN_PASSWORD, USER_PASSWORD
from consoletools import csrf_in, page, sign_in, submit

from admin.app import create_app
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
    client = await aiohttp_client(create_app(with_settings(settings, console_idle_timeout_s=1)))
    await sign_in(client, "alice", USER_PASSWORD)
    (key,) = await redis_client.keys(rkeys.console_session("*"))
    assert 0 < await redis_client.ttl(key) <= 1
    # Redis expires the record after a second without requests (waited for, not slept).
    for _ in range(40):
        if not await redis_client.exists(key):
            break
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


async def test_a_session_whose_user_may_no_longer_act_ends_without_a_loop(
    admin_client: Client, world: Any, as_admin: dict[str, str], redis_client: Any
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    resp = await admin_client.put(
        f"/users/{world.user_id}", json={"enabled": False}, headers=as_admin
    )
    assert resp.status == 200, await resp.text()
    resp = await admin_client.get("/ui/", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/ui/login")
    assert await redis_client.keys(rkeys.console_session("*")) == []
    # The login form is shown (not another redirect), with the reason.
    html = await page(admin_client, resp.headers["Location"])
    assert "disabled" in html
    assert 'id="login-form"' in html


async def test_a_password_change_in_the_same_second_ends_the_session(
    admin_client: Client, world: Any, as_admin: dict[str, str]
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    resp = await admin_client.put(
        f"/users/{world.user_id}/password",
        json={"new_password": "another-password-42"},
        headers=as_admin,
    )
    assert resp.status in (200, 204), await resp.text()
    resp = await admin_client.get("/ui/keys", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/ui/login")


async def test_an_unreadable_form_is_a_400_page(admin_client: Client) -> None:
    for content_type, body in (
        ("application/x-www-form-urlencoded", b"username=\xff\xfe"),
        ("application/x-www-form-urlencoded; charset=bogus-xx", b"username=a"),
        ("multipart/form-data", b"--x\r\n"),
    ):
        resp = await admin_client.post(
            "/ui/login", data=body, headers={"Content-Type": content_type}
        )
        assert resp.status == 400, (content_type, await resp.text())
        assert resp.content_type == "text/html"


async def test_error_pages_keep_retry_after_and_allow(admin_client: Client) -> None:
    resp = await admin_client.get("/ui/logout")
    assert resp.status == 405
    assert "POST" in resp.headers["Allow"]
    for _ in range(6):
        html = await page(admin_client, "/ui/login")
        resp = await admin_client.post(
            "/ui/login",
            data={"csrf": csrf_in(html), "username": "bob", "password": "wrong-password-x"},
        )
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) > 0


async def test_only_the_consoles_own_notices_are_shown(admin_client: Client) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    crafted = await page(admin_client, "/ui/?notice=Call+555-0100+now")
    assert "555-0100" not in crafted
    resp = await submit(admin_client, "/ui/", "/ui/logout", {})
    location = resp.headers["Location"]
    assert "seal=" in location
    assert "Signed out." in await page(admin_client, location)


async def test_signing_in_again_ends_the_previous_session(
    admin_client: Client, redis_client: Any
) -> None:
    await sign_in(admin_client, "admin", ADMIN_PASSWORD)
    (first,) = await redis_client.keys(rkeys.console_session("*"))
    # Signed in, the login form is the session's own (its CSRF token is the session's).
    resp = await submit(
        admin_client, "/ui/", "/ui/login", {"username": "alice", "password": USER_PASSWORD}
    )
    assert resp.status == 303, await resp.text()
    keys = await redis_client.keys(rkeys.console_session("*"))
    assert len(keys) == 1
    assert keys != [first]
    assert "alice" in await page(admin_client, "/ui/")


async def test_a_form_sent_after_the_session_ended_leads_to_sign_in_and_back(
    admin_client: Client, redis_client: Any
) -> None:
    await sign_in(admin_client, "alice", USER_PASSWORD)
    token = csrf_in(await page(admin_client, "/ui/tokens/new"))
    for key in await redis_client.keys(rkeys.console_session("*")):
        await redis_client.delete(key)  # as the idle timeout does
    origin = admin_client.make_url("/ui/tokens/new")
    resp = await admin_client.post(
        "/ui/tokens/new",
        data={"csrf": token, "name": "late"},
        headers={"Referer": str(origin)},
        allow_redirects=False,
    )
    assert resp.status == 303
    location = resp.headers["Location"]
    assert location.startswith("/ui/login?next=/ui/tokens/new")
    assert "session ended" in await page(admin_client, location)


async def test_a_sign_in_form_left_open_too_long_is_shown_again(admin_client: Client) -> None:
    html = await page(admin_client, "/ui/login")
    admin_client.session.cookie_jar.clear()  # the login cookie's hour is over
    resp = await admin_client.post(
        "/ui/login",
        data={"csrf": csrf_in(html), "username": "admin", "password": ADMIN_PASSWORD},
        allow_redirects=False,
    )
    assert resp.status == 403
    text = await resp.text()
    assert "expired" in text
    assert 'value="admin"' in text
    assert ADMIN_PASSWORD not in text
    # ... with a fresh token that works.
    resp = await admin_client.post(
        "/ui/login",
        data={"csrf": csrf_in(text), "username": "admin", "password": ADMIN_PASSWORD},
        allow_redirects=False,
    )
    assert resp.status == 303
