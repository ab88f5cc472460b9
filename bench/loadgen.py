"""The load generator: `wrk` when it is on PATH (plain JSON only), else Python workers.

A Python worker (`python -m bench.loadgen`) is a separate process reading one job per line
on stdin and answering one result per line on stdout, so it never shares an event loop (or a
core) with the servers it measures. A job runs a fixed number of keep-alive connections, each
sending its next request as soon as the last answer is complete, for a fixed time that every
worker starts at the same wall-clock moment. Answers are checked: a JSON body must be the
upstream's exact body, an event stream must carry every event; anything else is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import select
import shutil
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final, Literal

import aiohttp

from bench.procs import BenchError, Processes
from bench.upstream import JSON_BODY, SSE_EVENTS, new_loop

Mode = Literal["json", "sse"]
WARMUP_PER_CONNECTION: Final = 2
START_DELAY_S: Final = 0.3
REQUEST_TIMEOUT_S: Final = 30.0
ANSWER_GRACE_S: Final = REQUEST_TIMEOUT_S + 30.0  # a worker's last requests may run late
WRK_SCRIPT: Final = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_WRK requests=%d duration_us=%d errors=%d non2xx=%d p50_us=%d p99_us=%d\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""
WRK_LINE: Final = re.compile(r"BENCH_WRK (.*)")


@dataclass(frozen=True)
class Job:
    url: str
    mode: Mode
    connections: int
    start_at: float  # time.time() at which the measured window opens
    seconds: float
    headers: dict[str, str]
    proxy: str | None = None  # a forward proxy (CONNECT for https URLs)
    ca_file: str | None = None  # the CA that the proxy's certificates chain to


@dataclass
class Sample:
    """What one worker measured; latencies in milliseconds."""

    requests: int = 0
    warmup_requests: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    first_event_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    """One target, one scenario, one round."""

    rps: float
    p50_ms: float
    p99_ms: float
    first_event_p50_ms: float | None
    first_event_p99_ms: float | None
    requests: int
    errors: dict[str, int]
    served: int  # requests the target answered in all, the workers' warm-up ones included
    cpu_us_per_request: float | None = None  # of the target's own processes

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class BadAnswer(Exception):
    """A complete answer that is not the expected one."""


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of unsorted `values` (nan when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(pct / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def merge(samples: Sequence[Sample]) -> Measurement:
    latencies = [v for s in samples for v in s.latencies_ms]
    first = [v for s in samples for v in s.first_event_ms]
    errors: Counter[str] = Counter()
    for s in samples:
        errors.update(s.errors)
    return Measurement(
        rps=sum(s.requests / s.elapsed_s for s in samples if s.elapsed_s > 0),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        first_event_p50_ms=percentile(first, 50) if first else None,
        first_event_p99_ms=percentile(first, 99) if first else None,
        requests=sum(s.requests for s in samples),
        errors=dict(errors),
        served=sum(s.requests + s.warmup_requests for s in samples),
    )


# --- the worker side ---------------------------------------------------------------------

Fetch = Callable[[aiohttp.ClientSession, str], Awaitable[tuple[float, float | None]]]


async def fetch_json(session: aiohttp.ClientSession, url: str) -> tuple[float, float | None]:
    started = time.perf_counter()
    async with session.get(url) as response:
        body = await response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise BadAnswer(f"HTTP {response.status}")
    if body != JSON_BODY:
        raise BadAnswer("wrong body")
    return elapsed, None


async def fetch_sse(session: aiohttp.ClientSession, url: str) -> tuple[float, float | None]:
    started = time.perf_counter()
    first: float | None = None
    data = b""
    async with session.get(url) as response:
        if response.status != 200:
            await response.read()
            raise BadAnswer(f"HTTP {response.status}")
        async for chunk in response.content.iter_any():
            data += chunk
            if first is None and b"\n\n" in data:
                first = time.perf_counter() - started
    elapsed = time.perf_counter() - started
    if first is None or data.count(b"\n\n") != SSE_EVENTS:
        raise BadAnswer("incomplete event stream")
    return elapsed, first


async def _connection(
    session: aiohttp.ClientSession, job: Job, fetch: Fetch, deadline: float, sample: Sample
) -> None:
    while time.perf_counter() < deadline:
        try:
            elapsed, first = await fetch(session, job.url)
        except (aiohttp.ClientError, OSError, TimeoutError, BadAnswer) as exc:
            kind = str(exc) if isinstance(exc, BadAnswer) else type(exc).__name__
            sample.errors[kind] = sample.errors.get(kind, 0) + 1
            await asyncio.sleep(0.005)  # a refused connection must not spin
            continue
        sample.requests += 1
        sample.latencies_ms.append(round(elapsed * 1000, 4))
        if first is not None:
            sample.first_event_ms.append(round(first * 1000, 4))


async def run_job(job: Job) -> Sample:
    fetch: Fetch = fetch_sse if job.mode == "sse" else fetch_json
    tls = ssl.create_default_context(cafile=job.ca_file) if job.ca_file else True
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=job.connections, ssl=tls),
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        headers=job.headers,
        skip_auto_headers=("User-Agent",),
        proxy=job.proxy,
    )
    async with session:
        sample = Sample()
        for _ in range(WARMUP_PER_CONNECTION):  # open every connection before the window
            await asyncio.gather(
                *(_counted(fetch(session, job.url), sample) for _ in range(job.connections))
            )
        await asyncio.sleep(max(job.start_at - time.time(), 0.0))
        started = time.perf_counter()
        deadline = started + job.seconds
        await asyncio.gather(
            *(_connection(session, job, fetch, deadline, sample) for _ in range(job.connections))
        )
        sample.elapsed_s = time.perf_counter() - started
    return sample


async def _counted(work: Awaitable[object], sample: Sample) -> None:
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, BadAnswer):
        await work
        sample.warmup_requests += 1


def worker_main() -> None:
    with asyncio.Runner(loop_factory=new_loop) as runner:
        for line in sys.stdin:
            sample = runner.run(run_job(Job(**json.loads(line))))
            sys.stdout.write(json.dumps(asdict(sample)) + "\n")
            sys.stdout.flush()


# --- the orchestrator side ---------------------------------------------------------------


class PythonLoad:
    """A pool of worker processes; a job's connections are spread over them."""

    name = "python (aiohttp client)"

    def __init__(self, procs: Processes, workers: int, cwd: Path) -> None:
        self._workers = [
            procs.start(
                f"loadgen-{i}",
                [sys.executable, "-m", "bench.loadgen"],
                cwd=cwd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
            )
            for i in range(workers)
        ]

    @property
    def workers(self) -> int:
        return len(self._workers)

    def measure(
        self,
        url: str,
        mode: Mode,
        connections: int,
        seconds: float,
        headers: dict[str, str],
        proxy: str | None = None,
        ca_file: str | None = None,
    ) -> Measurement:
        start_at = time.time() + START_DELAY_S
        used = self._workers[: min(connections, len(self._workers))]
        shares = [
            connections // len(used) + (i < connections % len(used)) for i in range(len(used))
        ]
        for proc, share in zip(used, shares, strict=True):
            job = Job(url, mode, share, start_at, seconds, headers, proxy, ca_file)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(asdict(job)).encode() + b"\n")
            proc.stdin.flush()
        deadline = time.monotonic() + START_DELAY_S + seconds + ANSWER_GRACE_S
        samples = []
        for proc in used:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            line = proc.stdout.readline() if ready else b""
            if not line:
                raise BenchError(f"a load generator worker exited or hung (status {proc.poll()})")
            samples.append(Sample(**json.loads(line)))
        return merge(samples)


