"""Invariant 1: known secrets driven through every admin path appear nowhere at rest.

A full workflow (keys of every built-in format, a rotation, users, tokens, a password change,
failed logins whose wrong password is itself a secret) runs through the admin API; then every
row of every table, every Redis key and value, the apps' logs (rendered and raw) and every
admin response are searched for each plaintext API key, wallet token and password used.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway import db
from tests.conftest import ADMIN_PASSWORD, USER_PASSWORD, Servers, login

# One secret per built-in format (and a custom one); each must be detected or accepted.
KEYS = {
    "stripe": "sk_test_" + "4eC39HqLyjWDarjtT1zdp7dc" + "Q1",
    "stripe_restricted": "rk_live_" + "51HxYzAbCdEfGhIjKlMnOpQr",
    "openai": "sk-proj-" + "Zq8vKx3Lm2Np7Rt4Wy6Bc9Df" + "_Gh1Jk5",
    "openai_plain": "sk-" + "T3BlbkFJ" + "a9b8c7d6e5f4g3h2i1j0",
    "googlemaps": "AIza" + "SyD-9tSrke72PouQMnMX" + "-a7eZSW0jkFMBWY",
    "openweather": "b6907d289e10d714a6e88b30761fae22",
    "custom": "custom-upstream-secret-" + "q7W9e2R4t6Y8",
}
ROTATED = "sk-proj-" + "Rotated0Key1Value2Here3" + "AbCdEf"
NEW_USER_PASSWORD = "carol-first-password-5150"
RESET_PASSWORD = "carol-reset-by-admin-9931"
ALICE_NEW_PASSWORD = "alice-changed-password-7788"
DAVE_PASSWORD = "dave-admin-password-4242"


class Recorder:
    """Every response body the workflow saw, to search afterwards."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, str]] = []

    async def call(
        self,
        client: TestClient[Any, Any],
        method: str,
        path: str,
        status: int,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
    ) -> Any:
        resp: ClientResponse = await client.request(method, path, headers=headers, json=json_body)
        text = await resp.text()
        self.bodies.append((f"{method} {path} -> {resp.status}", text))
        for name, value in resp.headers.items():
            self.bodies.append((f"{method} {path} header {name}", value))
        assert resp.status == status, (method, path, text)
        return json.loads(text) if text else None


