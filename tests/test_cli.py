"""The `wallet` CLI as a user runs it: zero-config `wallet run` (embedded servers started,
stopped and recovered), concurrent migrations, and idempotent `migrate`/`seed`."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from gateway import db
from gateway.secret import Secret
from gateway.settings import SETTINGS
from tests.conftest import Servers, _test_database_url, wallet_bin

PASSWORD = "cli-admin-password-0451"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
ORPHAN_TIMEOUT_S = 10.0
LISTENING = re.compile(r"wallet: (gateway|admin) listening on http://127\.0\.0\.1:(\d+)")


def wallet_env(**extra: str) -> dict[str, str]:
    """The test runner's environment without any wallet setting (PATH, HOME kept)."""
    names = {s.name for s in SETTINGS}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(extra)
    return env


@dataclass
class Wallet:
    proc: subprocess.Popen[bytes]
    output: Path
    ports: dict[str, int]

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"wallet did not exit within {timeout:.0f}s:\n{self.text()}")


def start_wallet(
    workdir: Path, data_dir: Path, name: str, password: str, started: list[Wallet]
) -> Wallet:
    """`wallet run` in `workdir`; returns once both apps print where they listen."""
    output = workdir / f"{name}.log"
    env = wallet_env(
        WALLET_DATA_DIR=str(data_dir),
        GATEWAY_PORT="0",
        ADMIN_PORT="0",
        FORWARD_PROXY_PORT="0",
        WALLET_ADMIN_PASSWORD=password,
        LOG_LEVEL="info",
    )
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [str(wallet_bin()), "run"],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wallet = Wallet(proc, output, {})
    started.append(wallet)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        wallet.ports = {m[1]: int(m[2]) for m in LISTENING.finditer(wallet.text())}
        if len(wallet.ports) == 2:
            return wallet
        if proc.poll() is not None:
            pytest.fail(f"wallet exited with {proc.returncode} at startup:\n{wallet.text()}")
        time.sleep(0.1)
    pytest.fail(f"wallet did not listen within {START_TIMEOUT_S:.0f}s:\n{wallet.text()}")


def call(
    port: int, method: str, path: str, body: object | None = None
) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def assert_serving(wallet: Wallet, password: str = PASSWORD) -> None:
    for app in ("gateway", "admin"):
        status, body = call(wallet.ports[app], "GET", "/monitoring/health")
        assert status == 200, (app, body, wallet.text())
        assert body == {"status": "ok", "checks": {"postgres": "ok", "redis": "ok", "vault": "ok"}}
    status, body = call(
        wallet.ports["admin"], "POST", "/auth/login", {"username": "admin", "password": password}
    )
    assert status == 200, body
    user = body["user"]
    assert isinstance(user, dict)
    assert (user["username"], user["role"]) == ("admin", "ADMIN")
    assert str(body["token"]).count(".") == 2


def server_pids(data_dir: Path) -> list[int]:
    """Embedded postgres and redis-server processes of this data folder: their command line
    names it, or (redis-server retitles itself) their working directory is inside it."""
    root = str(data_dir.resolve())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"postgres" not in cmdline and b"redis-server" not in cmdline:
            continue
        if root.encode() in cmdline or cwd == root or cwd.startswith(root + "/"):
            pids.append(int(entry.name))
    return pids


def kinds(pids: list[int]) -> set[str]:
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            names.add("redis" if b"redis-server" in cmdline else "postgres")
    return names