class WrkLoad:
    """`wrk` for plain JSON (it cannot time a stream's first event)."""

    name = "wrk"

    def __init__(self, wrk: str, threads: int, scratch: Path) -> None:
        self._wrk = wrk
        self._threads = threads
        self._script = scratch / "report.lua"
        self._script.write_text(WRK_SCRIPT)

    def measure(
        self, url: str, connections: int, seconds: float, headers: dict[str, str]
    ) -> Measurement:
        argv = [
            self._wrk,
            f"-t{min(self._threads, connections)}",
            f"-c{connections}",
            f"-d{max(round(seconds), 1)}s",
            "--timeout",
            f"{REQUEST_TIMEOUT_S:.0f}s",
            "-s",
            str(self._script),
        ]
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        out = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [*argv, url], capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        found = WRK_LINE.search(out.stdout)
        if out.returncode != 0 or found is None:
            raise BenchError(f"wrk failed: {(out.stderr or out.stdout).strip()[-300:]}")
        values = {k: int(v) for k, v in (p.split("=") for p in found[1].split())}
        errors = {"socket errors": values["errors"], "non-2xx": values["non2xx"]}
        return Measurement(
            rps=values["requests"] / (values["duration_us"] / 1e6),
            p50_ms=values["p50_us"] / 1000,
            p99_ms=values["p99_us"] / 1000,
            first_event_p50_ms=None,
            first_event_p99_ms=None,
            requests=values["requests"],
            errors={k: v for k, v in errors.items() if v},
            served=values["requests"],
        )


def find_wrk(allowed: bool) -> str | None:
    return shutil.which("wrk") if allowed else None


if __name__ == "__main__":
    worker_main()
