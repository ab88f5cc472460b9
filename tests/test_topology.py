"""The deployment's topology without Docker: three `wallet gateway` processes and one
`wallet admin` on one PostgreSQL and one Redis. A load spread across the gateways keeps a
quota exact, and a token revoked on the admin app stops working on every gateway within a
second."""

from __future__ import annotations

import asyncio
import http.client
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from admin.embedded import free_port
from gateway.secret import Secret
from tests.conftest import Servers, random_master_key_b64, wallet_bin
from tests.fakes import FakeUpstream
from tests.test_cli import fresh_database, wallet_env  # noqa: F401 (fixture)

GATEWAYS = 3
QUOTA = 100
REQUESTS = 300
PASSWORD = "topology-test-password"
START_TIMEOUT_S = 90.0
OPENAI_KEY = "sk-proj-" + "T" * 40


@pytest.fixture
def topology(
    fresh_database: Secret[str],  # noqa: F811
    servers: Servers,
    tmp_path: Path,
) -> Iterator[tuple[int, list[int]]]:
    """(admin port, gateway ports), every process started as an operator would."""
    common = wallet_env(
        DATABASE_URL=fresh_database.reveal(),
        REDIS_URL=servers.redis_url.reveal(),
        JWT_SECRET="t" * 40,
        ENCRYPTION_KEY=random_master_key_b64(),
        WALLET_ADMIN_PASSWORD=PASSWORD,
        LOG_LEVEL="warning",
    )
    procs: list[subprocess.Popen[bytes]] = []
    admin_port, gateway_ports = free_port(), [free_port() for _ in range(GATEWAYS)]
    try:
        for i, (command, port) in enumerate(
            [("admin", admin_port)] + [("gateway", p) for p in gateway_ports]
        ):
            env = {**common, "ADMIN_PORT": str(admin_port), "GATEWAY_PORT": str(port)}
            env["FORWARD_PROXY_PORT"] = str(free_port())
            with (tmp_path / f"{command}-{i}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [str(wallet_bin()), command],
                        cwd=tmp_path,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = [admin_port, *gateway_ports]
        while pending and time.monotonic() < deadline:
            for port in list(pending):
                if _healthy(port):
                    pending.remove(port)
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        logs = "\n".join(f.read_text(errors="replace") for f in tmp_path.glob("*.log"))
        assert not pending, f"not up: {pending}\n{logs}"
        yield admin_port, gateway_ports
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/monitoring/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


async def test_three_gateways_keep_a_quota_exact_and_drop_a_revoked_token_together(
    topology: tuple[int, list[int]], aiohttp_server: Any
) -> None:
    admin_port, gateway_ports = topology
    upstream = FakeUpstream(OPENAI_KEY)
    server = await aiohttp_server(upstream.app())
    admin = f"http://127.0.0.1:{admin_port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as http:
        resp = await http.post(
            f"{admin}/auth/login", json={"username": "admin", "password": PASSWORD}
        )
        assert resp.status == 200, await resp.text()
        jwt = {"Authorization": f"Bearer {(await resp.json())['token']}"}
        resp = await http.put(
            f"{admin}/services/openai",
            headers=jwt,
            json={"base_url": f"http://127.0.0.1:{server.port}"},
        )
        assert resp.status == 200, await resp.text()
        key = {"key": OPENAI_KEY, "service": "openai", "metadata": {"quota": QUOTA}}
        resp = await http.post(f"{admin}/keys", headers=jwt, json=key)
        assert resp.status == 201, await resp.text()
        resp = await http.post(
            f"{admin}/tokens", headers=jwt, json={"name": "topology", "services": ["openai"]}
        )
        created = await resp.json()
        auth = {"X-Wallet-Token": created["token"]}

        async def call(port: int) -> int:
            async with http.get(
                f"http://127.0.0.1:{port}/openai/v1/models", headers=auth
            ) as answer:
                await answer.read()
                return answer.status

        statuses = await asyncio.gather(
            *(call(gateway_ports[i % GATEWAYS]) for i in range(REQUESTS))
        )
        assert statuses.count(200) == QUOTA == len(upstream.seen)
        assert statuses.count(429) == REQUESTS - QUOTA  # a third of them on each gateway

        resp = await http.delete(f"{admin}/tokens/{created['id']}", headers=jwt)
        assert resp.status == 204
        revoked_at = time.monotonic()
        refused: set[int] = set()
        while len(refused) < GATEWAYS and time.monotonic() - revoked_at < 5.0:
            for port in gateway_ports:
                if port not in refused and await call(port) == 401:
                    refused.add(port)
            await asyncio.sleep(0.01)
        took = time.monotonic() - revoked_at
        assert refused == set(gateway_ports)
        assert took < 1.0, f"a revoked token kept working for {took:.2f} s"
