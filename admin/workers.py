"""`--workers N`: N gateway processes on one port, kept alive by a plain supervisor.

The parent prepares the database once, then forks one process per gateway worker (and one for
the admin app under `wallet run`). The parent never runs an event loop, so every fork, the
first or a restart, starts from a clean process. Each worker listens on the shared port with
SO_REUSEPORT, so the kernel spreads connections between them, and on a private Unix socket so
that the worker answering a metrics scrape can merge in its siblings' counts.

A worker that dies is restarted; one that keeps dying stops the whole group rather than
flapping. SIGINT/SIGTERM to the parent drains every worker; if the parent itself is killed,
each worker gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

_PR_SET_PDEATHSIG: Final = 1
POLL_S: Final = 0.2
DRAIN_TIMEOUT_S: Final = 15.0
RESTART_WINDOW_S: Final = 30.0
MAX_RESTARTS_IN_WINDOW: Final = 5

Say = Callable[[str], None]


@dataclass(frozen=True)
class Slot:
    """What one forked process serves: an app name and, for gateway workers, its index."""

    app: str  # "gateway" or "admin"
    index: int = 0
    run_dir: Path | None = None  # the group's socket folder; None for the admin app
    count: int = 1

    @property
    def label(self) -> str:
        return f"gateway worker {self.index + 1}/{self.count}" if self.run_dir else self.app

    def socket(self, index: int) -> Path:
        assert self.run_dir is not None
        return self.run_dir / f"gateway-{index}.sock"

    @property
    def own_socket(self) -> Path | None:
        return self.socket(self.index) if self.run_dir else None

    @property
    def siblings(self) -> tuple[Path, ...]:
        if self.run_dir is None:
            return ()
        return tuple(self.socket(i) for i in range(self.count) if i != self.index)


class GroupFailed(Exception):
    """A worker kept crashing; the message says which one."""


@dataclass
class Supervisor:
    """Forks the slots, restarts the ones that die, drains them all on a signal."""

    slots: list[Slot]
    run: Callable[[Slot], None]  # what a child runs; returns when it has drained
    say: Say
    children: dict[int, Slot] = field(default_factory=dict)
    crashes: list[float] = field(default_factory=list)
    stopping: bool = False

    def serve(self) -> None:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            for slot in self.slots:
                self._fork(slot)
            while not self.stopping:
                self._reap()
                time.sleep(POLL_S)
        finally:
            self._drain()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            self.say(f"received {signal.Signals(signum).name}; draining the workers")
        self.stopping = True

    def _fork(self, slot: Slot) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the parent's code
            os._exit(self._child(slot))
        self.children[pid] = slot

    def _child(self, slot: Slot) -> int:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() == 1:  # the parent died before prctl took effect
                return 1
            self.run(slot)
            return 0
        except KeyboardInterrupt:
            return 0
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            return 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

    def _reap(self) -> None:
        while self.children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            slot = self.children.pop(pid, None)
            if slot is None or self.stopping:
                continue
            self.say(f"{slot.label} exited ({_describe(status)}); restarting it")
            now = time.monotonic()
            self.crashes = [t for t in self.crashes if now - t < RESTART_WINDOW_S] + [now]
            if len(self.crashes) > MAX_RESTARTS_IN_WINDOW:
                raise GroupFailed(
                    f"{slot.label} exited {len(self.crashes)} times in "
                    f"{RESTART_WINDOW_S:.0f} s; stopping"
                )
            self._fork(slot)

    def _drain(self) -> None:
        self.stopping = True
        for pid in self.children:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.children and time.monotonic() < deadline:
            pid, _status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                time.sleep(POLL_S / 4)
            else:
                self.children.pop(pid, None)
        for pid, slot in list(self.children.items()):
            self.say(f"{slot.label} did not drain in {DRAIN_TIMEOUT_S:.0f} s; killing it")
            _signal(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        self.children.clear()


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def plan(apps: list[str], workers: int) -> tuple[list[Slot], Path]:
    """The slots for `apps` with `workers` gateway processes, and their socket folder."""
    run_dir = Path(tempfile.mkdtemp(prefix="wallet-workers-"))  # mode 0700
    slots = (
        [Slot("gateway", i, run_dir, workers) for i in range(workers)] if "gateway" in apps else []
    )
    if "admin" in apps:
        slots.append(Slot("admin"))
    return slots, run_dir


def remove_run_dir(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
