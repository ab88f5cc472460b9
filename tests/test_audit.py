"""The audit log: every change through the API leaves a record (in the change's transaction,
with no secret in it); `/audit` filters and pages; the hash chain detects edited, deleted
and forged records, through `GET /audit/verify` and `wallet audit verify`."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from gateway import audit, db
from gateway.settings import Settings
from tests.conftest import World, random_master_key_b64, wallet_bin

NEW_USER_PASSWORD = "carol-password-for-audit"


def stripe_key() -> str:
    return "sk_test_" + secrets.token_hex(16)


async def get_audit(
    client: TestClient[Any, Any], headers: dict[str, str], **params: str | int
) -> dict[str, Any]:
    resp = await client.get(
        "/audit", headers=headers, params={k: str(v) for k, v in params.items()}
    )
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def get_verdict(client: TestClient[Any, Any], headers: dict[str, str]) -> dict[str, Any]:
    resp = await client.get("/audit/verify", headers=headers)
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def add_key(
    client: TestClient[Any, Any], headers: dict[str, str], secret: str | None = None
) -> dict[str, Any]:
    resp = await client.post(
        "/keys", headers=headers, json={"key": secret or stripe_key(), "service": "stripe"}
    )
    assert resp.status == 201, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


@pytest.fixture
async def conn(settings: Settings, world: World) -> AsyncIterator[asyncpg.Connection[Any]]:
    assert settings.database_url is not None
    connection = await db.connect(settings.database_url)
    try:
        yield connection
    finally:
        await connection.close()


@dataclass(frozen=True)
class Cli:
    env: dict[str, str]
    cwd: Path

    async def verify(self) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            str(wallet_bin()),
            "audit",
            "verify",
            env=self.env,
            cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode() + err.decode()


@pytest.fixture
def cli(settings: Settings, tmp_path: Path) -> Cli:
    assert settings.database_url is not None
    assert settings.redis_url is not None
    env = {
        "DATABASE_URL": settings.database_url.reveal(),
        "REDIS_URL": settings.redis_url.reveal(),
        "JWT_SECRET": secrets.token_urlsafe(40),
        "ENCRYPTION_KEY": random_master_key_b64(),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    return Cli(env, tmp_path)


async def test_every_change_leaves_an_audit_record(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], world: World
) -> None:
    secret, replacement = stripe_key(), stripe_key()
    plaintexts = [secret, replacement, NEW_USER_PASSWORD]
    expected: list[tuple[str, str, str]] = []  # (action, target_type, target_id)

    key = await add_key(admin_client, as_admin, secret)
    expected.append(("key.create", "key", key["id"]))

    resp = await admin_client.put(
        f"/keys/{key['id']}", headers=as_admin, json={"key": replacement, "name": "renamed"}
    )
    assert resp.status == 200, await resp.text()
    expected.append(("key.update", "key", key["id"]))

    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "app", "services": ["stripe"]}
    )
    assert resp.status == 201, await resp.text()
    token = await resp.json()
    plaintexts.append(token["token"])
    expected.append(("token.create", "token", token["id"]))

    resp = await admin_client.delete(f"/tokens/{token['id']}", headers=as_admin)
    assert resp.status == 204, await resp.text()
    expected.append(("token.revoke", "token", token["id"]))

    resp = await admin_client.post(
        "/users",
        headers=as_admin,
        json={"username": "carol", "password": NEW_USER_PASSWORD, "role": "USER"},
    )
    assert resp.status == 201, await resp.text()
    carol = await resp.json()
    expected.append(("user.create", "user", carol["id"]))

    resp = await admin_client.put(
        "/services/openai", headers=as_admin, json={"base_url": "http://127.0.0.1:9000"}
    )
    assert resp.status == 200, await resp.text()
    expected.append(("service.update", "service", "openai"))

    resp = await admin_client.delete(f"/keys/{key['id']}", headers=as_admin)
    assert resp.status == 204, await resp.text()
    expected.append(("key.delete", "key", key["id"]))

    resp = await admin_client.get("/audit", headers=as_admin, params={"limit": "500"})
    assert resp.status == 200
    raw = await resp.text()
    listing = json.loads(raw)
    records = [r for r in listing["items"] if r["actor"] != "system"]
    got = [(r["action"], r["target_type"], r["target_id"]) for r in reversed(records)]
    assert got == expected
    seqs = [r["seq"] for r in listing["items"]]
    assert seqs == sorted(seqs, reverse=True)
    assert listing["total"] == len(seqs)
    for record in records:
        assert record["actor"] == "admin"
        assert record["actor_id"] == world.admin_id
        assert record["source"] == "127.0.0.1"
        assert record["at"]
        assert len(record["hash"]) == 64
        assert isinstance(record["details"], dict)
    by_action = {r["action"]: r for r in records}
    assert by_action["key.create"]["details"]["service"] == "stripe"
    assert by_action["key.update"]["details"]["secret_replaced"] is True
    assert "name" in by_action["key.update"]["details"]["changed"]
    assert by_action["user.create"]["details"] == {"username": "carol", "role": "USER"}
    assert by_action["service.update"]["details"] == {"changed": ["base_url"]}
    # No secret anywhere in the audit: not the keys, not the password, not the token.
    for plaintext in plaintexts:
        assert plaintext not in raw
    assert (await get_verdict(admin_client, as_admin))["ok"] is True


async def test_audit_filters_and_pagination(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str]
) -> None:
    keys = [await add_key(admin_client, as_admin) for _ in range(5)]
    resp = await admin_client.post(
        "/tokens", headers=as_admin, json={"name": "t", "services": ["openai"]}
    )
    assert resp.status == 201

    created = await get_audit(admin_client, as_admin, action="key.create")
    assert created["total"] == 5
    assert {r["target_id"] for r in created["items"]} == {k["id"] for k in keys}
    assert all(r["action"] == "key.create" for r in created["items"])

    tokens = await get_audit(admin_client, as_admin, target_type="token")
    assert tokens["total"] == 1
    assert tokens["items"][0]["action"] == "token.create"

    by_target = await get_audit(admin_client, as_admin, target_id=keys[2]["id"])
    assert by_target["total"] == 1
    assert by_target["items"][0]["target_id"] == keys[2]["id"]

    by_actor = await get_audit(admin_client, as_admin, actor="system")
    assert by_actor["total"] >= 1
    assert all(r["actor"] == "system" for r in by_actor["items"])

    none = await get_audit(admin_client, as_admin, action="no.such.action")
    assert none == {"items": [], "total": 0}

    everything = await get_audit(admin_client, as_admin)
    total = everything["total"]
    assert total == len(everything["items"]) >= 7
    pages: list[dict[str, Any]] = []
    for offset in range(0, total, 2):
        page = await get_audit(admin_client, as_admin, limit=2, offset=offset)
        assert page["total"] == total
        assert 1 <= len(page["items"]) <= 2
        pages.extend(page["items"])
    assert [r["seq"] for r in pages] == [r["seq"] for r in everything["items"]]
    assert [r["seq"] for r in pages] == list(range(total, 0, -1))
    past_end = await get_audit(admin_client, as_admin, limit=2, offset=total)
    assert past_end == {"items": [], "total": total}
    filtered_page = await get_audit(admin_client, as_admin, action="key.create", limit=2, offset=4)
    assert filtered_page["total"] == 5
    assert len(filtered_page["items"]) == 1

    for bad in ({"limit": "0"}, {"limit": "-1"}, {"offset": "x"}, {"limit": "100000"}):
        resp = await admin_client.get("/audit", headers=as_admin, params=bad)
        assert resp.status == 422
        assert (await resp.json())["error"]["code"] == "validation_error"


async def test_audit_is_admin_only(
    admin_client: TestClient[Any, Any], as_alice: dict[str, str]
) -> None:
    for path in ("/audit", "/audit/verify"):
        resp = await admin_client.get(path, headers=as_alice)
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "forbidden"
        resp = await admin_client.get(path)
        assert resp.status == 401


async def test_users_changes_are_attributed_to_themselves(
    admin_client: TestClient[Any, Any],
    as_alice: dict[str, str],
    as_admin: dict[str, str],
    world: World,
) -> None:
    key = await add_key(admin_client, as_alice)
    record = (await get_audit(admin_client, as_admin, target_id=key["id"]))["items"][0]
    assert (record["actor"], record["actor_id"]) == ("alice", world.user_id)
    assert record["details"]["owner_id"] == world.user_id


async def test_failed_change_leaves_no_audit_record(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str]
) -> None:
    secret = stripe_key()
    await add_key(admin_client, as_admin, secret)
    before = await get_audit(admin_client, as_admin)

    resp = await admin_client.post("/keys", headers=as_admin, json={"key": secret})
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "conflict"
    resp = await admin_client.post(
        "/users", headers=as_admin, json={"username": "alice", "password": "x" * 20}
    )
    assert resp.status == 409
    resp = await admin_client.put(
        "/services/openai", headers=as_admin, json={"base_url": "ftp://example.com"}
    )
    assert resp.status == 422
    resp = await admin_client.delete(f"/keys/{'0' * 8}-0000-0000-0000-{'0' * 12}", headers=as_admin)
    assert resp.status == 404

    after = await get_audit(admin_client, as_admin)
    assert after == before


async def test_concurrent_duplicates_leave_one_record(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str]
) -> None:
    """Racing creates of one key: one wins, the losers' transactions (and records) roll back."""
    secret = stripe_key()
    responses = await asyncio.gather(
        *(admin_client.post("/keys", headers=as_admin, json={"key": secret}) for _ in range(6))
    )
    assert sorted(r.status for r in responses) == [201] + [409] * 5
    created = await get_audit(admin_client, as_admin, action="key.create")
    assert created["total"] == 1
    verdict = await get_verdict(admin_client, as_admin)
    assert verdict["ok"] is True
    assert verdict["breaks"] == []