def wait_no_servers(data_dir: Path, timeout: float = ORPHAN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while server_pids(data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = server_pids(data_dir)
    assert not left, f"embedded servers left running: {left}"


@dataclass
class Lab:
    """A folder for `wallet run` and the wallet processes started in it."""

    path: Path
    started: list[Wallet]

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    def start(self, name: str, password: str = PASSWORD) -> Wallet:
        wallet = start_wallet(self.path, self.data_dir, name, password, self.started)
        return wallet


@pytest.fixture
def lab() -> Iterator[Lab]:
    # Outside pytest's basetemp: concurrent pytest runs reset /tmp/pytest-of-<user> to 0700,
    # which the unprivileged PostgreSQL user could then no longer traverse.
    lab = Lab(Path(tempfile.mkdtemp(prefix="wallet-cli-")), [])
    try:
        yield lab
    finally:
        # Only when a test failed midway: stop what it started, by pid.
        for wallet in lab.started:
            if wallet.proc.poll() is None:
                wallet.proc.kill()
                wallet.proc.wait()
        deadline = time.monotonic() + ORPHAN_TIMEOUT_S
        while server_pids(lab.data_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in server_pids(lab.data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(lab.path, ignore_errors=True)


def test_run_stops_cleanly_and_restarts(lab: Lab) -> None:
    data_dir = lab.data_dir
    first = lab.start("first")
    assert_serving(first)
    out = first.text()
    assert "Generated" in out
    assert "created user `admin` with the password from WALLET_ADMIN_PASSWORD" in out
    assert PASSWORD not in out
    secrets_file = data_dir / "secrets.env"
    assert secrets_file.exists()
    assert secrets_file.stat().st_mode & 0o777 == 0o600
    assert {"JWT_SECRET", "ENCRYPTION_KEY"} <= {
        line.split("=", 1)[0] for line in secrets_file.read_text().splitlines() if "=" in line
    }
    assert kinds(server_pids(data_dir)) == {"postgres", "redis"}

    # Ctrl-C pressed twice: the second one must not abort the drain or the servers' stop.
    first.proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    first.proc.send_signal(signal.SIGINT)
    assert first.wait() == 0, first.text()
    out = first.text()
    assert "received SIGINT; shutting down" in out
    assert "stopped embedded PostgreSQL" in out
    assert "stopped embedded Redis" in out
    assert "Traceback" not in out
    wait_no_servers(data_dir, timeout=2.0)
    assert not (data_dir / "embedded.json").exists()
    generated = (data_dir / "secrets.env").read_text()

    # Again on the same data: nothing generated, no admin created; a different
    # WALLET_ADMIN_PASSWORD is ignored, since it is used only when `admin` is created.
    second = lab.start("second", password="another-password-0452")
    out = second.text()
    assert "Generated" not in out
    assert "created user" not in out
    assert "applied migration" not in out
    assert_serving(second, PASSWORD)
    status, _ = call(
        second.ports["admin"],
        "POST",
        "/auth/login",
        {"username": "admin", "password": "another-password-0452"},
    )
    assert status == 401
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 0, second.text()
    assert "received SIGTERM; shutting down" in second.text()
    assert (data_dir / "secrets.env").read_text() == generated
    wait_no_servers(data_dir, timeout=2.0)


def test_kill_9_leaves_no_orphans_and_next_start_recovers(lab: Lab) -> None:
    data_dir = lab.data_dir
    first = lab.start("killed")
    assert_serving(first)
    assert kinds(server_pids(data_dir)) == {"postgres", "redis"}
    first.proc.kill()
    first.proc.wait()
    # The parent-death signal stops PostgreSQL and Redis without the wallet's help.
    wait_no_servers(data_dir)

    second = lab.start("recovered")
    assert_serving(second)
    assert "Generated" not in second.text()
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait() == 0, second.text()
    wait_no_servers(data_dir, timeout=2.0)


@pytest.fixture
async def fresh_database(servers: Servers) -> AsyncIterator[Secret[str]]:
    """An empty database on the session's server, dropped afterwards."""
    name = f"wallet_cli_{uuid.uuid4().hex[:12]}"
    maintenance = await asyncpg.connect(servers.admin_url.reveal())
    try:
        await maintenance.execute(f'CREATE DATABASE "{name}"')
        yield Secret(_test_database_url(servers.database_url.reveal(), name))
    finally:
        await maintenance.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await maintenance.close()


async def test_concurrent_migrate_applies_each_migration_once(
    fresh_database: Secret[str],
) -> None:
    files = [p.name for p in db.migration_files()]
    assert files
    conns = [await db.connect(fresh_database) for _ in range(4)]
    try:
        results = await asyncio.gather(*(db.migrate(c) for c in conns))
        applied = [name for result in results for name in result]
        assert sorted(applied) == sorted(files), results
        assert sum(1 for r in results if r) == 1, results
        rows = await conns[0].fetch("SELECT version, checksum FROM schema_migrations")
        assert sorted(r["version"] for r in rows) == sorted(files)
        assert all(len(r["checksum"]) == 64 for r in rows)
        # Once more, concurrently: nothing to do, no error.
        again = await asyncio.gather(*(db.migrate(c) for c in conns))
        assert again == [[] for _ in conns]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(files)
        assert await conns[0].fetchval("SELECT to_regclass('public.api_keys')::text") == "api_keys"
    finally:
        for conn in conns:
            await conn.close()


async def run_cli(*args: str, database_url: Secret[str], servers: Servers) -> tuple[int, str]:
    env = wallet_env(
        DATABASE_URL=database_url.reveal(),
        REDIS_URL=servers.redis_url.reveal(),
        JWT_SECRET="j" * 40,
    )
    proc = await asyncio.create_subprocess_exec(
        str(wallet_bin()),
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_migrate_and_seed_are_idempotent(
    fresh_database: Secret[str], servers: Servers
) -> None:
    files = [p.name for p in db.migration_files()]
    status, out = await run_cli("migrate", database_url=fresh_database, servers=servers)
    assert status == 0, out
    assert f"applied {len(files)} migration(s)" in out
    status, out = await run_cli("migrate", database_url=fresh_database, servers=servers)
    assert status == 0, out
    assert "none pending" in out

    status, out = await run_cli("seed", database_url=fresh_database, servers=servers)
    assert status == 0, out
    assert "stripe" in out
    assert "openai" in out
    status, out = await run_cli("seed", database_url=fresh_database, servers=servers)
    assert status == 0, out
    assert "none (all present)" in out

    conn = await db.connect(fresh_database)
    try:
        slugs = {r["slug"] for r in await conn.fetch("SELECT slug FROM services WHERE builtin")}
        assert slugs == {"stripe", "openai", "openweather", "googlemaps"}
        seeds = await conn.fetchval("SELECT count(*) FROM audit_log WHERE action = 'service.seed'")
        assert seeds == 1
    finally:
        await conn.close()
    assert fresh_database.reveal() not in out

    # The session's own database (migrated when the session began) is left as it is.
    for command, expected in (("migrate", "none pending"), ("seed", "built-in services added")):
        status, out = await run_cli(command, database_url=servers.database_url, servers=servers)
        assert status == 0, out
        assert expected in out
