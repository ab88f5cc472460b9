"""`/services` through the running admin app: the built-in catalog, pointing a service
elsewhere (with the insecure-upstream rule), custom services, and who may change them."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import login

from admin.app import create_app
from gateway.settings import Settings
from tests.conftest import assert_error

Client = TestClient[Any, Any]

ACME: dict[str, Any] = {
    "slug": "acme",
    "name": "Acme Weather",
    "base_url": "https://api.acme.test/v2",
    "auth": {"type": "header", "name": "X-Acme-Key"},
}


async def service(client: Client, headers: dict[str, str], slug: str) -> dict[str, Any]:
    resp = await client.get(f"/services/{slug}", headers=headers)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def test_lists_the_four_builtins(admin_client: Client, as_alice: dict[str, str]) -> None:
    resp = await admin_client.get("/services", headers=as_alice)
    assert resp.status == 200, await resp.text()
    listing = await resp.json()
    assert listing["total"] == 4
    by_slug = {s["slug"]: s for s in listing["items"]}
    assert set(by_slug) == {"stripe", "openai", "openweather", "googlemaps"}
    expected = {
        "stripe": ("https://api.stripe.com", {"type": "bearer", "name": None}, "api.stripe.com"),
        "openai": ("https://api.openai.com", {"type": "bearer", "name": None}, "api.openai.com"),
        "openweather": (
            "https://api.openweathermap.org",
            {"type": "query", "name": "appid"},
            "api.openweathermap.org",
        ),
        "googlemaps": (
            "https://maps.googleapis.com",
            {"type": "query", "name": "key"},
            "maps.googleapis.com",
        ),
    }
    for slug, (base_url, auth, host) in expected.items():
        item = by_slug[slug]
        assert set(item) >= {"slug", "name", "base_url", "auth", "hosts"}
        assert item["name"]
        assert item["base_url"] == base_url
        assert item["auth"] == auth
        assert item["hosts"][0] == host
        assert item["builtin"] is True
    assert by_slug["googlemaps"]["hosts"] == [
        "maps.googleapis.com",
        "roads.googleapis.com",
        "www.googleapis.com",
        "addressvalidation.googleapis.com",
    ]

    resp = await admin_client.get("/services?limit=1&offset=1", headers=as_alice)
    page = await resp.json()
    assert page["total"] == 4
    assert len(page["items"]) == 1


async def test_show_one_and_unknown_slug(admin_client: Client, as_alice: dict[str, str]) -> None:
    stripe = await service(admin_client, as_alice, "stripe")
    assert stripe["auth"] == {"type": "bearer", "name": None}
    error = await assert_error(
        await admin_client.get("/services/nope", headers=as_alice), 404, "unknown_service"
    )
    assert "nope" in error["message"]


async def test_unknown_slug_is_404_for_every_method(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    await assert_error(
        await admin_client.put(
            "/services/nope", headers=as_admin, json={"base_url": "https://x.test"}
        ),
        404,
        "unknown_service",
    )
    await assert_error(
        await admin_client.delete("/services/nope", headers=as_admin), 404, "unknown_service"
    )


async def test_point_a_builtin_at_loopback(admin_client: Client, as_admin: dict[str, str]) -> None:
    resp = await admin_client.put(
        "/services/openai", headers=as_admin, json={"base_url": "http://127.0.0.1:9000"}
    )
    assert resp.status == 200, await resp.text()
    updated = await resp.json()
    assert updated["base_url"] == "http://127.0.0.1:9000"
    assert updated["auth"] == {"type": "bearer", "name": None}
    assert updated["builtin"] is True
    assert (await service(admin_client, as_admin, "openai"))["base_url"] == "http://127.0.0.1:9000"

    for url in ("http://localhost:8080/", "http://[::1]:9000/v1"):
        resp = await admin_client.put("/services/openai", headers=as_admin, json={"base_url": url})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["base_url"] == url.rstrip("/")


async def test_plain_http_elsewhere_is_refused(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    before = await service(admin_client, as_admin, "openai")
    for url in ("http://example.com", "http://10.0.0.5:8080", "http://127.0.0.1.example.com"):
        error = await assert_error(
            await admin_client.put("/services/openai", headers=as_admin, json={"base_url": url}),
            422,
            "validation_error",
        )
        assert error["field"] == "base_url"
    assert await service(admin_client, as_admin, "openai") == before


async def test_plain_http_allowed_when_insecure_upstreams_are(
    aiohttp_client: Any, settings: Settings, world: Any
) -> None:
    client: Client = await aiohttp_client(
        create_app(replace(settings, allow_insecure_upstreams=True))
    )
    headers = await login(client)
    resp = await client.put(
        "/services/openai", headers=headers, json={"base_url": "http://example.com"}
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["base_url"] == "http://example.com"
    # Credentials are still refused.
    resp = await client.put(
        "/services/openai", headers=headers, json={"base_url": "http://u:p@example.com"}
    )
    await assert_error(resp, 422, "validation_error")


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pass@api.openai.com",
        "https://user@api.openai.com",
        "https://api.openai.com/?org=1",
        "https://api.openai.com/#frag",
        "ftp://api.openai.com",
        "file:///etc/passwd",
        "api.openai.com",
        "/v1",
        "",
        42,
        None,
    ],
)
async def test_bad_base_urls_are_422(
    admin_client: Client, as_admin: dict[str, str], url: Any
) -> None:
    resp = await admin_client.put("/services/openai", headers=as_admin, json={"base_url": url})
    error = await assert_error(resp, 422, "validation_error")
    assert error["field"] == "base_url"
    text = await resp.text()
    assert "pass@" not in text


async def test_hosts_can_be_set_and_are_normalised(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    resp = await admin_client.put(
        "/services/openai",
        headers=as_admin,
        json={"hosts": ["API.OpenAI.com.", "api.openai.com", "eu.api.openai.com"]},
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["hosts"] == ["api.openai.com", "eu.api.openai.com"]
    for bad in (["bad host"], "api.openai.com", [1]):
        error = await assert_error(
            await admin_client.put("/services/openai", headers=as_admin, json={"hosts": bad}),
            422,
            "validation_error",
        )
        assert error["field"] == "hosts"


async def test_builtin_can_change_auth_scheme(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    resp = await admin_client.put(
        "/services/stripe", headers=as_admin, json={"auth": {"type": "basic"}}
    )
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["auth"] == {"type": "basic", "name": None}
    resp = await admin_client.put(
        "/services/stripe", headers=as_admin, json={"unknown": True, "name": "x"}
    )
    await assert_error(resp, 422, "validation_error")


async def test_user_may_read_but_not_change(
    admin_client: Client, as_alice: dict[str, str], as_admin: dict[str, str]
) -> None:
    before = await service(admin_client, as_alice, "openai")
    await assert_error(
        await admin_client.put(
            "/services/openai", headers=as_alice, json={"base_url": "http://127.0.0.1:9000"}
        ),
        403,
        "forbidden",
    )
    await assert_error(
        await admin_client.post("/services", headers=as_alice, json=ACME), 403, "forbidden"
    )
    await assert_error(
        await admin_client.delete("/services/openai", headers=as_alice), 403, "forbidden"
    )
    assert await service(admin_client, as_admin, "openai") == before
    resp = await admin_client.get("/services/acme", headers=as_admin)
    await assert_error(resp, 404, "unknown_service")


async def test_services_need_a_session(admin_client: Client) -> None:
    await assert_error(await admin_client.get("/services"), 401, "unauthenticated")
    await assert_error(await admin_client.post("/services", json=ACME), 401, "unauthenticated")


async def test_create_custom_service_with_header_auth(
    admin_client: Client, as_admin: dict[str, str], as_alice: dict[str, str]
) -> None:
    resp = await admin_client.post("/services", headers=as_admin, json=ACME)
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created == {
        "slug": "acme",
        "name": "Acme Weather",
        "base_url": "https://api.acme.test/v2",
        "auth": {"type": "header", "name": "X-Acme-Key"},
        "hosts": ["api.acme.test"],
        "builtin": False,
        "strategy": "priority",
        "cost_model": None,
    }
    assert await service(admin_client, as_alice, "acme") == created
    resp = await admin_client.get("/services", headers=as_alice)
    assert (await resp.json())["total"] == 5


async def test_create_custom_service_with_query_auth_and_hosts(
    admin_client: Client, as_admin: dict[str, str]
) -> None:
    resp = await admin_client.post(
        "/services",
        headers=as_admin,
        json={
            "slug": "geo_v2",
            "base_url": "http://127.0.0.1:9100",
            "auth": {"type": "query", "name": "api_key"},
            "hosts": ["geo.example.org"],
        },
    )
    assert resp.status == 201, await resp.text()
    created = await resp.json()
    assert created["name"] == "geo_v2"
    assert created["auth"] == {"type": "query", "name": "api_key"}
    assert created["hosts"] == ["geo.example.org"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"slug": "proxy"}, "slug"),
        ({"slug": "monitoring"}, "slug"),
        ({"slug": "auth"}, "slug"),
        ({"slug": "Acme"}, "slug"),
        ({"slug": "ac/me"}, "slug"),
        ({"slug": ""}, "slug"),
        ({"slug": "acme\n"}, "slug"),
        ({"auth": {"type": "header", "name": "X-Acme-Key\n"}}, "auth.name"),
        ({"auth": {"type": "header"}}, "auth.name"),
        ({"auth": {"type": "query", "name": "bad name"}}, "auth.name"),
        ({"auth": {"type": "bearer", "name": "X-Key"}}, "auth.name"),
        ({"auth": {"type": "cookie", "name": "k"}}, "auth.type"),
        ({"auth": "bearer"}, "auth"),
        ({"base_url": "http://example.com"}, "base_url"),
        ({"base_url": "https://k:s@api.acme.test"}, "base_url"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_create_validation_errors(
    admin_client: Client, as_admin: dict[str, str], changes: dict[str, Any], field: str
) -> None:
    resp = await admin_client.post("/services", headers=as_admin, json={**ACME, **changes})
    error = await assert_error(resp, 422, "validation_error")
    assert error["field"] == field
    resp = await admin_client.get("/services", headers=as_admin)
    assert (await resp.json())["total"] == 4


@pytest.mark.parametrize("missing", ["base_url", "auth", "slug"])
async def test_create_requires_fields(
    admin_client: Client, as_admin: dict[str, str], missing: str
) -> None:
    body = {k: v for k, v in ACME.items() if k != missing}
    error = await assert_error(
        await admin_client.post("/services", headers=as_admin, json=body), 422, "validation_error"
    )
    assert error["field"] == missing


async def test_duplicate_slug_is_409(admin_client: Client, as_admin: dict[str, str]) -> None:
    resp = await admin_client.post("/services", headers=as_admin, json=ACME)
    assert resp.status == 201, await resp.text()
    await assert_error(
        await admin_client.post("/services", headers=as_admin, json=ACME), 409, "conflict"
    )
    before = await service(admin_client, as_admin, "stripe")
    await assert_error(
        await admin_client.post("/services", headers=as_admin, json={**ACME, "slug": "stripe"}),
        409,
        "conflict",
    )
    assert await service(admin_client, as_admin, "stripe") == before


async def test_builtin_cannot_be_deleted(admin_client: Client, as_admin: dict[str, str]) -> None:
    for slug in ("stripe", "openai", "openweather", "googlemaps"):
        await assert_error(
            await admin_client.delete(f"/services/{slug}", headers=as_admin), 409, "conflict"
        )
    resp = await admin_client.get("/services", headers=as_admin)
    assert (await resp.json())["total"] == 4


async def test_custom_service_with_keys_cannot_be_deleted(
    admin_client: Client, as_admin: dict[str, str], as_alice: dict[str, str]
) -> None:
    resp = await admin_client.post("/services", headers=as_admin, json=ACME)
    assert resp.status == 201, await resp.text()
    resp = await admin_client.post(
        "/keys", headers=as_alice, json={"key": "acme-secret-0123456789", "service": "acme"}
    )
    assert resp.status == 201, await resp.text()
    key_id = (await resp.json())["id"]

    await assert_error(
        await admin_client.delete("/services/acme", headers=as_admin), 409, "conflict"
    )
    assert (await service(admin_client, as_admin, "acme"))["slug"] == "acme"

    resp = await admin_client.delete(f"/keys/{key_id}", headers=as_alice)
    assert resp.status == 204
    resp = await admin_client.delete("/services/acme", headers=as_admin)
    assert resp.status == 204
    await assert_error(
        await admin_client.get("/services/acme", headers=as_admin), 404, "unknown_service"
    )
    await assert_error(
        await admin_client.delete("/services/acme", headers=as_admin), 404, "unknown_service"
    )


async def test_changes_are_audited(admin_client: Client, as_admin: dict[str, str]) -> None:
    resp = await admin_client.post("/services", headers=as_admin, json=ACME)
    assert resp.status == 201
    resp = await admin_client.put(
        "/services/acme", headers=as_admin, json={"base_url": "https://api2.acme.test"}
    )
    assert resp.status == 200
    resp = await admin_client.delete("/services/acme", headers=as_admin)
    assert resp.status == 204
    resp = await admin_client.get("/audit?limit=500", headers=as_admin)
    assert resp.status == 200, await resp.text()
    actions = [(e.get("action"), e.get("target_id")) for e in (await resp.json())["items"]]
    for action in ("service.create", "service.update", "service.delete"):
        assert (action, "acme") in actions, actions