async def test_append_outside_a_transaction_is_refused(
    conn: asyncpg.Connection[Any],
) -> None:
    with pytest.raises(AssertionError, match="transaction"):
        await audit.append(conn, audit.Actor.system("tests"), "x.y", "x", None)
    # And a rolled-back change takes its record with it.
    count = await conn.fetchval("SELECT count(*) FROM audit_log")

    async def failing_change() -> None:
        async with conn.transaction():
            await audit.append(conn, audit.Actor.system("tests"), "x.y", "x", None)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await failing_change()
    assert await conn.fetchval("SELECT count(*) FROM audit_log") == count


async def make_history(client: TestClient[Any, Any], headers: dict[str, str], n: int) -> int:
    """n changes on top of the seed record; returns the head seq."""
    for _ in range(n):
        await add_key(client, headers)
    verdict = await get_verdict(client, headers)
    assert verdict["ok"] is True
    assert verdict["breaks"] == []
    assert verdict["checked"] == verdict["head_seq"] == n + 1
    return int(verdict["head_seq"])


async def test_verify_intact_chain(
    admin_client: TestClient[Any, Any], as_admin: dict[str, str], cli: Cli
) -> None:
    head = await make_history(admin_client, as_admin, 4)
    verdict = await get_verdict(admin_client, as_admin)
    items = (await get_audit(admin_client, as_admin, limit=1))["items"]
    assert verdict["head_hash"] == items[0]["hash"]
    assert items[0]["seq"] == head
    status, output = await cli.verify()
    assert status == 0, output
    assert "audit chain intact" in output
    assert f"checked {head} record(s)" in output
    assert verdict["head_hash"] in output
    assert "BROKEN" not in output


