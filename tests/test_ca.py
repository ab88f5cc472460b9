"""The forward proxy's certificate authority: one per installation, created once even by
racing processes, its key sealed by the vault (and re-sealed by a master-key rotation),
rotated with an audit record, exported for clients by the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway import audit, ca
from gateway.db import Pool
from gateway.rotation import reseal_all
from gateway.secret import Secret
from gateway.vault import Vault
from tests.conftest import random_master_key_b64, wallet_bin
from tests.test_cli import fresh_database, wallet_env  # noqa: F401 (fixture)
from tests.test_rotation import pool, unsealed_vault  # noqa: F401 (fixture)

ACTOR = audit.Actor.system("tests")


async def test_racing_processes_create_one_ca(
    pool: Pool,  # noqa: F811
    master_key: bytes,
) -> None:
    vault = await unsealed_vault(pool, master_key)
    authorities = await asyncio.gather(*(ca.load(pool, vault, ACTOR) for _ in range(6)))
    assert len({a.id for a in authorities}) == 1
    assert await pool.fetchval("SELECT count(*) FROM certificate_authorities") == 1
    actions = [r["action"] for r in await pool.fetch("SELECT action FROM audit_log")]
    assert actions.count("ca.create") == 1
    cert = authorities[0].cert
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca
    assert constraints.path_length == 0


async def test_rotation_replaces_the_ca_and_is_audited(
    pool: Pool,  # noqa: F811
    master_key: bytes,
) -> None:
    vault = await unsealed_vault(pool, master_key)
    first = await ca.load(pool, vault, ACTOR)
    async with pool.acquire() as conn:
        second = await ca.rotate(conn, vault, ACTOR)
        assert (await ca.export_pem(conn)) == second.cert_pem
    assert second.id != first.id
    loaded = await ca.load(pool, vault, ACTOR)
    assert loaded.id == second.id
    retired = await pool.fetchval(
        "SELECT count(*) FROM certificate_authorities WHERE retired_at IS NOT NULL"
    )
    assert retired == 1
    details = await pool.fetchval(
        "SELECT details FROM audit_log WHERE action = 'ca.rotate' AND target_id = $1", second.id
    )
    assert "sha256" in str(details)


async def test_a_master_key_rotation_reseals_the_ca(
    pool: Pool,  # noqa: F811
    master_key: bytes,
) -> None:
    old = await unsealed_vault(pool, master_key)
    created = await ca.load(pool, old, ACTOR)
    new_key = os.urandom(32)
    both = await unsealed_vault(pool, new_key, master_key)
    result = await reseal_all(pool, both, ACTOR)
    assert result.failed == ()
    assert Vault(Secret(master_key)).current_kid in result.retired_kids
    only_new = await unsealed_vault(pool, new_key)
    reopened = await ca.load(pool, only_new, ACTOR)
    assert reopened.id == created.id
    assert reopened.cert_pem == created.cert_pem


async def test_a_leaf_names_exactly_its_host(
    pool: Pool,  # noqa: F811
    master_key: bytes,
) -> None:
    vault = await unsealed_vault(pool, master_key)
    authority = await ca.load(pool, vault, ACTOR)
    context = authority.context_for("api.openai.com")
    assert authority.context_for("api.openai.com") is context  # cached
    assert authority.context_for("api.stripe.com") is not context


def test_cli_exports_and_rotates_the_ca(
    tmp_path: Path,
    fresh_database: Secret[str],  # noqa: F811
    servers: Any,
) -> None:
    env = wallet_env(
        DATABASE_URL=fresh_database.reveal(),
        REDIS_URL=servers.redis_url.reveal(),
        JWT_SECRET="j" * 40,
        ENCRYPTION_KEY=random_master_key_b64(),
    )
    path = tmp_path / "ca.pem"

    def wallet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(wallet_bin()), *args], env=env, cwd=tmp_path, capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip

    exported = wallet("ca", "export", str(path))
    assert exported.returncode == 0, exported.stderr
    first = x509.load_pem_x509_certificate(path.read_bytes())
    again = wallet("ca", "export")
    assert again.returncode == 0, again.stderr
    assert x509.load_pem_x509_certificate(again.stdout.encode()) == first  # one CA
    rotated = wallet("ca", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    second = x509.load_pem_x509_certificate(rotated.stdout.encode())
    assert second != first
    assert "PRIVATE KEY" not in exported.stdout + exported.stderr + rotated.stdout + rotated.stderr
    unwritable = wallet("ca", "export", str(tmp_path / "missing" / "ca.pem"))
    assert unwritable.returncode != 0
    assert "Traceback" not in unwritable.stderr
