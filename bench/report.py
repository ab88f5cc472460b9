"""Rounds in, one table out: medians per target and scenario, ratios, the issue's targets."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from bench.loadgen import Measurement, Mode

LEGEND: Final = (
    "Medians over the rounds. x direct / x bare: req/s ratios (bare: the bare proxy with as "
    "many workers); +p50 ms: p50 added over calling the upstream directly; CPU us/req: CPU "
    "time of the measured hop's own processes (the upstream for direct, the proxy otherwise) "
    "per request."
)
THROUGHPUT_TARGET: Final = 0.75  # gateway req/s over the bare proxy's, at c32
ADDED_P50_TARGET_MS: Final = 0.5  # gateway p50 minus direct p50, at c1
HEADER: Final = (
    "scenario",
    "target",
    "req/s",
    "p50 ms",
    "p99 ms",
    "1st event p50/p99 ms",
    "x direct",
    "x bare",
    "+p50 ms",
    "CPU us/req",
    "errors",
)


@dataclass(frozen=True)
class Scenario:
    mode: Mode
    concurrency: int

    @property
    def label(self) -> str:
        return f"{self.mode} c{self.concurrency}"


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    json_url: str
    sse_url: str
    headers: dict[str, str]
    pids: tuple[int, ...]  # the processes serving it (their descendants count too)
    floor: str | None = None  # the bare proxy to compare with (same number of workers)
    sse_pids: tuple[int, ...] | None = None  # when another server streams the events
    proxy: str | None = None  # forward-proxy rows: the load goes through this proxy
    ca_file: str | None = None  # ... trusting this CA

    def url(self, mode: Mode) -> str:
        return self.sse_url if mode == "sse" else self.json_url

    def processes(self, mode: Mode) -> tuple[int, ...]:
        return self.sse_pids if mode == "sse" and self.sse_pids is not None else self.pids


@dataclass(frozen=True)
class Summary:
    """Medians over the rounds (each round alternates every target)."""

    rps: float
    p50_ms: float
    p99_ms: float
    first_event_p50_ms: float | None
    first_event_p99_ms: float | None
    cpu_us_per_request: float | None
    requests: int
    errors: int
    rounds: int


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def summarise(rounds: Sequence[Measurement]) -> Summary:
    return Summary(
        rps=_median([m.rps for m in rounds]) or 0.0,
        p50_ms=_median([m.p50_ms for m in rounds]) or math.nan,
        p99_ms=_median([m.p99_ms for m in rounds]) or math.nan,
        first_event_p50_ms=_median([m.first_event_p50_ms for m in rounds]),
        first_event_p99_ms=_median([m.first_event_p99_ms for m in rounds]),
        cpu_us_per_request=_median([m.cpu_us_per_request for m in rounds]),
        requests=sum(m.requests for m in rounds),
        errors=sum(m.error_count for m in rounds),
        rounds=len(rounds),
    )


Results = dict[tuple[str, str], list[Measurement]]  # (scenario label, target key) → rounds


def summaries(
    scenarios: Sequence[Scenario], targets: Sequence[Target], results: Results
) -> dict[tuple[str, str], Summary]:
    return {
        (s.label, t.key): summarise(results[s.label, t.key])
        for s in scenarios
        for t in targets
        if results.get((s.label, t.key))
    }


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def _ratio(value: float, base: Summary | None) -> str:
    return "-" if base is None or base.rps <= 0 else f"{value / base.rps:.2f}"


def rows(
    scenarios: Sequence[Scenario],
    targets: Sequence[Target],
    table: dict[tuple[str, str], Summary],
) -> list[list[str]]:
    out = []
    for s in scenarios:
        direct = table.get((s.label, "direct"))
        for t in targets:
            cell = table.get((s.label, t.key))
            if cell is None:
                continue
            first = (
                f"{_ms(cell.first_event_p50_ms)} / {_ms(cell.first_event_p99_ms)}"
                if cell.first_event_p50_ms is not None
                else "-"
            )
            floor = table.get((s.label, t.floor)) if t.floor else None
            added = (
                f"{cell.p50_ms - direct.p50_ms:+.2f}"
                if direct is not None and t.key != "direct"
                else "-"
            )
            out.append(
                [
                    s.label,
                    t.label,
                    f"{cell.rps:,.0f}",
                    _ms(cell.p50_ms),
                    _ms(cell.p99_ms),
                    first,
                    _ratio(cell.rps, direct) if t.key != "direct" else "1.00",
                    _ratio(cell.rps, floor),
                    added,
                    "-" if cell.cpu_us_per_request is None else f"{cell.cpu_us_per_request:.0f}",
                    str(cell.errors),
                ]
            )
    return out


def render_text(body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *body]) for i in range(len(HEADER))]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs).rstrip()

    out = [line(HEADER), line(["-" * w for w in widths])]
    previous = None
    for r in body:
        if previous is not None and r[0] != previous:
            out.append("")
        out.append(line(r))
        previous = r[0]
    return "\n".join(out)


def render_markdown(body: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 9) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def verdicts(targets: Sequence[Target], table: dict[tuple[str, str], Summary]) -> list[str]:
    """The issue's two targets, for each gateway row that was measured; and what the forward
    proxy costs next to the reverse proxy."""
    out = forward_ratios(table)
    for t in targets:
        if not t.key.startswith("gateway") or t.floor is None:
            continue
        gw32, bare32 = table.get(("json c32", t.key)), table.get(("json c32", t.floor))
        if gw32 is not None and bare32 is not None and bare32.rps > 0:
            share = gw32.rps / bare32.rps
            ok = "met" if share >= THROUGHPUT_TARGET else "MISSED"
            out.append(
                f"{t.label}, json c32: {share:.0%} of the bare proxy's req/s "
                f"(target >= {THROUGHPUT_TARGET:.0%}): {ok}"
            )
        gw_cpu = gw32.cpu_us_per_request if gw32 is not None else None
        bare_cpu = bare32.cpu_us_per_request if bare32 is not None else None
        if gw_cpu and bare_cpu:
            out.append(
                f"{t.label}, json c32, by CPU per request (steadier on a busy machine): "
                f"{gw_cpu:.0f} us vs the bare proxy's {bare_cpu:.0f} us, so on equal cores "
                f"{bare_cpu / gw_cpu:.0%} of its req/s"
            )
        gw1, direct1 = table.get(("json c1", t.key)), table.get(("json c1", "direct"))
        if gw1 is not None and direct1 is not None:
            added = gw1.p50_ms - direct1.p50_ms
            ok = "met" if added <= ADDED_P50_TARGET_MS else "MISSED"
            out.append(
                f"{t.label}, json c1: {added:+.2f} ms p50 over direct "
                f"(target <= {ADDED_P50_TARGET_MS} ms): {ok}"
            )
    return out


def forward_ratios(table: dict[tuple[str, str], Summary]) -> list[str]:
    """Forward proxy (TLS on both sides, keep-alive in the tunnel) vs the reverse proxy
    (plain): by CPU per request of the gateway, which the load generators do not sway."""
    out = []
    for scenario in ("json c1", "json c32", "sse c32"):
        forward, reverse = table.get((scenario, "forward-1")), table.get((scenario, "gateway-1"))
        if forward is None or reverse is None:
            continue
        f_cpu, r_cpu = forward.cpu_us_per_request, reverse.cpu_us_per_request
        if f_cpu and r_cpu:
            out.append(
                f"forward proxy (1 worker), {scenario}: {f_cpu:.0f} us CPU per request vs "
                f"{r_cpu:.0f} us in reverse mode, so {r_cpu / f_cpu:.0%} of its req/s on "
                f"equal cores; p50 {forward.p50_ms:.2f} ms vs {reverse.p50_ms:.2f} ms"
            )
    return out


def _finite(value: Any) -> Any:
    """JSON has no NaN: an unmeasurable value (no successful request) becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write(
    out_dir: Path,
    meta: dict[str, Any],
    scenarios: Sequence[Scenario],
    targets: Sequence[Target],
    results: Results,
    text_table: str,
    markdown_table: str,
    checks: Sequence[str],
    notes: Sequence[str],
) -> tuple[Path, Path]:
    table = summaries(scenarios, targets, results)
    document = {
        "meta": meta,
        "targets": [{"key": t.key, "label": t.label, "floor": t.floor} for t in targets],
        "results": [
            {
                "scenario": s.label,
                "target": t.key,
                "summary": asdict(table[s.label, t.key]),
                "rounds": [asdict(m) for m in results[s.label, t.key]],
            }
            for s in scenarios
            for t in targets
            if (s.label, t.key) in table
        ],
        "checks": list(checks),
        "notes": list(notes),
        "table": text_table,
    }
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(_finite(document), indent=2, default=str) + "\n")
    setup = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    md = [
        "# API Key Wallet gateway benchmark",
        "",
        setup,
        "",
        LEGEND,
        "",
        markdown_table,
        "",
        *(f"- {c}" for c in checks),
        *(["", "Notes:", "", *(f"- {n}" for n in notes)] if notes else []),
        "",
    ]
    md_path.write_text("\n".join(md))
    return json_path, md_path
