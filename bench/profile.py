"""`BENCH_PROFILE=1`: where a proxy's time goes, sampled with py-spy during one extra run.

py-spy (`pip install py-spy`, on PATH) samples the process's Python stacks; each sample is
put in the first category that matches walking from the innermost frame out, and shown as
microseconds per request, next to the busiest functions. Only time under Python frames is
seen (the event loop's own C code mostly is not), so the total is below the process's CPU
time per request; compare the shares. py-spy pauses the process for each sample (accurate
stacks), which slows it down a little.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Final

RATE_HZ: Final = 250
CATEGORIES: Final = (
    ("socket writes (send syscalls)", re.compile(r"StreamWriter\._write(lines)? ")),
    ("access log (structlog, redactor)", re.compile(r"\((structlog/|gateway/logs\.py)")),
    ("metrics (aioprometheus)", re.compile(r"\(aioprometheus/")),
    ("request id (secrets)", re.compile(r"\((secrets|random)\.py")),
    ("gateway code", re.compile(r"\(gateway/")),
    ("bare proxy code", re.compile(r"\(bench/bareproxy")),
    ("aiohttp client", re.compile(r"\(aiohttp/(client|connector|streams|helpers)")),
    ("aiohttp server", re.compile(r"\(aiohttp/")),
)
LINE_NUMBER: Final = re.compile(r":\d+\)")


def start(py_spy: str, pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(round(seconds), 1)),
            "--rate",
            str(RATE_HZ),
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in CATEGORIES:
            if pattern.search(frame):
                if name == "gateway code":
                    return "gateway: " + LINE_NUMBER.sub(")", frame)
                return name
    return "event loop, other"


def summarise(raw: Path, requests: int, title: str) -> str:
    """Busy microseconds per request by category, and the busiest functions."""
    by_category: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        by_category[_category(frames)] += n
        for frame in {LINE_NUMBER.sub(")", f) for f in frames}:
            inclusive[frame] += n
    if not total or not requests:
        return f"{title}: no samples\n"
    us = 1e6 / RATE_HZ / requests
    out = [
        f"{title}: {total} samples, {requests} requests, "
        f"{total * us:.0f} us per request sampled in Python code"
    ]
    out += ["", "by category (innermost match):"]
    out += [
        f"  {n * us:7.1f} us  {100 * n / total:5.1f}%  {k}" for k, n in by_category.most_common(25)
    ]
    out += ["", "functions (inclusive; the frames above the request handler left out):"]
    busiest = [(f, n) for f, n in inclusive.most_common() if n < 0.95 * total][:30]
    out += [f"  {n * us:7.1f} us  {f}" for f, n in busiest]
    return "\n".join(out) + "\n"
