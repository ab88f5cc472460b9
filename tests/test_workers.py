"""`wallet gateway --workers N`: N processes on one port, metrics merged across them, a dead
worker replaced, and a clean drain of the whole group."""

from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from admin.embedded import free_port
from gateway.secret import Secret
from tests.conftest import Servers, random_master_key_b64, wallet_bin
from tests.test_cli import fresh_database, wallet_env  # noqa: F401 (fixture)

WORKERS = 2
REQUESTS = 40
START_TIMEOUT_S = 60.0
SERIES = 'wallet_http_requests_total{app="gateway",route="/monitoring/health",status="2xx"}'
LISTENING = re.compile(r"wallet: gateway worker (\d+)/(\d+) listening on")


def get(port: int, path: str) -> tuple[int, dict[str, str], str]:
    """One request on a new connection, so the kernel picks a worker each time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def value(exposition: str, series: str) -> float | None:
    for line in exposition.splitlines():
        name, _, number = line.rpartition(" ")
        if name == series:
            return float(number)
    return None


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def is_worker(pid: int) -> bool:
    try:
        return "wallet" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def wait_for(
    predicate: Callable[[], bool], what: str, output: Path, timeout: float = START_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}:\n{output.read_text(errors='replace')}")


@pytest.fixture
def group(
    fresh_database: Secret[str],  # noqa: F811
    servers: Servers,
    tmp_path: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    port = free_port()
    output = tmp_path / "wallet.log"
    env = wallet_env(
        DATABASE_URL=fresh_database.reveal(),
        REDIS_URL=servers.redis_url.reveal(),
        JWT_SECRET="j" * 40,
        ENCRYPTION_KEY=random_master_key_b64(),
        WALLET_ADMIN_PASSWORD="workers-test-password",
        GATEWAY_PORT=str(port),
        FORWARD_PROXY_PORT=str(free_port()),
        LOG_LEVEL="warning",
    )
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [str(wallet_bin()), "gateway", "--workers", str(WORKERS)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: (
                len(set(LISTENING.findall(output.read_text()))) == WORKERS
                or proc.poll() is not None
            ),
            "both workers to listen",
            output,
        )
        assert proc.poll() is None, output.read_text()
        yield proc, port, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_workers_share_a_port_and_report_merged_metrics(
    group: tuple[subprocess.Popen[bytes], int, Path],
) -> None:
    proc, port, output = group
    for _ in range(REQUESTS):
        status, _headers, _body = get(port, "/monitoring/health")
        assert status == 200

    # Whichever worker answers a scrape, it reports every worker's requests.
    per_worker: list[float] = []
    for _ in range(6):
        status, headers, text = get(port, "/monitoring/metrics")
        assert status == 200
        assert headers["X-Wallet-Workers"] == f"{WORKERS}/{WORKERS}"
        assert value(text, SERIES) == REQUESTS, text
        assert value(text, 'wallet_gateway_workers{app="gateway",state="reporting"}') == WORKERS
        assert text.count("# TYPE wallet_http_requests_total ") == 1
        _, _, own = get(port, "/monitoring/metrics?scope=worker")
        per_worker.append(value(own, SERIES) or 0.0)
    # The kernel spread the connections: no single worker served them all.
    assert min(per_worker) < REQUESTS, per_worker

    # A worker that dies is replaced, and the group reports complete again.
    workers = [pid for pid in children(proc.pid) if is_worker(pid)]
    assert len(workers) == WORKERS, workers
    os.kill(workers[0], signal.SIGKILL)
    wait_for(
        lambda: (
            "exited (killed by SIGKILL); restarting it" in output.read_text()
            and len([p for p in children(proc.pid) if is_worker(p)]) == WORKERS
        ),
        "the worker's replacement",
        output,
    )

    def complete() -> bool:
        try:
            status, headers, _ = get(port, "/monitoring/metrics")
        except OSError:
            return False
        return status == 200 and headers.get("X-Wallet-Workers") == f"{WORKERS}/{WORKERS}"

    wait_for(complete, "the replacement to report", output, timeout=20)

    # SIGTERM drains the whole group.
    survivors = [pid for pid in children(proc.pid) if is_worker(pid)]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, output.read_text()
    assert "draining the workers" in output.read_text()
    assert not [pid for pid in survivors if Path(f"/proc/{pid}").exists()]


def test_workers_flag_is_validated(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(wallet_bin()), "gateway", "--workers", "0"],
        cwd=tmp_path,
        env=wallet_env(WALLET_DATA_DIR=str(tmp_path / "data")),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"must be between 1 and" in result.stderr
