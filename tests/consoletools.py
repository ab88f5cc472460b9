"""Driving the web console over HTTP in tests: sign in, read a form's CSRF token, post forms.

(The real-browser tests are in test_console_browser.py; these helpers are for the many
server-side checks that need no browser.)"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')
ONCE = re.compile(r'name="once" value="([A-Za-z0-9_-]+)"')

Client = TestClient[Any, Any]


def csrf_in(html: str) -> str:
    found = CSRF.search(html)
    assert found is not None, "no CSRF field on the page"
    return found[1]


async def page(client: Client, path: str, status: int = 200) -> str:
    resp = await client.get(path, allow_redirects=False)
    text = await resp.text()
    assert resp.status == status, f"{path}: {resp.status} {text[:500]}"
    return text


async def sign_in(client: Client, username: str, password: str) -> None:
    html = await page(client, "/ui/login")
    resp = await client.post(
        "/ui/login",
        data={"csrf": csrf_in(html), "username": username, "password": password, "next": "/ui/"},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()


async def submit(
    client: Client, form_page: str, action: str, data: dict[str, str]
) -> ClientResponse:
    """Post `data` to `action` with the CSRF token (and a form's `once` mark, when it has one)
    read from `form_page`, as a browser would."""
    html = await page(client, form_page)
    hidden = {"csrf": csrf_in(html)}
    if (once := ONCE.search(html)) is not None:
        hidden["once"] = once[1]
    return await client.post(action, data={**hidden, **data}, allow_redirects=False)
