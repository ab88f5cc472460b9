"""The wallet under test, set up as a user would: `wallet` processes and the admin API.

`wallet admin` starts first, on its own temporary `WALLET_DATA_DIR` (embedded PostgreSQL and
Redis) unless `DATABASE_URL`/`REDIS_URL` are set; the gateways (`wallet gateway`, and
`wallet gateway --workers N` when the command accepts it) attach to its databases. Custom
services point at the fake upstream (plain, and over TLS with hosts of their own for the
forward-proxy rows), each with a stored key, and one wallet token may use them all: all of it
through HTTP calls on the admin API.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.procs import BenchError, Processes, free_port, http, wait_ready
from gateway.settings import read_environment

READY_TIMEOUT_S: Final = 120.0  # the first run initialises a PostgreSQL cluster
HEALTH: Final = "/monitoring/health"


@dataclass(frozen=True)
class UpstreamPlan:
    """Where the bench services point, and the real keys the upstream expects."""

    json_base: str
    sse_base: str
    json_key: str
    sse_key: str
    # The same over TLS, for the forward-proxy rows (other keys: a key is stored once).
    tls_json_base: str
    tls_sse_base: str
    tls_json_key: str
    tls_sse_key: str
    ca_file: Path  # the CA of the upstream's TLS certificate


@dataclass
class Configured:
    json_slug: str
    sse_slug: str
    token: str
    token_id: str
    key_ids: list[str] = field(default_factory=list)
    tls_json_host: str = ""  # the hosts the forward-proxy services claim
    tls_sse_host: str = ""
    slugs: list[str] = field(default_factory=list)


def wallet_command() -> str:
    beside = Path(sys.executable).parent / "wallet"
    found = str(beside) if beside.exists() else shutil.which("wallet")
    if found is None:
        raise BenchError("the `wallet` command is not installed; run `make install`")
    return found


def gateway_accepts_workers(wallet: str) -> bool:
    """Whether `wallet gateway --workers N` exists yet (it is read from its --help)."""
    out = subprocess.run(  # noqa: S603 - fixed argv, no shell
        [wallet, "gateway", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    return "--workers" in out.stdout


def _error_text(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return str(body)[:200]


class Wallet:
    def __init__(self, procs: Processes, scratch: Path, repo: Path, say: Callable[[str], None]):
        self._procs = procs
        self._scratch = scratch
        self._say = say
        self.command = wallet_command()
        env = read_environment(repo / ".env")
        self.reuses_databases = bool(env.get("DATABASE_URL") or env.get("REDIS_URL"))
        self._password = env.get("WALLET_ADMIN_PASSWORD") or secrets.token_urlsafe(18)
        if env.get("DATABASE_URL"):
            # Reusing a database: the deployment's own secrets, or throwaway ones that work
            # on a database this wallet has never sealed a key in.
            env.setdefault("JWT_SECRET", secrets.token_urlsafe(48))
            env.setdefault("ENCRYPTION_KEY", base64.b64encode(os.urandom(32)).decode())
        self._env = {
            **env,
            "WALLET_DATA_DIR": str(scratch / "wallet"),
            "WALLET_ADMIN_PASSWORD": self._password,
            "HOST": "127.0.0.1",
        }
        self.admin_url = ""
        self._jwt = ""
        self.configured: Configured | None = None

    @property
    def log_level(self) -> str:
        return self._env.get("LOG_LEVEL") or "info"

    def trust_upstream_ca(self, ca_file: Path) -> None:
        """Gateways started from now on verify the upstream's TLS against `ca_file`."""
        self._env["UPSTREAM_CA_BUNDLE"] = str(ca_file)

    def export_ca(self, path: Path) -> None:
        """`wallet ca export PATH`: the CA the forward proxy's certificates chain to."""
        out = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [self.command, "ca", "export", str(path)],
            cwd=self._scratch,
            env=self._env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if out.returncode != 0:
            raise BenchError(f"wallet ca export failed: {out.stderr.strip()[-300:]}")

    def _start(self, name: str, args: list[str], port_env: str) -> tuple[str, int, int]:
        port = free_port()
        forward_port = free_port()
        env = {**self._env, port_env: str(port)}
        if port_env == "GATEWAY_PORT":
            env["ADMIN_PORT"] = str(free_port())
            env["FORWARD_PROXY_PORT"] = str(forward_port)
        proc = self._procs.start(
            name,
            [self.command, *args],
            cwd=self._scratch,  # no stray .env: the settings are all in env
            env=env,
            log=self._scratch / f"{name.replace(' ', '-')}.log",
            stop_signal=signal.SIGINT,  # as Ctrl-C: drain, then stop the databases
        )
        url = f"http://127.0.0.1:{port}"
        wait_ready(url + HEALTH, self._procs.child(proc), READY_TIMEOUT_S)
        return url, proc.pid, forward_port

    def start_admin(self) -> None:
        self.admin_url, _, _ = self._start("wallet admin", ["admin"], "ADMIN_PORT")

    def start_gateway(self, workers: int | None) -> tuple[str, int, int]:
        """(base URL, pid, forward-proxy port) of a new gateway; its workers, if any, are
        its children."""
        args = ["gateway"] if workers is None else ["gateway", "--workers", str(workers)]
        name = "wallet gateway" if workers is None else f"wallet gateway --workers {workers}"
        return self._start(name, args, "GATEWAY_PORT")

    def _call(self, method: str, path: str, body: object | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self._jwt}"} if self._jwt else {}
        status, answer, _ = http(method, self.admin_url + path, body, headers)
        if status >= 300:
            hint = ""
            if path == "/auth/login" and self.reuses_databases:
                hint = " (with DATABASE_URL set, WALLET_ADMIN_PASSWORD must be admin's password)"
            raise BenchError(f"{method} {path} answered {status}: {_error_text(answer)}{hint}")
        return answer

    def configure(self, plan: UpstreamPlan) -> Configured:
        """Log in, add two services, a key for each, and a token for both."""
        login = self._call("POST", "/auth/login", {"username": "admin", "password": self._password})
        self._jwt = login["token"]
        suffix = secrets.token_hex(3)
        slugs = {
            "json": f"bench-json-{suffix}",
            "sse": f"bench-sse-{suffix}",
            "tls-json": f"bench-tls-json-{suffix}",
            "tls-sse": f"bench-tls-sse-{suffix}",
        }
        bases = {
            "json": plan.json_base,
            "sse": plan.sse_base,
            "tls-json": plan.tls_json_base,
            "tls-sse": plan.tls_sse_base,
        }
        keys = {
            "json": plan.json_key,
            "sse": plan.sse_key,
            "tls-json": plan.tls_json_key,
            "tls-sse": plan.tls_sse_key,
        }
        hosts = {kind: f"{kind}-{suffix}.bench.test" for kind in ("tls-json", "tls-sse")}
        done = Configured(
            slugs["json"],
            slugs["sse"],
            token="",
            token_id="",
            tls_json_host=hosts["tls-json"],
            tls_sse_host=hosts["tls-sse"],
            slugs=list(slugs.values()),
        )
        self.configured = done
        for kind, slug in slugs.items():
            self._call(
                "POST",
                "/services",
                {
                    "slug": slug,
                    "name": f"bench {kind}",
                    "base_url": bases[kind],
                    "auth": {"type": "bearer"},
                    "hosts": [hosts[kind]] if kind in hosts else [],
                },
            )
            key = self._call(
                "POST",
                "/keys",
                {"key": keys[kind], "service": slug, "tier": "paid", "name": f"bench {kind} key"},
            )
            done.key_ids.append(key["id"])
        token = self._call(
            "POST",
            "/tokens",
            {"name": f"bench-{suffix}", "services": list(slugs.values()), "expires_at": None},
        )
        done.token, done.token_id = token["token"], token["id"]
        return done

    def remove_configuration(self) -> None:
        """On a reused database, take away what `configure` added (best effort)."""
        done = self.configured
        if done is None or not self.reuses_databases or not self._jwt:
            return
        calls = [("DELETE", f"/tokens/{done.token_id}")] if done.token_id else []
        calls += [("DELETE", f"/keys/{key_id}") for key_id in done.key_ids]
        calls += [("DELETE", f"/services/{s}") for s in done.slugs]
        for method, path in calls:
            with contextlib.suppress(BenchError, OSError):
                self._call(method, path)
