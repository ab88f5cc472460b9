"""The master key: a wrong or missing one seals the apps (never logged); rotation re-seals
every stored key online while requests are served; the CLI does the same from a shell."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from admin.app import create_app as create_admin_app
from gateway import audit, canary, db, keys
from gateway.app import create_app as create_gateway_app
from gateway.db import Pool
from gateway.rotation import reseal_all
from gateway.secret import Secret
from gateway.settings import Settings
from gateway.vault import Vault
from tests.conftest import World, login, wallet_bin


def stripe_key() -> str:
    return "sk_test_" + secrets.token_hex(16)


async def add_key(
    client: TestClient[Any, Any], headers: dict[str, str], secret: str
) -> dict[str, Any]:
    resp = await client.post("/keys", headers=headers, json={"key": secret, "service": "stripe"})
    assert resp.status == 201, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


def representations(key: bytes) -> list[str]:
    """Every spelling of a master key that could end up in a log line."""
    return [
        key.hex(),
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode(),
        base64.b64encode(key).decode().rstrip("="),
        repr(key)[2:-1],
    ]


@pytest.fixture
async def pool(settings: Settings, world: World) -> AsyncIterator[Pool]:
    assert settings.database_url is not None
    created = await db.create_pool(settings.database_url, max_size=4)
    try:
        yield created
    finally:
        await created.close()


async def unsealed_vault(pool: Pool, current: bytes, *previous: bytes) -> Vault:
    vault = Vault(Secret(current), tuple(Secret(p) for p in previous))
    async with pool.acquire() as conn:
        assert await canary.unseal(conn, vault)
    return vault


async def test_wrong_master_key_seals_the_apps(
    aiohttp_client: Any,
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    settings: Settings,
    captured_logs: io.StringIO,
) -> None:
    # The right key sealed something (and left its canary).
    await add_key(admin_client, as_admin, stripe_key())
    resp = await admin_client.get("/monitoring/health")
    assert resp.status == 200
    assert (await resp.json())["checks"]["vault"] == "ok"

    wrong = os.urandom(32)
    wrong_settings = replace(settings, encryption_key=Secret(wrong))
    sealed: TestClient[Any, Any] = await aiohttp_client(create_admin_app(wrong_settings))
    resp = await sealed.get("/monitoring/health")
    assert resp.status == 503
    health = await resp.json()
    assert health["status"] == "degraded"
    assert health["checks"] == {"postgres": "ok", "redis": "ok", "vault": "sealed"}

    # Logging in needs no vault; anything that seals a key answers 503 vault_sealed.
    headers = await login(sealed)
    secret = stripe_key()
    resp = await sealed.post("/keys", headers=headers, json={"key": secret, "service": "stripe"})
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["code"] == "vault_sealed"
    assert error["request_id"]
    assert secret not in await resp.text()
    # Reads of masked data still work; nothing was stored by the refused call.
    resp = await sealed.get("/keys", headers=headers)
    assert resp.status == 200
    assert (await resp.json())["total"] == 1

    gateway: TestClient[Any, Any] = await aiohttp_client(create_gateway_app(wrong_settings))
    resp = await gateway.get("/monitoring/health")
    assert resp.status == 503
    assert (await resp.json())["checks"]["vault"] == "sealed"
    resp = await sealed.get("/monitoring/metrics")
    gauge = [
        line for line in (await resp.text()).splitlines() if line.startswith("wallet_vault_sealed")
    ]
    assert gauge
    assert float(gauge[-1].split()[-1]) == 1

    logged = captured_logs.getvalue()
    assert "vault_sealed" in logged  # the sealed state is logged, by key id only
    assert Vault(Secret(wrong)).current_kid in logged
    assert settings.encryption_key is not None
    for spelling in representations(wrong) + representations(settings.encryption_key.reveal()):
        assert spelling not in logged
    # The right key still unseals: a wrong key changed nothing stored.
    resp = await admin_client.get("/monitoring/health")
    assert resp.status == 200


async def test_missing_master_key_seals_the_apps(
    aiohttp_client: Any, settings: Settings, world: World, captured_logs: io.StringIO
) -> None:
    no_key = replace(settings, encryption_key=None)
    client: TestClient[Any, Any] = await aiohttp_client(create_admin_app(no_key))
    resp = await client.get("/monitoring/health")
    assert resp.status == 503
    assert (await resp.json())["checks"]["vault"] == "sealed"
    headers = await login(client)
    resp = await client.post(
        "/keys", headers=headers, json={"key": stripe_key(), "service": "stripe"}
    )
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "vault_sealed"
    assert "ENCRYPTION_KEY is not set" in captured_logs.getvalue()

    # A missing key on a fresh database leaves no canary that would lock the right key out.
    gateway: TestClient[Any, Any] = await aiohttp_client(create_gateway_app(no_key))
    assert (await gateway.get("/monitoring/health")).status == 503
    right: TestClient[Any, Any] = await aiohttp_client(create_admin_app(settings))
    assert (await right.get("/monitoring/health")).status == 200


async def test_first_key_on_a_fresh_database_unseals_and_leaves_a_canary(
    pool: Pool, master_key: bytes
) -> None:
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM vault_canaries") == 0
        vault = Vault(Secret(master_key))
        assert await canary.unseal(conn, vault)
        assert vault.unsealed
        kids = [r["kid"] for r in await conn.fetch("SELECT kid FROM vault_canaries")]
        assert kids == [vault.current_kid]
        stranger = Vault(Secret(os.urandom(32)))
        assert not await canary.unseal(conn, stranger)
        assert not stranger.unsealed
        # The stranger left no canary of its own.
        assert await conn.fetchval("SELECT count(*) FROM vault_canaries") == 1


async def test_rotation_while_requests_are_served(
    aiohttp_client: Any,
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    settings: Settings,
    master_key: bytes,
    pool: Pool,
) -> None:
    old, new = master_key, os.urandom(32)
    expected: dict[str, str] = {}
    for _ in range(30):
        secret = stripe_key()
        expected[(await add_key(admin_client, as_admin, secret))["id"]] = secret
    old_kid = Vault(Secret(old)).current_kid
    assert await pool.fetchval("SELECT count(*) FROM api_keys WHERE kid = $1", old_kid) == 30

    rotated_settings = replace(
        settings, encryption_key=Secret(new), encryption_keys_previous=(Secret(old),)
    )
    client: TestClient[Any, Any] = await aiohttp_client(create_admin_app(rotated_settings))
    assert (await client.get("/monitoring/health")).status == 200
    headers = await login(client)
    vault = await unsealed_vault(pool, new, old)
    new_kid = vault.current_kid
    assert new_kid is not None
    assert new_kid != old_kid

    ids = list(expected)
    mutable, readonly = ids[:10], ids[10:]
    failures: list[str] = []
    progress: list[tuple[int, int]] = []
    finished = asyncio.Event()
    overlapped: list[str] = []  # work completed while the rotation was still running

    async def rotate() -> Any:
        try:
            return await reseal_all(
                pool,
                vault,
                audit.Actor.system("tests"),
                batch=4,
                progress=lambda done, total: progress.append((done, total)),
            )
        finally:
            finished.set()

    async def writer() -> int:
        rounds = 0
        while not finished.is_set() or rounds < 5:
            key_id = mutable[rounds % len(mutable)]
            secret = stripe_key()
            resp = await client.put(f"/keys/{key_id}", headers=headers, json={"key": secret})
            if resp.status != 200:
                failures.append(f"PUT {resp.status} {await resp.text()}")
            else:
                expected[key_id] = secret
            secret = stripe_key()
            resp = await client.post(
                "/keys", headers=headers, json={"key": secret, "service": "stripe"}
            )
            if resp.status != 201:
                failures.append(f"POST {resp.status} {await resp.text()}")
            else:
                expected[(await resp.json())["id"]] = secret
            rounds += 1
            if not finished.is_set():
                overlapped.append("round")
            await asyncio.sleep(0)
        return rounds

    async def reader() -> int:
        rounds = 0
        while not finished.is_set() or rounds < 5:
            resp = await client.get("/keys", headers=headers, params={"limit": "500"})
            if resp.status != 200:
                failures.append(f"GET {resp.status} {await resp.text()}")
            for key_id in readonly[rounds % 4 :: 4]:
                async with pool.acquire() as conn:
                    try:
                        opened = await keys.open_secret(conn, vault, key_id)
                    except Exception as exc:
                        failures.append(f"open {key_id}: {type(exc).__name__}")
                        continue
                if opened.reveal() != expected[key_id]:
                    failures.append(f"open {key_id}: wrong plaintext")
            rounds += 1
            if not finished.is_set():
                overlapped.append("round")
            await asyncio.sleep(0)
        return rounds

    result, writes, reads = await asyncio.gather(rotate(), writer(), reader())
    assert failures == []
    assert overlapped, "the requests did not overlap the rotation"
    assert writes >= 5
    assert reads >= 5
    assert result.failed == ()
    assert 0 < result.resealed <= 30
    assert progress
    assert progress[-1][0] == progress[-1][1] == 30
    assert all(done <= total for done, total in progress)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)

    # Every row is under the new key and opens to its plaintext, with the new key alone.
    kids = {r["kid"] for r in await pool.fetch("SELECT kid FROM api_keys")}
    assert kids == {new_kid}
    assert await pool.fetchval("SELECT count(*) FROM api_keys") == len(expected)
    only_new = await unsealed_vault(pool, new)
    async with pool.acquire() as conn:
        for key_id, secret in expected.items():
            assert (await keys.open_secret(conn, only_new, key_id)).reveal() == secret

    # Duplicate detection works on re-sealed rows (fingerprints were recomputed).
    resp = await client.post(
        "/keys", headers=headers, json={"key": expected[readonly[0]], "service": "stripe"}
    )
    assert resp.status == 409

    resp = await client.get("/audit", headers=headers, params={"action": "vault.rotate"})
    records = (await resp.json())["items"]
    assert len(records) == 1
    assert records[0]["target_id"] == new_kid
    assert records[0]["actor"] == "system"
    assert records[0]["details"]["failed"] == 0
    assert records[0]["details"]["retired"] == [old_kid]
    assert result.retired_kids == (old_kid,)
    verdict = await (await client.get("/audit/verify", headers=headers)).json()
    assert verdict["ok"] is True

    # The old key's canary is retired: the old key alone is now a wrong key.
    async with pool.acquire() as conn:
        stale = Vault(Secret(old))
        assert await canary.unseal(conn, stale) is False
        assert not stale.unsealed
        fresh = Vault(Secret(new))
        assert await canary.unseal(conn, fresh) is True
        canaries = {r["kid"] for r in await conn.fetch("SELECT kid FROM vault_canaries")}
    assert canaries == {new_kid}


async def test_rotation_keeps_old_canary_while_old_rows_remain(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    master_key: bytes,
    pool: Pool,
) -> None:
    """A row that can't be opened is reported, not lost; its key's canary is not retired."""
    await add_key(admin_client, as_admin, stripe_key())
    broken = await add_key(admin_client, as_admin, stripe_key())
    # Corrupt one row's ciphertext (as a bad backup restore might).
    await pool.execute(
        "UPDATE api_keys SET sealed = sealed || '\\x00'::bytea WHERE id = $1::uuid", broken["id"]
    )
    vault = await unsealed_vault(pool, os.urandom(32), master_key)
    seen: list[tuple[int, int]] = []
    result = await reseal_all(
        pool, vault, audit.Actor.system("tests"), progress=lambda d, t: seen.append((d, t))
    )
    assert result.resealed == 1
    assert result.failed == (broken["id"],)
    assert result.retired_kids == ()
    assert seen[-1] == (2, 2)
    old_kid = Vault(Secret(master_key)).current_kid
    kids = {r["kid"] for r in await pool.fetch("SELECT kid FROM vault_canaries")}
    assert old_kid in kids


async def test_rotation_refuses_a_sealed_vault(pool: Pool, master_key: bytes) -> None:
    from gateway.errors import VaultSealed

    with pytest.raises(VaultSealed):
        await reseal_all(pool, Vault(Secret(master_key)), audit.Actor.system("tests"))


async def test_cli_rotate_encryption_key(
    admin_client: TestClient[Any, Any],
    as_admin: dict[str, str],
    settings: Settings,
    master_key: bytes,
    pool: Pool,
    tmp_path: Path,
) -> None:
    expected = {}
    for _ in range(3):
        secret = stripe_key()
        expected[(await add_key(admin_client, as_admin, secret))["id"]] = secret
    new = os.urandom(32)
    assert settings.database_url is not None
    assert settings.redis_url is not None
    env = {
        "DATABASE_URL": settings.database_url.reveal(),
        "REDIS_URL": settings.redis_url.reveal(),
        "JWT_SECRET": secrets.token_urlsafe(40),
        "ENCRYPTION_KEY": base64.b64encode(new).decode(),
        "ENCRYPTION_KEY_PREVIOUS": base64.urlsafe_b64encode(master_key).decode(),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    proc = await asyncio.create_subprocess_exec(
        str(wallet_bin()),
        "rotate-encryption-key",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out_bytes, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
    out, err = out_bytes.decode(), err_bytes.decode()
    assert proc.returncode == 0, err
    new_kid = Vault(Secret(new)).current_kid
    old_kid = Vault(Secret(master_key)).current_kid
    assert "re-sealing keys: 3/3\n" in err
    assert f"re-sealed 3 key(s) under master key {new_kid}" in err
    assert f"retired master key(s) {old_kid}" in err
    assert "Traceback" not in err + out
    for secret in [
        *expected.values(),
        env["ENCRYPTION_KEY"],
        env["ENCRYPTION_KEY_PREVIOUS"],
        env["JWT_SECRET"],
    ]:
        assert secret not in out + err

    assert {r["kid"] for r in await pool.fetch("SELECT kid FROM api_keys")} == {new_kid}
    vault = await unsealed_vault(pool, new)
    async with pool.acquire() as conn:
        for key_id, secret in expected.items():
            assert (await keys.open_secret(conn, vault, key_id)).reveal() == secret
        assert (
            await conn.fetchval("SELECT count(*) FROM audit_log WHERE action = 'vault.rotate'") == 1
        )

    # Run again with only the old key: the CLI refuses, sealed, in one line.
    env["ENCRYPTION_KEY"], env["ENCRYPTION_KEY_PREVIOUS"] = env["ENCRYPTION_KEY_PREVIOUS"], ""
    proc = await asyncio.create_subprocess_exec(
        str(wallet_bin()),
        "rotate-encryption-key",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err_bytes = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    lines = err_bytes.decode().strip().splitlines()
    assert lines[-1].startswith("error: the vault is sealed")
    assert "Traceback" not in err_bytes.decode()
