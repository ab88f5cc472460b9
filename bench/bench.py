"""`make bench`: what the gateway costs, next to a direct call and a bare aiohttp proxy.

Everything runs on loopback, as separate processes: a fake upstream (nginx for the JSON body
when it is on PATH, else aiohttp; aiohttp always for the event stream), a bare pass-through
proxy (the floor for an aiohttp proxy), the real gateway (`wallet gateway`, configured
through the admin API; also through its forward-proxy port, TLS on both sides: the client's
tunnel and the upstream) and the load generator (`wrk` for JSON when on PATH, else Python
worker processes; always Python through the forward proxy, which wrk cannot use). Each
round measures every target in every scenario, alternating, so a noisy moment hits all of
them; the table shows medians over the rounds.

Knobs: BENCH_SECONDS (per measurement; default: fit ~2 minutes of measuring), BENCH_ROUNDS
(default 3), BENCH_NO_WRK=1 / BENCH_NO_NGINX=1 (use the Python load generator / the aiohttp
upstream even when the tools exist), BENCH_PROFILE=1 (then sample both 1-worker proxies with
py-spy, see bench/profile.py). Results go to bench/results.json and bench/results.md.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final

import aiohttp

from bench import profile, report
from bench.loadgen import Measurement, Mode, PythonLoad, WrkLoad, find_wrk
from bench.procs import (
    BenchError,
    Processes,
    cpu_seconds,
    free_port,
    http,
    machine_cpu_seconds,
    own_cpu_seconds,
    wait_ready,
)
from bench.report import Scenario, Target
from bench.tls import make_certs
from bench.upstream import JSON_BODY, SSE_EVENTS
from bench.wallet import UpstreamPlan, Wallet, gateway_accepts_workers

REPO: Final = Path(__file__).resolve().parent.parent
OUT_DIR: Final = REPO / "bench"
DEFAULT_ROUNDS: Final = 3
MEASURE_BUDGET_S: Final = 120.0  # default BENCH_SECONDS spreads this over every measurement
SECONDS_RANGE: Final = (2, 5)  # whole seconds: wrk takes no fractions
OVERHEAD_PER_MEASUREMENT_S: Final = 0.7  # start barrier, connection warm-up, collection
WARMUP_S: Final = 0.5
PY_SPY_ATTACH_S: Final = 0.5
PROFILE_MIN_S: Final = 5.0
BUSY_SHARE: Final = 0.1  # of the machine's CPU used by others: worth a warning
SCENARIOS: Final = (
    Scenario("json", 1),
    Scenario("json", 32),
    Scenario("sse", 1),
    Scenario("sse", 32),
)
JSON_PATH: Final = "/v1/chat/completions"
SSE_PATH: Final = "/v1/stream"
NGINX_CONF: Final = """
daemon off;
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 10000000;
    map $http_authorization $bench_key_ok {{ "Bearer {key}" 1; default 0; }}
    map $http_authorization $bench_tls_key_ok {{ "Bearer {tls_key}" 1; default 0; }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=1024;
        location / {{
            if ($bench_key_ok = 0) {{ return 401; }}
            default_type application/json;
            return 200 '{body}';
        }}
    }}
    server {{
        listen 127.0.0.1:{tls_port} ssl reuseport backlog=1024;
        ssl_certificate {cert};
        ssl_certificate_key {cert_key};
        location / {{
            if ($bench_tls_key_ok = 0) {{ return 401; }}
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Config:
    rounds: int
    seconds: float | None  # None: fit the budget
    use_nginx: bool
    use_wrk: bool = True
    profile: bool = False

    @classmethod
    def from_env(cls) -> Config:
        """The BENCH_* knobs; the one place the bench reads its environment."""
        try:
            rounds = int(os.environ.get("BENCH_ROUNDS") or DEFAULT_ROUNDS)
            raw = os.environ.get("BENCH_SECONDS")
            seconds = float(raw) if raw else None
        except ValueError:
            raise BenchError(
                "BENCH_ROUNDS must be a whole number, BENCH_SECONDS a number"
            ) from None
        if rounds < 1 or (seconds is not None and not 0.2 <= seconds <= 600):
            raise BenchError("BENCH_ROUNDS must be >= 1 and BENCH_SECONDS within 0.2-600")
        return cls(
            rounds,
            seconds,
            use_nginx=not os.environ.get("BENCH_NO_NGINX"),
            use_wrk=not os.environ.get("BENCH_NO_WRK"),
            profile=bool(os.environ.get("BENCH_PROFILE")),
        )

    def seconds_for(self, measurements: int) -> float:
        if self.seconds is not None:
            return self.seconds
        low, high = SECONDS_RANGE
        return float(min(max(round(MEASURE_BUDGET_S / measurements), low), high))


class Status:
    """One status line rewritten in place on a terminal; plain lines otherwise."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._dirty = False

    def show(self, text: str) -> None:
        if not self._tty:
            return
        width = shutil.get_terminal_size().columns - 1
        sys.stderr.write("\r\033[K" + text[:width])
        sys.stderr.flush()
        self._dirty = True

    def milestone(self, text: str) -> None:
        """A step worth a line in a log too (without a terminal, `show` prints nothing)."""
        if self._tty:
            self.show(text)
        else:
            print(f"bench: {text}", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self._dirty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._dirty = False

    def say(self, text: str) -> None:
        self.clear()
        print(f"bench: {text}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


class Bench:
    def __init__(self, config: Config, status: Status, scratch: Path) -> None:
        self.config = config
        self.status = status
        self.scratch = scratch
        self.procs = Processes()
        self.cores = os.cpu_count() or 1
        self.load_before = os.getloadavg()[0]
        self.targets: list[Target] = []
        self.results: report.Results = {}
        self.notes: list[str] = []
        self.meta: dict[str, Any] = {}
        self.wallet: Wallet | None = None
        self.python_load: PythonLoad | None = None
        self.wrk: WrkLoad | None = None
        self.seconds = 0.0

    # --- setup ------------------------------------------------------------------------

    def _start_many(self, name: str, argv: list[str], count: int) -> tuple[int, ...]:
        return tuple(
            self.procs.start(
                f"{name} {i + 1}/{count}" if count > 1 else name,
                argv,
                cwd=REPO,
                log=self.scratch / f"{name.replace(' ', '-')}.log",
            ).pid
            for i in range(count)
        )

    def _wait(self, url: str, name: str, headers: dict[str, str] | None = None) -> None:
        wait_ready(url, self.procs.named(name), 30.0, headers)

    def start_upstream(self) -> tuple[UpstreamPlan, str, tuple[int, ...], tuple[int, ...]]:
        """The fake upstream: (plan, description, pids serving JSON, pids serving SSE). It
        also serves TLS (a throwaway CA), for the forward-proxy rows."""
        json_key, sse_key, tls_json_key, tls_sse_key = (
            f"bench-{secrets.token_urlsafe(24)}" for _ in range(4)
        )
        ca_file, cert, cert_key = make_certs(self.scratch)
        auth = {"Authorization": f"Bearer {json_key}"}
        port, tls_port = free_port(), free_port()
        keys = [a for k in (json_key, sse_key, tls_json_key, tls_sse_key) for a in ("--key", k)]
        sse_pids = pids = self._start_many(
            "upstream",
            [
                sys.executable,
                "-m",
                "bench.upstream",
                "--port",
                str(port),
                *keys,
                "--tls-port",
                str(tls_port),
                "--cert",
                str(cert),
                "--cert-key",
                str(cert_key),
            ],
            self.cores,
        )
        aio, aio_tls = f"http://127.0.0.1:{port}", f"https://127.0.0.1:{tls_port}"
        self._wait(aio + JSON_PATH, "upstream", auth)
        json_base, kind = aio, f"aiohttp, {self.cores} process(es) on one port (SO_REUSEPORT)"
        tls_json_base = aio_tls
        nginx = shutil.which("nginx") if self.config.use_nginx else None
        why_not = "BENCH_NO_NGINX is set" if not self.config.use_nginx else "nginx is not on PATH"
        if nginx is not None:
            json_base, tls_json_base, nginx_pid = self._start_nginx(
                nginx, json_key, tls_json_key, cert, cert_key
            )
            pids = (nginx_pid,)
            self._wait(json_base + JSON_PATH, "nginx", auth)
            kind = f"nginx ({self.cores} workers) for JSON; {kind} for SSE"
        else:
            self.notes.append(f"{why_not}: the JSON upstream is the aiohttp one (nginx is faster)")
        plan = UpstreamPlan(
            json_base,
            aio + "/sse",
            json_key,
            sse_key,
            tls_json_base,
            aio_tls + "/sse",
            tls_json_key,
            tls_sse_key,
            ca_file,
        )
        return plan, kind + "; the same over TLS for the forward-proxy rows", pids, sse_pids

    def _start_nginx(
        self, nginx: str, key: str, tls_key: str, cert: Path, cert_key: Path
    ) -> tuple[str, str, int]:
        root = self.scratch / "nginx"
        root.mkdir()
        port, tls_port = free_port(), free_port()
        conf = root / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                workers=self.cores,
                root=root,
                key=key,
                tls_key=tls_key,
                port=port,
                tls_port=tls_port,
                cert=cert,
                cert_key=cert_key,
                body=JSON_BODY.decode(),
            )
        )
        proc = self.procs.start(
            "nginx",
            [nginx, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)],
            cwd=root,
            log=root / "stderr.log",
        )
        return f"http://127.0.0.1:{port}", f"https://127.0.0.1:{tls_port}", proc.pid

    def start_bare(self, plan: UpstreamPlan, workers: int) -> tuple[str, tuple[int, ...]]:
        port = free_port()
        name = "bare proxy" if workers == 1 else f"bare proxy x{workers}"
        pids = self._start_many(
            name,
            [
                sys.executable,
                "-m",
                "bench.bareproxy",
                "--port",
                str(port),
                "--route",
                f"json={plan.json_base}",
                "--route",
                f"sse={plan.sse_base}",
            ],
            workers,
        )
        url = f"http://127.0.0.1:{port}"
        self._wait(url + "/json" + JSON_PATH, name, {"Authorization": f"Bearer {plan.json_key}"})
        return url, pids

    def setup(self) -> None:
        self.status.milestone("starting the fake upstream…")
        plan, upstream_kind, json_pids, sse_pids = self.start_upstream()
        wallet = self.wallet = Wallet(self.procs, self.scratch, REPO, self.status.say)
        multi = gateway_accepts_workers(wallet.command)
        self.status.milestone("starting the bare proxy…")
        bare = {1: self.start_bare(plan, 1)}
        if multi and self.cores > 1:
            bare[self.cores] = self.start_bare(plan, self.cores)
        databases = (
            "PostgreSQL/Redis from DATABASE_URL/REDIS_URL"
            if wallet.reuses_databases
            else "embedded PostgreSQL/Redis in a temporary WALLET_DATA_DIR"
        )
        self.status.milestone(f"starting `wallet admin` ({databases})…")
        wallet.start_admin()
        self.status.milestone("configuring services, keys and a token through the admin API…")
        done = wallet.configure(plan)
        self.status.milestone("starting `wallet gateway`…")
        wallet.trust_upstream_ca(plan.ca_file)
        gateways = {1: wallet.start_gateway(None)}
        if multi:
            self.status.milestone(f"starting `wallet gateway --workers {self.cores}`…")
            gateways[self.cores] = wallet.start_gateway(self.cores)
        else:
            self.notes.append(
                "`wallet gateway --workers N` is not available yet (not in its --help): "
                "the all-cores rows were skipped"
            )
        direct_auth = {"Authorization": f"Bearer {plan.json_key}"}
        self.targets = [
            Target(
                "direct",
                "direct (upstream)",
                plan.json_base + JSON_PATH,
                plan.sse_base + SSE_PATH,
                direct_auth,
                json_pids,
                sse_pids=sse_pids,
            )
        ]
        for workers, (gw_url, gw_pid, _) in sorted(gateways.items()):
            suffix = "1 worker" if workers == 1 else f"{workers} workers"
            floor = None
            if workers in bare:
                bare_url, bare_pids = bare[workers]
                floor = f"bare-{workers}"
                self.targets.append(
                    Target(
                        floor,
                        f"bare proxy ({suffix})",
                        f"{bare_url}/json{JSON_PATH}",
                        f"{bare_url}/sse{SSE_PATH}",
                        direct_auth,
                        bare_pids,
                    )
                )
            self.targets.append(
                Target(
                    f"gateway-{workers}",
                    f"gateway ({suffix})",
                    f"{gw_url}/{done.json_slug}{JSON_PATH}",
                    f"{gw_url}/{done.sse_slug}{SSE_PATH}",
                    {"Authorization": f"Bearer {done.token}"},
                    (gw_pid,),
                    floor=floor,
                )
            )
        _, gw_pid, forward_port = gateways[1]
        wallet_ca = self.scratch / "wallet-ca.pem"
        wallet.export_ca(wallet_ca)
        self.targets.append(
            Target(
                "forward-1",
                "gateway forward proxy (1 worker)",
                f"https://{done.tls_json_host}{JSON_PATH}",
                f"https://{done.tls_sse_host}{SSE_PATH}",
                {"Authorization": f"Bearer {done.token}"},
                (gw_pid,),
                proxy=f"http://127.0.0.1:{forward_port}",
                ca_file=str(wallet_ca),
            )
        )
        self._prepare_load(upstream_kind, databases)
        self.status.milestone("checking every target once…")
        for target in self.targets:
            self.check(target)

    def _prepare_load(self, upstream_kind: str, databases: str) -> None:
        """The load generators, the time per measurement, and the description of the setup."""
        wrk = find_wrk(self.config.use_wrk)
        self.wrk = WrkLoad(wrk, self.cores, self.scratch) if wrk else None
        self.python_load = PythonLoad(self.procs, self.cores, REPO)
        measurements = len(SCENARIOS) * len(self.targets) * self.config.rounds
        self.seconds = self.config.seconds_for(measurements)
        python_load = f"Python, aiohttp client, {self.cores} worker process(es)"
        if self.wrk is None:
            why = "BENCH_NO_WRK is set" if not self.config.use_wrk else "wrk is not on PATH"
            self.notes.append(
                f"{why}: JSON is measured with the Python load generator, whose own cost is "
                "part of every latency (the same for every target)"
            )
        assert self.wallet is not None
        self.meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": _git_commit(),
            "machine": f"{self.cores} CPU(s), {_cpu_model()}, {platform.system()} "
            f"{platform.release()}",
            "python": f"{platform.python_version()}, aiohttp {aiohttp.__version__}",
            "load generator": f"JSON: {'wrk' if self.wrk else python_load}; SSE: {python_load}",
            "upstream": upstream_kind,
            "gateway": f"`wallet gateway` ({databases}; token auth, key selection, injection, "
            f"scrubbing, metrics and access logs on; LOG_LEVEL={self.wallet.log_level})",
            "load average (1 min) before starting": f"{self.load_before:.2f}",
            "rounds": self.config.rounds,
            "seconds per measurement": self.seconds,
            "SSE": f"{SSE_EVENTS} events per stream, one chunk each",
        }
        self.status.say(
            f"{len(self.targets)} targets x {len(SCENARIOS)} scenarios x "
            f"{self.config.rounds} rounds of {self.seconds:g}s "
            f"(~{_clock(measurements * (self.seconds + OVERHEAD_PER_MEASUREMENT_S))} to go)"
        )

    def check(self, target: Target) -> None:
        """One request of each kind, checked, before anything is measured."""
        if target.proxy is not None:  # through the forward proxy: the load generator checks
            assert self.python_load is not None
            modes: tuple[Mode, ...] = ("json", "sse")
            for mode in modes:
                m = self.python_load.measure(
                    target.url(mode), mode, 1, 0.2, target.headers, target.proxy, target.ca_file
                )
                if m.error_count or not m.requests:
                    raise BenchError(f"{target.label}: {mode} through the proxy failed: {m}")
            return
        for mode in ("json", "sse"):
            status, body, headers = http("GET", target.url(mode), headers=target.headers)
            if status != 200:
                raise BenchError(f"{target.label}: GET {mode} answered {status}: {body}")
            if mode == "json" and body != json.loads(JSON_BODY):
                raise BenchError(f"{target.label}: the JSON body differs from the upstream's")
            if mode == "sse" and str(body).count("\n\n") != SSE_EVENTS:
                raise BenchError(f"{target.label}: the event stream is incomplete")
            if target.key.startswith("gateway") and "X-Wallet-Key-Id" not in headers:
                raise BenchError(f"{target.label}: no X-Wallet-Key-Id (was a key injected?)")

    # --- measuring --------------------------------------------------------------------

    def measure(self, target: Target, scenario: Scenario, seconds: float) -> Measurement:
        """One measurement, with the CPU time the target's own processes spent on it."""
        url = target.url(scenario.mode)
        pids = target.processes(scenario.mode)
        cpu_before = cpu_seconds(pids)
        if scenario.mode == "json" and self.wrk is not None and target.proxy is None:
            m = self.wrk.measure(url, scenario.concurrency, seconds, target.headers)
        else:  # wrk speaks neither event streams nor proxies
            assert self.python_load is not None
            m = self.python_load.measure(
                url,
                scenario.mode,
                scenario.concurrency,
                seconds,
                target.headers,
                target.proxy,
                target.ca_file,
            )
        cpu = cpu_seconds(pids) - cpu_before
        return replace(m, cpu_us_per_request=cpu / m.served * 1e6 if m.served else None)

    def run(self) -> None:
        machine_before, ours_before = machine_cpu_seconds(), own_cpu_seconds()
        wall_before = time.monotonic()
        try:
            self._run()
        finally:
            wall = time.monotonic() - wall_before
            others = (machine_cpu_seconds() - machine_before) - (own_cpu_seconds() - ours_before)
            share = max(others, 0.0) / (wall * self.cores)
            self.meta["CPU used by other processes while measuring"] = f"{share:.0%}"
            if share > BUSY_SHARE:
                self.notes.append(
                    f"other processes used {share:.0%} of the machine's CPU during the run: "
                    "the numbers are noisy (CPU us/req is the steadier column)"
                )

    def _run(self) -> None:
        for target in self.targets:
            self.status.show(f"warming up {target.label}…")
            for mode in ("json", "sse"):
                self.measure(target, Scenario(mode, 32), WARMUP_S)
        total = len(SCENARIOS) * len(self.targets) * self.config.rounds
        done = 0
        started = time.monotonic()
        for round_index in range(self.config.rounds):
            self.status.milestone(f"round {round_index + 1}/{self.config.rounds}")
            # Rotate the order each round, so no target always follows the same one.
            shift = round_index % len(self.targets)
            order = self.targets[shift:] + self.targets[:shift]
            for scenario in SCENARIOS:
                for target in order:
                    left = (total - done) * (self.seconds + OVERHEAD_PER_MEASUREMENT_S)
                    self.status.show(
                        f"[{done + 1}/{total}] round {round_index + 1}/{self.config.rounds}: "
                        f"{scenario.label} -> {target.label} · "
                        f"{_clock(time.monotonic() - started)} elapsed, ~{_clock(left)} left"
                    )
                    m = self.measure(target, scenario, self.seconds)
                    self.results.setdefault((scenario.label, target.key), []).append(m)
                    self.procs.check_alive()
                    done += 1

    def profile(self) -> None:
        """BENCH_PROFILE: one more json c32 run of each 1-worker proxy under py-spy."""
        py_spy = shutil.which("py-spy")
        if py_spy is None:
            self.notes.append("BENCH_PROFILE is set but py-spy is not on PATH (pip install py-spy)")
            return
        texts = []
        for target in (t for t in self.targets if t.key in ("bare-1", "gateway-1")):
            self.status.milestone(f"profiling {target.label} (json c32) with py-spy…")
            raw = self.scratch / f"profile-{target.key}.txt"
            seconds = max(self.seconds, PROFILE_MIN_S)
            spy = profile.start(py_spy, target.pids[0], seconds + 1, raw)
            time.sleep(PY_SPY_ATTACH_S)
            m = self.measure(target, Scenario("json", 32), seconds)
            spy.wait(seconds + 60)
            if raw.exists():
                texts.append(profile.summarise(raw, m.served, f"{target.label}, json c32"))
                # The collapsed stacks too, for a flame graph or a closer look.
                shutil.copy(raw, OUT_DIR / f"profile-{target.key}-stacks.txt")
        path = OUT_DIR / "profile-gateway.txt"
        path.write_text("\n".join(texts))
        self.notes.append(f"py-spy profile of the 1-worker proxies written to {path}")

    # --- the end ----------------------------------------------------------------------

    def teardown(self) -> None:
        if self.wallet is not None:
            self.wallet.remove_configuration()
        self.procs.stop_all(self.status.say)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def report(self, interrupted: bool) -> None:
        if interrupted:
            self.notes.append("interrupted: some measurements are missing or have fewer rounds")
        table = report.summaries(SCENARIOS, self.targets, self.results)
        body = report.rows(SCENARIOS, self.targets, table)
        text = report.render_text(body)
        checks = report.verdicts(self.targets, table)
        errors = sorted({k for rounds in self.results.values() for m in rounds for k in m.errors})
        if errors:
            self.notes.append(f"errors seen: {', '.join(errors)}")
        paths = report.write(
            OUT_DIR,
            self.meta,
            SCENARIOS,
            self.targets,
            self.results,
            text,
            report.render_markdown(body),
            checks,
            self.notes,
        )
        print()
        for name, value in self.meta.items():
            print(f"{name}: {value}")
        print()
        print(text)
        print()
        print(report.LEGEND)
        print()
        for line in (*checks, *(f"note: {n}" for n in self.notes)):
            print(line)
        print()
        print(f"results written to {paths[0]} and {paths[1]}")


def main() -> int:
    try:
        config = Config.from_env()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    status = Status()
    bench = Bench(config, status, Path(tempfile.mkdtemp(prefix="wallet-bench-")))
    signal.signal(signal.SIGTERM, _interrupt)
    code = 0
    try:
        bench.setup()
        bench.run()
        if config.profile:
            bench.profile()
    except KeyboardInterrupt:
        status.say("interrupted")
        code = 130
    except BenchError as exc:
        status.say(f"error: {exc}")
        code = 1
    finally:
        # A second Ctrl-C must not cut the clean stop short (the databases save first).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        status.show("stopping every process…")
        bench.teardown()
        status.clear()
    if bench.results:
        bench.report(interrupted=code != 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