async def test_edited_record_is_named(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    conn: asyncpg.Connection[Any],
    cli: Cli,
) -> None:
    await make_history(admin_client, as_admin, 5)
    await conn.execute(
        'UPDATE audit_log SET details = details || \'{"service": "openai"}\' WHERE seq = 3'
    )
    verdict = await get_verdict(admin_client, as_admin)
    assert verdict["ok"] is False
    assert [(b["seq"], "edited" in b["problem"]) for b in verdict["breaks"]] == [(3, True)]
    status, output = await cli.verify()
    assert status == 1, output
    assert "BROKEN at seq 3:" in output
    assert "edited" in output
    assert "audit chain broken" in output
    assert "audit chain intact" not in output

    # Editing the action (or the actor) of another record is named the same way.
    await conn.execute("UPDATE audit_log SET action = 'key.read' WHERE seq = 5")
    await conn.execute("UPDATE audit_log SET actor = 'mallory' WHERE seq = 6")
    verdict = await get_verdict(admin_client, as_admin)
    assert [b["seq"] for b in verdict["breaks"]] == [3, 5, 6]
    assert all("edited" in b["problem"] for b in verdict["breaks"])
    status, output = await cli.verify()
    assert status == 1
    assert all(f"BROKEN at seq {s}:" in output for s in (3, 5, 6))


