"""Child processes that always go away, and small loopback HTTP helpers.

Every child runs in its own session (a Ctrl-C reaches only the benchmark, which then stops
them in order: the wallet drains and stops its databases) and gets SIGTERM if the benchmark
dies without cleaning up (Linux parent-death signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

STOP_TIMEOUT_S: Final = 30.0
_PR_SET_PDEATHSIG: Final = 1
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
# Loopback only: never through a proxy from the environment.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None
    stop_signal: int

    def tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in text)


class Processes:
    def __init__(self) -> None:
        self._children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
        stdin: int = subprocess.DEVNULL,
        stdout: int | None = None,
        stderr: int | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> subprocess.Popen[bytes]:
        """Start `argv`; with `log`, its stdout and stderr go to that file."""
        out: IO[bytes] | int | None = stdout
        err: IO[bytes] | int | None = stderr
        log_file = log.open("ab") if log is not None else None
        if log_file is not None:
            out = err = log_file
        try:
            proc = subprocess.Popen(  # noqa: S603 - argv built here, no shell
                list(argv),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=stdin,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # safe: the benchmark starts no threads
            )
        finally:
            if log_file is not None:
                log_file.close()
        self._children.append(Child(name, proc, log, stop_signal))
        return proc

    def child(self, proc: subprocess.Popen[bytes]) -> Child:
        return next(c for c in self._children if c.proc is proc)

    def named(self, prefix: str) -> Child:
        """The first child whose name starts with `prefix`."""
        return next(c for c in self._children if c.name.startswith(prefix))

    def check_alive(self) -> None:
        for child in self._children:
            if child.proc.poll() is not None:
                raise BenchError(
                    f"{child.name} exited with status {child.proc.returncode}\n{child.tail()}"
                )

    def stop_all(self, say: Callable[[str], None]) -> None:
        """Stop children newest first (gateways before the process owning the databases)."""
        while self._children:
            child = self._children.pop()
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(child.stop_signal)
                try:
                    child.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    say(f"{child.name} did not stop in {STOP_TIMEOUT_S:.0f}s; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.proc.pid, signal.SIGKILL)
                    child.proc.wait()
            # A multi-process server's workers share its process group: none may outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)


def _stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_seconds(roots: Sequence[int]) -> float:
    """CPU time (user + system) used so far by `roots` and all their live descendants."""
    stats = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := _stat(p))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def machine_cpu_seconds() -> float:
    """User and system CPU time of the whole machine since boot (all cores)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system = (int(v) for v in fields[1:4])
    return (user + nice + system) / _CLK_TCK


def own_cpu_seconds() -> float:
    """CPU time of this process, its live descendants and the children it has reaped."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / _CLK_TCK
    return cpu_seconds([os.getpid()]) + reaped


def http(
    method: str,
    url: str,
    body: object | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any, Mapping[str, str]]:
    """One loopback request: (status, JSON body or text or None, headers)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http only
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status, raw, got = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, raw, got = exc.code, exc.read(), exc.headers
    text = raw.decode(errors="replace")
    try:
        parsed: Any = json.loads(text) if text else None
    except ValueError:
        parsed = text
    return status, parsed, dict(got.items())


def wait_ready(
    url: str, child: Child, timeout_s: float, headers: Mapping[str, str] | None = None
) -> None:
    """Poll `url` until it answers 200; fail early (with the log's tail) if `child` exits."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise BenchError(
                f"{child.name} exited with status {child.proc.returncode}\n{child.tail()}"
            )
        try:
            status, _, _ = http("GET", url, headers=headers, timeout=2.0)
        except OSError as exc:
            last = type(exc).__name__
        else:
            if status == 200:
                return
            last = f"HTTP {status}"
        time.sleep(0.1)
    raise BenchError(f"{child.name} not ready after {timeout_s:.0f}s ({last})\n{child.tail()}")
