"""Forward-proxy mode: apps keep calling https://api.openai.com/... with HTTPS_PROXY set to
the wallet, and the wallet swaps their wallet token for a real key, for configured API hosts
only. Official SDKs configured only the way an app would configure them, curl, and the
security edges (hosts, IPs, ports, SNI, Host headers), against fake upstreams on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import googlemaps
import openai
import pytest
import requests
import stripe
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from admin.cli import make_runner
from bench.tls import make_certs
from gateway.app import create_app as create_gateway_app
from gateway.ca import AUTHORITIES
from gateway.fwdproxy import ForwardProxySite
from gateway.settings import Settings
from gateway.usage import USAGE
from tests.conftest import Servers, with_settings
from tests.fakes import FakeUpstream

OPENAI_KEY = "sk-proj-" + "F" * 40
STRIPE_KEY = "sk_test_" + "F" * 40
MAPS_KEY = "AIzaSy" + "F" * 33
WEATHER_KEY = "f" * 32
SDK_TIMEOUT_S = 20.0


@dataclass
class Proxy:
    port: int
    gateway_port: int
    ca_file: Path
    app: web.Application
    upstreams: dict[str, FakeUpstream]
    token: str

    def url(self, token: str | None = None) -> str:
        auth = f"wallet:{token}@" if token else ""
        return f"http://{auth}127.0.0.1:{self.port}"


class Canary:
    """A listener that must never be connected to."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        def accepted(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            w.close()

        self._server = await asyncio.start_server(accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    c = Canary()
    await c.start()
    yield c
    await c.stop()


@pytest.fixture
async def proxy(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_server: Any,
    settings: Settings,
    tmp_path: Path,
) -> AsyncIterator[Proxy]:
    """The four built-in services pointed at fake upstreams, a key for each, one token, and
    a gateway serving its forward-proxy port."""
    upstreams: dict[str, FakeUpstream] = {}
    for slug, key, auth in (
        ("openai", OPENAI_KEY, "bearer"),
        ("stripe", STRIPE_KEY, "bearer"),
        ("googlemaps", MAPS_KEY, "query:key"),
        ("openweather", WEATHER_KEY, "query:appid"),
    ):
        upstream = FakeUpstream(key, auth)
        server = await aiohttp_server(upstream.app())
        upstreams[slug] = upstream
        resp = await admin_client.put(
            f"/services/{slug}",
            headers=as_admin,
            json={"base_url": f"http://127.0.0.1:{server.port}"},
        )
        assert resp.status == 200, await resp.text()
        tier = "paid"
        resp = await admin_client.post(
            "/keys", headers=as_admin, json={"key": key, "service": slug, "tier": tier}
        )
        assert resp.status == 201, await resp.text()
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "fwd", "services": sorted(upstreams)}
    )
    token = (await resp.json())["token"]

    app = create_gateway_app(settings)
    runner = make_runner("gateway", app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    forward_site = ForwardProxySite(runner, "127.0.0.1", 0)
    await forward_site.start()
    authority = app[AUTHORITIES].current
    assert authority is not None
    ca_file = tmp_path / "wallet-ca.pem"
    ca_file.write_text(authority.cert_pem)
    gateway_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Proxy(forward_site.port, gateway_port, ca_file, app, upstreams, token)
    finally:
        await runner.cleanup()


def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                 "all_proxy", "NO_PROXY", "no_proxy", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
                 "CURL_CA_BUNDLE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def only_real_key(upstream: FakeUpstream, token: str, requests_seen: int) -> None:
    assert len(upstream.seen) == requests_seen
    for seen in upstream.seen:
        assert token not in seen.text()


# The official SDKs, configured only the way an app would configure them


async def test_openai_through_https_proxy_with_the_token_in_the_proxy_url(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url(proxy.token))
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_file))

    def call() -> tuple[Any, list[str], list[str]]:
        with openai.OpenAI(api_key="sk-any-dummy", max_retries=0, timeout=SDK_TIMEOUT_S) as c:
            completion = c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            stream = c.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            words = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
            return completion, words, [m.id for m in c.models.list()]

    completion, words, models = await asyncio.to_thread(call)
    assert completion.choices[0].message.content == "hello"
    assert "".join(words) == "hello"
    assert models == ["gpt-4o-mini"]
    upstream = proxy.upstreams["openai"]
    only_real_key(upstream, proxy.token, 3)
    assert all(s.headers["Authorization"] == f"Bearer {OPENAI_KEY}" for s in upstream.seen)
    assert all("sk-any-dummy" not in s.text() for s in upstream.seen)