def forms(secret: str) -> set[str]:
    """The ways a secret could be written down: raw, URL-quoted, hex, base64."""
    raw = secret.encode()
    return {
        secret,
        quote(secret, safe=""),
        raw.hex(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    }


def find(needles: dict[str, str], haystack: str, where: str) -> list[str]:
    return [
        f"{label} found in {where}"
        for label, secret in needles.items()
        for form in forms(secret)
        if form in haystack
    ]


async def run_workflow(
    client: TestClient[Any, Any], rec: Recorder, as_admin: dict[str, str], as_alice: dict[str, str]
) -> dict[str, str]:
    """Drive every secret-carrying path; returns the needles (label -> plaintext)."""
    needles: dict[str, str] = {f"key:{name}": value for name, value in KEYS.items()}
    needles.update(
        {
            "key:rotated": ROTATED,
            "password:admin": ADMIN_PASSWORD,
            "password:user": USER_PASSWORD,
            "password:carol": NEW_USER_PASSWORD,
            "password:carol-reset": RESET_PASSWORD,
            "password:alice-new": ALICE_NEW_PASSWORD,
            "password:dave": DAVE_PASSWORD,
        }
    )

    # A custom service for the key with no recognisable format.
    await rec.call(
        client,
        "POST",
        "/services",
        201,
        as_admin,
        {
            "slug": "acme",
            "base_url": "https://api.acme.example",
            "auth": {"type": "header", "name": "X-Acme-Key"},
        },
    )

    # Keys of each built-in format, some detected from their format, some named.
    created: dict[str, dict[str, Any]] = {}
    for name, secret in KEYS.items():
        owner = as_alice if name in ("openai_plain", "openweather") else as_admin
        body: dict[str, Any] = {"key": secret, "tier": "free", "name": f"{name} key"}
        if name in ("openai_plain", "custom", "stripe_restricted"):
            body["service"] = {"openai_plain": "openai", "custom": "acme"}.get(name, "stripe")
        body["metadata"] = {"type": "test", "quota": 100, "quotaPeriod": "daily"}
        created[name] = await rec.call(client, "POST", "/keys", 201, owner, body)
        assert created[name]["masked"] != secret
    assert created["googlemaps"]["service"] == "googlemaps"
    assert created["openweather"]["service"] == "openweather"
    assert created["stripe"]["service"] == "stripe"

    # A duplicate is refused without echoing it back.
    await rec.call(client, "POST", "/keys", 409, as_alice, {"key": KEYS["stripe"]})
    # A name or metadata carrying the key is refused.
    await rec.call(
        client, "POST", "/keys", 422, as_admin, {"key": ROTATED, "name": f"mine {ROTATED}"}
    )
    await rec.call(
        client, "POST", "/keys", 422, as_admin, {"key": ROTATED, "metadata": {"note": ROTATED}}
    )

    # Rotate one key to a new secret, change another's fields.
    rotated = await rec.call(
        client, "PUT", f"/keys/{created['openai']['id']}", 200, as_admin, {"key": ROTATED}
    )
    assert rotated["masked"].endswith(ROTATED[-4:])
    await rec.call(
        client, "PUT", f"/keys/{created['stripe']['id']}", 200, as_admin, {"priority": 5}
    )

    # Read everything back, as both users.
    for headers in (as_admin, as_alice):
        await rec.call(client, "GET", "/keys", 200, headers)
        await rec.call(client, "GET", "/keys?service=openai&tier=free", 200, headers)
        await rec.call(client, "GET", "/tokens", 200, headers)
    for record in created.values():
        await rec.call(client, "GET", f"/keys/{record['id']}", 200, as_admin)

    # Users with passwords; a self-service change and an admin reset.
    carol = await rec.call(
        client,
        "POST",
        "/users",
        201,
        as_admin,
        {"username": "carol", "password": NEW_USER_PASSWORD, "role": "USER"},
    )
    await rec.call(
        client,
        "POST",
        "/users",
        201,
        as_admin,
        {"username": "dave", "password": DAVE_PASSWORD, "role": "ADMIN"},
    )
    as_carol = await login(client, "carol", NEW_USER_PASSWORD)
    await rec.call(
        client,
        "PUT",
        "/users/me/password",
        403,
        as_alice,
        {"current_password": KEYS["openweather"], "new_password": ALICE_NEW_PASSWORD},
    )
    await rec.call(
        client,
        "PUT",
        "/users/me/password",
        204,
        as_alice,
        {"current_password": USER_PASSWORD, "new_password": ALICE_NEW_PASSWORD},
    )
    await rec.call(
        client,
        "PUT",
        f"/users/{carol['id']}/password",
        204,
        as_admin,
        {"new_password": RESET_PASSWORD},
    )
    as_alice = await login(client, "alice", ALICE_NEW_PASSWORD)
    as_carol = await login(client, "carol", RESET_PASSWORD)
    await login(client, "dave", DAVE_PASSWORD)
    await rec.call(client, "GET", "/users", 200, as_admin)
    await rec.call(client, "GET", "/users/me", 200, as_carol)

    # Wallet tokens (shown once, at creation).
    for headers, services in ((as_admin, ["openai", "stripe"]), (as_alice, ["openweather"])):
        made = await rec.call(
            client, "POST", "/tokens", 201, headers, {"name": "app", "services": services}
        )
        token = made["token"]
        needles[f"token:{made['id']}"] = token
        shown = await rec.call(client, "GET", f"/tokens/{made['id']}", 200, headers)
        assert token not in json.dumps(shown)

    # Failed logins whose wrong password (or username) is itself a secret.
    tokens = [v for k, v in needles.items() if k.startswith("token:")]
    for username, password in (
        ("admin", KEYS["stripe"]),
        ("admin", tokens[0]),
        ("alice", USER_PASSWORD),  # her old password, now wrong
        ("carol", NEW_USER_PASSWORD),
        ("nobody", ADMIN_PASSWORD),
        (KEYS["googlemaps"], KEYS["openai"]),  # a key pasted into the username field
    ):
        await rec.call(
            client,
            "POST",
            "/auth/login",
            401,
            None,
            {"username": username, "password": password},
        )
    # A wallet token or an API key presented as an admin session is refused, not echoed.
    await rec.call(client, "GET", "/keys", 401, {"Authorization": f"Bearer {tokens[1]}"})
    await rec.call(client, "GET", "/tokens", 401, {"Authorization": f"Bearer {KEYS['stripe']}"})

    # Delete one key and revoke one token: their records go through the audit log too.
    await rec.call(client, "DELETE", f"/keys/{created['custom']['id']}", 204, as_admin)
    token_ids = [k.split(":", 1)[1] for k in needles if k.startswith("token:")]
    await rec.call(client, "DELETE", f"/tokens/{token_ids[0]}", 204, as_admin)
    audit = await rec.call(client, "GET", "/audit?limit=500", 200, as_admin)
    assert audit["total"] >= 15
    await rec.call(client, "GET", "/audit/verify", 200, as_admin)
    return needles


async def scan_postgres(conn: db.Connection, needles: dict[str, str]) -> tuple[list[str], int]:
    found: list[str] = []
    tables = await conn.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
    )
    rows_seen = 0
    for (table,) in tables:
        ident = '"' + table.replace('"', '""') + '"'
        # An identifier from the catalog, quoted; there is no parameter for a table name.
        query = f"SELECT row_to_json(t)::text AS text FROM {ident} t"  # noqa: S608
        for row in await conn.fetch(query):
            rows_seen += 1
            found += find(needles, row["text"], f"{table} (as JSON text)")
        raw = f"SELECT * FROM {ident}"  # noqa: S608
        for row in await conn.fetch(raw):
            for column, value in row.items():
                if isinstance(value, bytes | bytearray | memoryview):
                    blob = bytes(value)
                    found += [
                        f"{label} bytes found in {table}.{column}"
                        for label, secret in needles.items()
                        if secret.encode() in blob
                    ]
                    found += find(needles, blob.decode("latin-1"), f"{table}.{column}")
                else:
                    found += find(needles, str(value), f"{table}.{column}")
    assert {"users", "api_keys", "tokens", "audit_log"} <= {t for (t,) in tables}
    return found, rows_seen


