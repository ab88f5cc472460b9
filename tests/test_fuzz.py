"""Schemathesis against the admin app's own OpenAPI document: no input yields a 5xx.

The admin app runs in this test's event loop on a real loopback port (aiohttp's test
server), an ADMIN session is opened, and schemathesis runs as a subprocess of the same loop,
twice. The first run covers every operation except the two that can demote or delete the
session's own user (after which every ADMIN-only operation would only answer 403); the second
run fuzzes those two:

    st run http://127.0.0.1:PORT/openapi.json --checks not_a_server_error \\
        -H 'Authorization: Bearer <admin JWT>' --max-examples 15 --seed 20261125 \\
        --workers 1 --generation-database none --request-timeout 10 \\
        --phases examples,coverage,fuzzing --no-color \\
        --exclude-name 'PUT /users/{id}' --exclude-name 'DELETE /users/{id}'

    st run ... (the same options) --include-name 'PUT /users/{id}' \\
        --include-name 'DELETE /users/{id}'

By hand against `wallet run`: use the admin port (6790 by default) and the `token` from
`POST /auth/login`.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from admin.app import create_app as create_admin_app
from gateway.settings import Settings
from tests.conftest import World, login

ST = Path(sys.executable).parent / "st"
MAX_EXAMPLES = 15
SEED = 20261125
RUN_TIMEOUT_S = 90
SELF_CHANGING = ("PUT /users/{id}", "DELETE /users/{id}")
REQUESTS = re.compile(r"^wallet_http_requests_total\{([^}]*)\} (\S+)$", re.MULTILINE)
CASES = re.compile(r"(\d+) generated, (\d+) passed")
SELECTED = re.compile(r"Operations:\s+(\d+) selected / (\d+) total")


def st_command(port: int, token: str, *selection: str) -> list[str]:
    return [
        str(ST),
        "run",
        f"http://127.0.0.1:{port}/openapi.json",
        "--checks",
        "not_a_server_error",
        "-H",
        f"Authorization: Bearer {token}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        # Stateful testing needs links the document does not declare; it would only add time.
        "--phases",
        "examples,coverage,fuzzing",
        "--no-color",
        *selection,
    ]


async def run_st(command: list[str], cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,  # no stray schemathesis.toml is picked up; reports stay in the temp folder
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            raw, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, raw.decode(errors="replace")


def served(metrics_text: str) -> dict[str, float]:
    """Requests served by status class, from the app's own Prometheus counter."""
    totals: dict[str, float] = {}
    for labels, value in REQUESTS.findall(metrics_text):
        status = dict(re.findall(r'(\w+)="([^"]*)"', labels))["status"]
        totals[status] = totals.get(status, 0.0) + float(value)
    return totals


def passed_cases(output: str) -> int:
    match = CASES.search(output)
    assert match, output
    generated, passed = int(match[1]), int(match[2])
    assert generated == passed, output
    return passed


async def test_schemathesis_finds_no_server_error(
    aiohttp_client: Any, settings: Settings, world: World, tmp_path: Path
) -> None:
    client: TestClient[Any, Any] = await aiohttp_client(create_admin_app(settings))
    port = client.server.port
    assert port is not None
    token = (await login(client))["Authorization"].removeprefix("Bearer ")

    excluded = [arg for name in SELF_CHANGING for arg in ("--exclude-name", name)]
    status, output = await run_st(st_command(port, token, *excluded), tmp_path)
    assert status == 0, output
    selected = SELECTED.search(output)
    assert selected, output
    assert int(selected[1]) == int(selected[2]) - len(SELF_CHANGING) > 20, output
    # The session stayed ADMIN throughout, so ADMIN-only operations were really exercised.
    assert "Authentication failed" not in output, output
    first = passed_cases(output)

    included = [arg for name in SELF_CHANGING for arg in ("--include-name", name)]
    status, output = await run_st(st_command(port, token, *included), tmp_path)
    assert status == 0, output
    selected = SELECTED.search(output)
    assert selected, output
    assert int(selected[1]) == len(SELF_CHANGING), output
    second = passed_cases(output)
    assert first + second >= 500

    # The server's own count agrees: hundreds of requests through the app, none a 5xx (some
    # cases never reach it: aiohttp's parser refuses them with a 400 first).
    resp = await client.get("/monitoring/metrics")
    totals = served(await resp.text())
    assert totals.get("5xx", 0) == 0, totals
    assert totals.get("2xx", 0) >= 50, totals
    assert totals.get("2xx", 0) + totals.get("4xx", 0) >= 300, totals
    assert (await client.get("/monitoring/health")).status == 200