async def test_openai_async_with_the_token_as_its_api_key(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Proxy-Authorization: each request carries the wallet token in its own key slot."""
    no_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_file))
    async with openai.AsyncOpenAI(
        api_key=proxy.token, max_retries=0, timeout=SDK_TIMEOUT_S
    ) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert completion.choices[0].message.content == "hello"
    only_real_key(proxy.upstreams["openai"], proxy.token, 1)


async def test_stripe_with_its_proxy_option_and_ca_bundle(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_proxy_env(monkeypatch)
    monkeypatch.setattr(stripe, "ca_bundle_path", str(proxy.ca_file))

    def call() -> Any:
        client = stripe.StripeClient("sk_test_dummy", proxy=proxy.url(proxy.token))
        return client.v1.customers.create(params={"email": "a@example.com"})

    customer = await asyncio.to_thread(call)
    assert customer.email == "a@example.com"
    upstream = proxy.upstreams["stripe"]
    only_real_key(upstream, proxy.token, 1)
    assert upstream.seen[0].headers["Authorization"] == f"Bearer {STRIPE_KEY}"


async def test_googlemaps_with_requests_proxies_and_requests_ca_bundle(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_proxy_env(monkeypatch)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(proxy.ca_file))

    def call() -> Any:
        client = googlemaps.Client(
            key="AIzaSyDummyDummyDummyDummyDummyDummy1",
            requests_kwargs={"proxies": {"https": proxy.url(proxy.token)}},
            timeout=SDK_TIMEOUT_S,
        )
        return client.geocode("Berlin")

    results = await asyncio.to_thread(call)
    assert results
    upstream = proxy.upstreams["googlemaps"]
    only_real_key(upstream, proxy.token, 1)
    assert upstream.seen[0].query["key"] == MAPS_KEY


async def test_plain_requests_for_openweather(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_proxy_env(monkeypatch)

    def call() -> requests.Response:
        return requests.get(
            "https://api.openweathermap.org/data/2.5/weather",
            params={"q": "Berlin", "appid": proxy.token},
            proxies={"https": proxy.url()},
            verify=str(proxy.ca_file),
            timeout=SDK_TIMEOUT_S,
        )

    resp = await asyncio.to_thread(call)
    assert resp.status_code == 200, resp.text
    upstream = proxy.upstreams["openweather"]
    only_real_key(upstream, proxy.token, 1)
    assert upstream.seen[0].query["appid"] == WEATHER_KEY


async def curl(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = await asyncio.create_subprocess_exec(
        "curl", "-s", "-S", "--max-time", "20", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_curl_with_proxy_and_cacert(proxy: Proxy) -> None:
    code, out, err = await curl(
        "--proxy", proxy.url(proxy.token), "--cacert", str(proxy.ca_file),
        "https://api.openweathermap.org/data/2.5/weather?q=Berlin&appid=dummy",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["name"]
    upstream = proxy.upstreams["openweather"]
    only_real_key(upstream, proxy.token, 1)
    assert upstream.seen[0].query["appid"] == WEATHER_KEY


async def test_plain_http_absolute_form(proxy: Proxy) -> None:
    code, out, err = await curl(
        "--proxy", proxy.url(proxy.token),
        "http://api.openweathermap.org/data/2.5/weather?q=Berlin&appid=dummy",
    )  # fmt: skip
    assert code == 0, err
    assert "name" in json.loads(out), out
    assert proxy.upstreams["openweather"].seen[0].query["appid"] == WEATHER_KEY


async def test_usage_records_say_forward_mode(proxy: Proxy, servers: Servers) -> None:
    code, _, err = await curl(
        "--proxy", proxy.url(proxy.token), "--cacert", str(proxy.ca_file),
        "https://api.openai.com/v1/models",
    )  # fmt: skip
    assert code == 0, err
    await proxy.app[USAGE].flush()
    conn = await asyncpg.connect(servers.database_url.reveal())
    try:
        rows = await conn.fetch("SELECT service, status, mode FROM usage_records")
    finally:
        await conn.close()
    assert [(r["service"], r["status"], r["mode"]) for r in rows] == [("openai", 200, "forward")]
    metrics = await proxy_metrics(proxy)
    assert (
        "wallet_proxied_requests_total"
        '{app="gateway",mode="forward",service="openai",status="2xx"} 1' in metrics
    )


async def proxy_metrics(proxy: Proxy) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.gateway_port)
    writer.write(b"GET /monitoring/metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()
    writer.close()
    return answer.decode()


# Credentials


async def raw_connect(port: int, target: str, headers: dict[str, str] | None = None) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read(65536)
    writer.close()
    return answer


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"wallet:{token}".encode()).decode()


async def test_a_wrong_proxy_authorization_gets_407(proxy: Proxy) -> None:
    answer = await raw_connect(
        proxy.port,
        "api.openai.com:443",
        {"Proxy-Authorization": basic("AIzaWT_" + "x" * 43)},
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 407 ")
    assert b'Proxy-Authenticate: Basic realm="API Key Wallet"' in head
    assert json.loads(body)["error"]["code"] == "proxy_authentication_required"


async def test_a_request_with_no_token_at_all_gets_401(proxy: Proxy) -> None:
    code, out, err = await curl(
        "--proxy", proxy.url(), "--cacert", str(proxy.ca_file),
        "https://api.openai.com/v1/models",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["error"]["code"] in ("unauthenticated", "missing_token")
    assert proxy.upstreams["openai"].seen == []


# Security: never an open proxy


@pytest.mark.parametrize(
    "target",
    [
        "evil.example:443",  # no service claims it
        "127.0.0.1:{canary}",  # an IP literal
        "localhost:{canary}",  # a host no service claims, on another port
        "api.openai.com:{canary}",  # a served host on a port it does not use
        "[::1]:443",
        "api.openai.com",  # no port
        "api.openai.com:99999",
    ],
)
async def test_connect_to_anything_but_a_served_host_is_refused(
    proxy: Proxy, canary: Canary, target: str
) -> None:
    answer = await raw_connect(
        proxy.port, target.format(canary=canary.port), {"Proxy-Authorization": basic(proxy.token)}
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] in (b"400", b"403"), head
    assert json.loads(body)["error"]["code"] in ("host_not_served", "bad_request")
    assert canary.connections == 0
    assert all(not u.seen for u in proxy.upstreams.values())


async def test_absolute_form_to_an_unserved_host_is_refused(proxy: Proxy, canary: Canary) -> None:
    for url in (
        f"http://127.0.0.1:{canary.port}/",
        f"http://localhost:{canary.port}/x",
        "http://evil.example/x",
        f"http://api.openweathermap.org:{canary.port}/data/2.5/weather",
    ):
        code, out, err = await curl("--proxy", proxy.url(proxy.token), url)
        assert code == 0, err
        assert json.loads(out)["error"]["code"] == "host_not_served", url
    assert canary.connections == 0
    assert all(not u.seen for u in proxy.upstreams.values())


async def open_tunnel(
    proxy: Proxy, host: str, server_name: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n"
        f"Proxy-Authorization: {basic(proxy.token)}\r\n\r\n".encode()
    )
    await writer.drain()
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    context = ssl.create_default_context(cafile=str(proxy.ca_file))
    async with asyncio.timeout(10):
        await writer.start_tls(context, server_hostname=server_name)
    return reader, writer


async def test_sni_must_match_the_connect_host(proxy: Proxy) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await open_tunnel(proxy, "api.openai.com", "api.stripe.com")
    assert all(not u.seen for u in proxy.upstreams.values())


async def test_the_leaf_certificate_names_exactly_the_connect_host(proxy: Proxy) -> None:
    _reader, writer = await open_tunnel(proxy, "api.openai.com", "api.openai.com")
    ssl_object = writer.get_extra_info("ssl_object")
    cert = ssl_object.getpeercert()
    assert cert["subjectAltName"] == (("DNS", "api.openai.com"),)
    assert ssl_object.selected_alpn_protocol() in (None, "http/1.1")
    writer.close()


async def test_a_host_header_naming_another_host_is_refused(proxy: Proxy) -> None:
    reader, writer = await open_tunnel(proxy, "api.openai.com", "api.openai.com")
    for request in (
        b"GET /v1/models HTTP/1.1\r\nHost: api.stripe.com\r\n\r\n",
        b"GET https://api.stripe.com/v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
    ):
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 421 "), head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        assert json.loads(body)["error"]["code"] == "misdirected_request"
    writer.close()
    assert all(not u.seen for u in proxy.upstreams.values())


async def test_the_ca_private_key_is_stored_sealed_and_never_leaks(
    proxy: Proxy,
    servers: Servers,
    redis_client: Redis,
    captured_logs: Any,
) -> None:
    code, _, err = await curl(
        "--proxy", proxy.url(proxy.token), "--cacert", str(proxy.ca_file),
        "https://api.openai.com/v1/models",
    )  # fmt: skip
    assert code == 0, err
    authority = proxy.app[AUTHORITIES].current
    assert authority is not None
    from cryptography.hazmat.primitives import serialization

    der = authority._key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    scalar = authority._key.private_numbers().private_value.to_bytes(32, "big")
    conn = await asyncpg.connect(servers.database_url.reveal())
    try:
        rows = await conn.fetch("SELECT * FROM certificate_authorities")
        dump = await conn.fetchval("SELECT string_agg(t::text, '') FROM certificate_authorities t")
        audit = await conn.fetchval("SELECT string_agg(details::text, '') FROM audit_log")
    finally:
        await conn.close()
    assert len(rows) == 1
    sealed = bytes(rows[0]["sealed"])
    for secret in (der, scalar):
        assert secret not in sealed
        assert secret.hex() not in (dump or "")
        assert secret.hex() not in (audit or "")
    logs = captured_logs.getvalue()
    assert "PRIVATE KEY" not in logs
    assert scalar.hex() not in logs
    keys = [k async for k in redis_client.scan_iter()]
    for key in keys:
        value = await redis_client.dump(key)
        assert value is None or scalar not in value


def upstream_ca_and_cert(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A private CA (its PEM in a file) and a server context for 127.0.0.1 signed by it."""
    bundle, cert, key = make_certs(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return bundle, context


async def test_upstream_tls_is_verified_with_the_configured_bundle(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    aiohttp_client: Any,
    settings: Settings,
    tmp_path: Path,
) -> None:
    bundle, server_context = upstream_ca_and_cert(tmp_path)
    upstream = FakeUpstream(OPENAI_KEY)
    runner = web.AppRunner(upstream.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        resp = await admin_client.put(
            "/services/openai", headers=as_admin, json={"base_url": f"https://127.0.0.1:{port}"}
        )
        assert resp.status == 200, await resp.text()
        resp = await admin_client.post(
            "/keys", headers=as_admin, json={"key": OPENAI_KEY, "service": "openai"}
        )
        assert resp.status == 201, await resp.text()
        resp = await admin_client.post(
            "/tokens", headers=as_admin, json={"name": "t", "services": ["openai"]}
        )
        auth = {"X-Wallet-Token": (await resp.json())["token"]}
        trusting = await aiohttp_client(
            create_gateway_app(with_settings(settings, upstream_ca_bundle=bundle))
        )
        resp = await trusting.get("/openai/v1/models", headers=auth)
        assert resp.status == 200, await resp.text()
        system_store = await aiohttp_client(create_gateway_app(settings))
        resp = await system_store.get("/openai/v1/models", headers=auth)
        assert resp.status == 502  # a certificate the system does not trust: no key sent
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"
        assert len(upstream.seen) == 1
    finally:
        await runner.cleanup()


async def test_a_rotated_ca_reaches_running_gateways(
    proxy: Proxy, admin_client: TestClient[Any, Any], servers: Servers, master_key: bytes
) -> None:
    from gateway import audit, ca, canary, db, invalidation
    from gateway.secret import Secret
    from gateway.vault import Vault

    before = proxy.app[AUTHORITIES].current
    assert before is not None
    conn = await db.connect(servers.database_url)
    redis = Redis.from_url(servers.redis_url.reveal())
    try:
        vault = Vault(Secret(master_key))
        assert await canary.unseal(conn, vault)
        rotated = await ca.rotate(conn, vault, audit.Actor.system("tests"))
        await invalidation.publish(redis, "ca")
    finally:
        await conn.close()
        await redis.aclose()
    for _ in range(100):
        current = proxy.app[AUTHORITIES].current
        if current is not None and current.id == rotated.id:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the gateway did not load the rotated CA")
    proxy.ca_file.write_text(rotated.cert_pem)
    code, _, err = await curl(
        "--proxy", proxy.url(proxy.token), "--cacert", str(proxy.ca_file),
        "https://api.openai.com/v1/models",
    )  # fmt: skip
    assert code == 0, err


async def raw_head(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    async with asyncio.timeout(10):
        answer = await reader.read()  # to EOF: the proxy must close the connection
    writer.close()
    return answer


@pytest.mark.parametrize(
    "head",
    [
        "CONNECT api.openai.com:\u00b2 HTTP/1.1\r\n\r\n".encode("latin-1"),  # "²".isdigit()
        b"CONNECT api.openai.com:443 HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",  # origin-form
        b"CONNECT api.openai.com:443 HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\r\n\r\n",  # TLS straight away
    ],
)
async def test_bad_heads_get_an_answer_and_a_closed_connection(proxy: Proxy, head: bytes) -> None:
    answer = await raw_head(proxy.port, head)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_request"


def test_claimed_hosts_of_a_public_service_go_to_that_host() -> None:
    from gateway.fwdproxy import upstream_base
    from gateway.services import BUILTINS

    maps = next(s for s in BUILTINS if s.slug == "googlemaps")
    assert upstream_base(maps, "roads.googleapis.com") == "https://roads.googleapis.com"
    assert upstream_base(maps, "maps.googleapis.com") is None  # its own base URL
    moved = replace(maps, base_url="http://127.0.0.1:9000/maps")  # a private upstream
    assert upstream_base(moved, "roads.googleapis.com") is None


async def test_a_host_is_claimed_by_one_service_only(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str]
) -> None:
    resp = await admin_client.put(
        "/services/stripe", headers=as_admin, json={"hosts": ["api.stripe.com", "api.openai.com"]}
    )
    assert resp.status == 409
    assert "api.openai.com" in (await resp.json())["error"]["message"]
    resp = await admin_client.post(
        "/services",
        headers=as_admin,
        json={
            "slug": "thief",
            "base_url": "https://evil.example",
            "auth": {"type": "bearer"},
            "hosts": ["api.openai.com"],
        },
    )
    assert resp.status == 409
