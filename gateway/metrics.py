"""Prometheus metrics of one app, in its own registry (aioprometheus)."""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Final, cast

from aioprometheus import histogram
from aioprometheus.collectors import Counter, Gauge, Histogram, Registry

LabelKey = tuple[tuple[str, str], ...]
# A buffered collector applies its backlog at the latest after this many observations.
BACKLOG_LIMIT: Final = 1000
# `status` label values by hundreds: 404 -> "4xx".
_STATUS_CLASSES: Final = tuple(f"{n}xx" for n in range(10))


def status_class(status: int) -> str:
    hundreds = status // 100
    return _STATUS_CLASSES[hundreds] if 0 <= hundreds < 10 else f"{hundreds}xx"


class BufferedCounter(Counter):
    """A Counter for the hot path. aioprometheus re-encodes the labels of every update (to
    JSON, twice); this one tallies updates in a plain dict and applies them in bulk when the
    counter is read (a scrape) or the backlog grows. `tally` takes the label values alone, in
    the order of `label_names`: no dict per update."""

    def __init__(self, *args: Any, label_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_names = label_names
        self._pending: dict[LabelKey, float] = {}
        self._tallied: dict[tuple[str, ...], int] = {}
        self._backlog = 0

    def inc(self, labels: dict[str, str]) -> None:
        key = tuple(labels.items())
        self._pending[key] = self._pending.get(key, 0) + 1
        self._backlog += 1
        if self._backlog >= BACKLOG_LIMIT:
            self.apply_backlog()

    def tally(self, values: tuple[str, ...]) -> None:
        """`inc` with the labels given by value, in `label_names` order."""
        tallied = self._tallied
        tallied[values] = tallied.get(values, 0) + 1
        self._backlog += 1
        if self._backlog >= BACKLOG_LIMIT:
            self.apply_backlog()

    def apply_backlog(self) -> None:
        pending, self._pending, self._backlog = self._pending, {}, 0
        tallied, self._tallied = self._tallied, {}
        for key, amount in pending.items():
            super().add(dict(key), amount)
        for values, count in tallied.items():
            super().add(dict(zip(self.label_names, values, strict=True)), count)

    def get_all(self) -> Any:
        self.apply_backlog()
        return super().get_all()


class BufferedHistogram(Histogram):
    """A Histogram for the hot path, buffered like BufferedCounter (`record` is its `tally`).
    The backlog is sorted into the buckets in bulk: aioprometheus compares each observation
    with every bucket."""

    def __init__(self, *args: Any, label_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_names = label_names
        self._pending: dict[LabelKey, list[float]] = {}
        self._recorded: dict[tuple[str, ...], list[float]] = {}
        self._backlog = 0

    def observe(self, labels: dict[str, str], value: float) -> None:  # type: ignore[override]
        self._pending.setdefault(tuple(labels.items()), []).append(value)
        self._backlog += 1
        if self._backlog >= BACKLOG_LIMIT:
            self.apply_backlog()

    def record(self, values: tuple[str, ...], value: float) -> None:
        """`observe` with the labels given by value, in `label_names` order."""
        recorded = self._recorded.get(values)
        if recorded is None:
            recorded = self._recorded[values] = []
        recorded.append(value)
        self._backlog += 1
        if self._backlog >= BACKLOG_LIMIT:
            self.apply_backlog()

    def apply_backlog(self) -> None:
        pending, self._pending, self._backlog = self._pending, {}, 0
        recorded, self._recorded = self._recorded, {}
        for key, values in pending.items():
            self._apply(dict(key), values)
        for names, values in recorded.items():
            self._apply(dict(zip(self.label_names, names, strict=True)), values)

    def _apply(self, labels: dict[str, str], values: list[float]) -> None:
        try:
            tally = cast(histogram.Histogram, self.get_value(labels))
        except KeyError:
            tally = histogram.Histogram(*self.upper_bounds)
            self.set_value(labels, tally)
        total = tally.sum
        for value in values:  # in the order observed, as one by one would sum them
            total += value
        tally.sum = total
        tally.observations += len(values)
        values.sort()
        buckets = tally.buckets  # upper bound -> observations at or below it (cumulative)
        for upper in buckets:
            buckets[upper] += bisect_right(values, upper)

    def get_all(self) -> Any:
        self.apply_backlog()
        return super().get_all()


@dataclass
class Metrics:
    """The collectors an app updates. Label values are route names and codes, never secrets."""

    app: str
    registry: Registry = field(default_factory=Registry)
    in_flight_now: int = 0  # kept as a plain int on the hot path, copied to the gauge on scrape

    def __post_init__(self) -> None:
        labels = {"app": self.app}
        self.requests = BufferedCounter(
            "wallet_http_requests_total",
            "HTTP requests served, by route and status class",
            const_labels=labels,
            registry=self.registry,
            label_names=("route", "status"),
        )
        self.latency = BufferedHistogram(
            "wallet_http_request_duration_seconds",
            "Time to serve a request, by route",
            const_labels=labels,
            registry=self.registry,
            label_names=("route",),
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.in_flight = Gauge(
            "wallet_http_requests_in_flight",
            "Requests being served",
            const_labels=labels,
            registry=self.registry,
        )
        self.errors = Counter(
            "wallet_errors_total",
            "Error responses by code",
            const_labels=labels,
            registry=self.registry,
        )
        self.vault_sealed = Gauge(
            "wallet_vault_sealed",
            "1 when the vault is sealed",
            const_labels=labels,
            registry=self.registry,
        )
        self.proxied = BufferedCounter(
            "wallet_proxied_requests_total",
            "Requests for a service, forwarded or refused, by service, status class and mode "
            "(reverse: /{service}/...; forward: through the forward proxy)",
            const_labels=labels,
            registry=self.registry,
            label_names=("service", "status", "mode"),
        )
        self.upstream_latency = BufferedHistogram(
            "wallet_upstream_latency_seconds",
            "Time from sending upstream to its response headers, by service",
            const_labels=labels,
            registry=self.registry,
            label_names=("service",),
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.overhead = BufferedHistogram(
            "wallet_gateway_overhead_seconds",
            "Time the gateway adds (before the upstream call and before relaying), by service",
            const_labels=labels,
            registry=self.registry,
            label_names=("service",),
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
        )
        self.fallbacks = Counter(
            "wallet_fallbacks_total",
            "Requests retried on another key after an upstream refused one, by service",
            const_labels=labels,
            registry=self.registry,
        )
        self.cooldowns = Counter(
            "wallet_cooldowns_total",
            "Keys put to rest after an upstream refused them, by service and reason "
            "(rate, quota, invalid)",
            const_labels=labels,
            registry=self.registry,
        )
        self.cost = Counter(
            "wallet_cost_total",
            "What proxied requests cost by their services' cost models, by service",
            const_labels=labels,
            registry=self.registry,
        )
        self.client_limited = Counter(
            "wallet_client_limited_total",
            "Requests refused by a client limit (rate_limited, budget_exceeded), by service",
            const_labels=labels,
            registry=self.registry,
        )
        self.usage_buffered = Gauge(
            "wallet_usage_buffered",
            "Usage records waiting to be written to PostgreSQL",
            const_labels=labels,
            registry=self.registry,
        )
        self.usage_dropped = Counter(
            "wallet_usage_dropped_total",
            "Usage records dropped because the buffer was full (PostgreSQL down too long)",
            const_labels=labels,
            registry=self.registry,
        )
        self.login_failures = Counter(
            "wallet_login_failures_total",
            "Failed admin logins by reason",
            const_labels=labels,
            registry=self.registry,
        )


# Families whose merged value across worker processes is the largest one, not the sum.
MERGE_BY_MAX: Final = frozenset({"wallet_vault_sealed"})


def merge_exposition(texts: list[str]) -> str:
    """Merge the text expositions of several worker processes into one, as if one process had
    served every request: counters, histogram buckets/sums/counts and in-flight gauges add up;
    the families in MERGE_BY_MAX take the largest value. Each family keeps its HELP and TYPE
    once, in the order first seen."""
    families: dict[str, list[str]] = {}  # family -> its comment lines
    samples: dict[str, dict[str, float]] = {}  # family -> series -> value
    family = ""
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    comments = families.setdefault(family, [])
                    if len(comments) < 2 and line not in comments:
                        comments.append(line)
                    samples.setdefault(family, {})
                continue
            series, _, value = line.rpartition(" ")
            merged = samples.setdefault(family, {})
            number = float(value)
            if series in merged:
                old = merged[series]
                merged[series] = max(old, number) if family in MERGE_BY_MAX else old + number
            else:
                merged[series] = number
    out: list[str] = []
    for name, comments in families.items():
        out += comments
        out += [f"{series} {_number(value)}" for series, value in samples[name].items()]
    return "\n".join(out) + "\n"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