async def redis_entries(client: Redis) -> list[tuple[bytes, bytes]]:
    """Every key and the text of its value, whatever its type."""
    out: list[tuple[bytes, bytes]] = []
    async for key in client.scan_iter(count=500):
        kind = (await client.type(key)).decode()
        value: Iterable[Any]
        if kind == "string":
            value = [await client.get(key) or b""]
        elif kind == "hash":
            value = [x for kv in (await client.hgetall(key)).items() for x in kv]
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "set":
            value = await client.smembers(key)
        elif kind == "zset":
            value = [m for m, _score in await client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            value = [
                x for _id, fields in await client.xrange(key) for kv in fields.items() for x in kv
            ]
        else:
            value = [await client.dump(key) or b""]
        out.append((key, b"\n".join(v if isinstance(v, bytes) else str(v).encode() for v in value)))
    return out


async def scan_redis(url: str, needles: dict[str, str]) -> tuple[list[str], int]:
    found: list[str] = []
    seen = 0
    first = Redis.from_url(url)
    try:
        keyspace = await first.info("keyspace")
    finally:
        await first.aclose()
    databases = sorted({int(name[2:]) for name in keyspace if name.startswith("db")} | {0})
    for number in databases:
        client = Redis.from_url(url, db=number)
        try:
            for key, value in await redis_entries(client):
                seen += 1
                text = (key + b"\n" + value).decode("latin-1")
                found += find(needles, text, f"redis db{number} key {key!r}")
        finally:
            await client.aclose()
    return found, seen


def postgres_server_log(basetemp: Path) -> str:
    """The embedded PostgreSQL's own log (errors quote statements), when it is ours."""
    return "".join(
        p.read_text(errors="replace") for p in basetemp.glob("wallet-data*/postgres/*.log")
    )


async def test_no_plaintext_anywhere(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    as_alice: dict[str, str],
    servers: Servers,
    captured_logs: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    caplog.set_level(logging.DEBUG)
    rec = Recorder()
    needles = await run_workflow(admin_client, rec, as_admin, as_alice)
    assert len([n for n in needles if n.startswith("token:")]) == 2
    found: list[str] = []

    # Admin responses: a key's plaintext never, a token only in its creation response, a
    # password never.
    for where, body in rec.bodies:
        for label, secret in needles.items():
            shown_once = label.startswith("token:") and where.startswith("POST /tokens ")
            if secret in body and not shown_once:
                found.append(f"{label} in response {where}")
    created_tokens = [b for w, b in rec.bodies if w == "POST /tokens -> 201"]
    assert len(created_tokens) == 2
    assert all(any(s in b for s in needles.values()) for b in created_tokens)

    # PostgreSQL: every row of every table.
    conn = await db.connect(servers.database_url)
    try:
        pg_found, rows = await scan_postgres(conn, needles)
        assert await conn.fetchval("SELECT count(*) FROM api_keys") == len(KEYS) - 1
        assert await conn.fetchval("SELECT count(*) FROM tokens") == 2
    finally:
        await conn.close()
    assert rows > 20
    found += pg_found

    # Redis: every key and value (the failed logins left counters there).
    redis_found, entries = await scan_redis(servers.redis_url.reveal(), needles)
    assert entries >= 1
    found += redis_found

    # Logs: as rendered by the apps (redaction included), and the raw stdlib records.
    rendered = captured_logs.getvalue()
    assert '"event": "request"' in rendered
    assert '"path": "/auth/login"' in rendered
    found += find(needles, rendered, "the rendered logs")
    found += find(needles, caplog.text, "caplog text")
    for record in caplog.records:
        found += find(needles, record.getMessage() + repr(record.args), "a raw log record")
    found += find(needles, postgres_server_log(tmp_path_factory.getbasetemp()), "PostgreSQL log")

    assert not found, "\n".join(sorted(set(found)))


async def test_secret_values_never_in_error_messages(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str]
) -> None:
    """Invalid requests that carry a secret in its own field (or a value field beside it)
    get an error that does not repeat it. (An unknown slug or field name is echoed: that is
    the client's own input in a naming slot, not a secret the wallet holds.)"""
    secret = KEYS["openai"]
    cases: list[tuple[str, str, Any]] = [
        ("POST", "/keys", {"key": secret, "service": "no-such-service"}),
        ("POST", "/keys", {"key": secret, "tier": secret}),
        ("POST", "/keys", {"key": secret, "priority": secret}),
        ("POST", "/keys", {"key": secret, "enabled": secret}),
        ("POST", "/keys", {"key": secret, "metadata": {"quotaPeriod": secret}}),
        ("POST", "/keys", {"key": secret, "metadata": {"quota": secret}}),
        ("POST", "/keys", {"key": secret, "name": f"my {secret}"}),
        ("POST", "/keys", {"key": secret + "\u0007"}),
        ("POST", "/users", {"username": "eve", "password": secret, "role": secret}),
        ("POST", "/users", {"username": "e", "password": secret}),
        ("POST", "/tokens", {"name": "x", "services": "openai", "expires_at": secret}),
        ("POST", "/auth/login", {"username": "admin", "password": secret, "extra": 1}),
        ("POST", "/auth/login", {"username": "admin", "password": secret}),
    ]
    leaks = []
    for method, path, body in cases:
        resp = await admin_client.request(method, path, headers=as_admin, json=body)
        text = await resp.text()
        assert 400 <= resp.status < 500, (path, body, text)
        assert "error" in json.loads(text)
        if secret in text:
            leaks.append((path, body, text))
    assert not leaks, leaks