async def test_deleted_record_is_named(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    conn: asyncpg.Connection[Any],
    cli: Cli,
) -> None:
    head = await make_history(admin_client, as_admin, 5)
    await conn.execute("DELETE FROM audit_log WHERE seq = 4")
    verdict = await get_verdict(admin_client, as_admin)
    assert verdict["ok"] is False
    assert verdict["checked"] == head - 1
    assert {b["seq"] for b in verdict["breaks"]} == {5}
    problems = " / ".join(b["problem"] for b in verdict["breaks"])
    assert "record(s) 4 missing" in problems
    status, output = await cli.verify()
    assert status == 1, output
    assert "BROKEN at seq 5: record(s) 4 missing" in output

    # Deleting the tail can't be seen from the chain alone, but the head moves: the verdict
    # reports it so an operator can compare it with a head recorded elsewhere.
    await conn.execute("DELETE FROM audit_log WHERE seq = $1", head)
    assert (await get_verdict(admin_client, as_admin))["head_seq"] == head - 1


async def test_forged_record_is_detected(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    conn: asyncpg.Connection[Any],
    cli: Cli,
) -> None:
    """A record slipped in at seq 4 (later ones shifted up) with a correctly computed hash
    over its predecessor: the record after it no longer links."""
    head = await make_history(admin_client, as_admin, 5)
    async with conn.transaction():
        await conn.execute("UPDATE audit_log SET seq = seq + 1000 WHERE seq >= 4")
        await conn.execute("UPDATE audit_log SET seq = seq - 999 WHERE seq >= 1000")
        prev = await conn.fetchval("SELECT hash FROM audit_log WHERE seq = 3")
        at = datetime.now(UTC)
        record = {
            "seq": 4,
            "at": at.isoformat(timespec="microseconds"),
            "actor_id": None,
            "actor": "system",
            "action": "key.delete",
            "target_type": "key",
            "target_id": "forged",
            "source": "cli",
            "details": {},
        }
        await conn.execute(
            audit.INSERT,
            4,
            at,
            None,
            "system",
            "key.delete",
            "key",
            "forged",
            "cli",
            {},
            prev,
            audit.record_hash(prev, record),
        )
    verdict = await get_verdict(admin_client, as_admin)
    assert verdict["ok"] is False
    assert verdict["checked"] == head + 1
    first = min(b["seq"] for b in verdict["breaks"])
    assert first == 5
    assert any(b["seq"] == 5 and "does not link" in b["problem"] for b in verdict["breaks"])
    assert all(b["seq"] != 4 for b in verdict["breaks"])
    status, output = await cli.verify()
    assert status == 1, output
    assert "BROKEN at seq 5: does not link" in output


async def test_forged_record_appended_with_a_made_up_link(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    conn: asyncpg.Connection[Any],
    cli: Cli,
) -> None:
    head = await make_history(admin_client, as_admin, 3)
    at = datetime.now(UTC)
    await conn.execute(
        audit.INSERT,
        head + 1,
        at,
        None,
        "system",
        "user.create",
        "user",
        "x",
        "cli",
        {},
        audit.GENESIS,
        "f" * 64,
    )
    verdict = await get_verdict(admin_client, as_admin)
    assert {b["seq"] for b in verdict["breaks"]} == {head + 1}
    assert len(verdict["breaks"]) == 2  # neither linked nor matching its own hash
    status, output = await cli.verify()
    assert status == 1
    assert f"BROKEN at seq {head + 1}:" in output

    # The next genuine change still appends (after the forgery) and the break stays visible.
    await add_key(admin_client, as_admin)
    verdict = await get_verdict(admin_client, as_admin)
    assert verdict["head_seq"] == head + 2
    assert {b["seq"] for b in verdict["breaks"]} == {head + 1}
