"""Charts as SVG markup drawn on the server, so that the console's pages need no script to show
them: a line chart of a few series over time and a horizontal bar chart.

Pure functions from numbers and labels to `Markup`. Every text that reaches the markup (labels,
series names, titles) is escaped here, so a template includes a chart without `|safe`, and a
key named `<script>` stays text inside the SVG too. Each chart carries a `<title>` and a
`<desc>` (named by `aria-labelledby`) and a `<title>` per point or bar, which browsers show on
hover; the page puts a table of the same numbers next to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from markupsafe import Markup

# Colours that keep apart for the common kinds of colour blindness (Okabe-Ito), darkened to
# read on white.
PALETTE: Final = ("#0b62a4", "#c0362c", "#b66a00", "#23824a", "#7a4cc2", "#5f6b7a")
NICE_STEPS: Final = (1.0, 2.0, 2.5, 5.0, 10.0)
MAX_X_LABELS: Final = 6
MAX_MARKED_POINTS: Final = 48  # beyond this, dots on every point would blur into the line
LABEL_CHARS: Final = 22
# A generous width of one character of the axis text (11px in console.css): what keeps an
# x label whose middle is near an edge from being cut off there.
CHAR_WIDTH: Final = 7.0

# Line chart: room for the legend above, the y labels left, the x labels below.
LINE_WIDTH: Final = 720
LINE_HEIGHT: Final = 240
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 30, 28
# Bar chart: one row per bar below a heading line.
BAR_WIDTH: Final = 720
BAR_TOP: Final = 4
BAR_ROW: Final = 26
BAR_LABEL: Final = 170
BAR_VALUE: Final = 90


@dataclass(frozen=True)
class Series:
    """One line: its name (legend, hover titles) and one value per label."""

    name: str
    values: Sequence[float | Decimal]
    colour: str = PALETTE[0]


def _clean(value: float | Decimal) -> float:
    """A value to draw: NaN, infinities and negatives (no count or cost is negative) are 0."""
    number = float(value)
    return number if math.isfinite(number) and number > 0 else 0.0


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above `value` (1 for nothing):
    the top of a scale whose ticks read as round numbers."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    for step in NICE_STEPS:
        if step * power >= value * (1 - 1e-12):
            return step * power
    return 10 * power  # pragma: no cover - NICE_STEPS ends at 10


def ticks(top: float) -> list[float]:
    """Evenly spaced round values from 0 to `top` (a `nice_ceiling`): steps of 0.5 for 2 and
    2.5, of 0.2 for 1, of 1 for 5 (times its power of ten)."""
    power = 10.0 ** math.floor(math.log10(top))
    count = 4 if round(top / power, 6) == 2 else 5
    return [top * i / count for i in range(count + 1)]


def number(value: float | Decimal) -> str:
    """A value as a label: whole numbers with thousands separators, others to 4 significant
    digits ("1,234", "0.0012", "2.5")."""
    amount = float(value)
    if not math.isfinite(amount):
        return "0"
    if amount == int(amount) and abs(amount) < 1e15:
        return f"{int(amount):,}"
    return f"{amount:.4g}"


def compact(value: float | Decimal) -> str:
    """An axis tick: short enough for the margin left of the plot ("950", "9,500", "25k",
    "2.5M", "1.2B")."""
    amount = float(value)
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e4, "k")):
        if abs(amount) >= size:
            divisor = size if unit != "k" else 1e3
            return f"{amount / divisor:.3g}{unit}"
    return number(amount)


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"


def _open(chart_id: str, title: str, description: str, width: int, height: int) -> list[Markup]:
    return [
        Markup(
            '<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{0}" role="img" '
            'viewBox="0 0 {1} {2}" width="{1}" height="{2}" aria-labelledby="{0}-title {0}-desc">'
        ).format(chart_id, width, height),
        Markup('<title id="{}-title">{}</title>').format(chart_id, title),
        Markup('<desc id="{}-desc">{}</desc>').format(chart_id, description),
    ]


def _empty(chart_id: str, title: str, width: int, height: int) -> Markup:
    parts = _open(chart_id, title, "No data for this period.", width, height)
    parts.append(
        Markup(
            '<text x="{:.1f}" y="{:.1f}" text-anchor="middle" class="empty">'
            "No data for this period</text></svg>"
        ).format(width / 2, height / 2)
    )
    return Markup("").join(parts)


def _summary(labels: Sequence[str], series: Sequence[tuple[Series, list[float]]]) -> str:
    sentences = []
    for line, values in series:
        peak = max(range(len(values)), key=values.__getitem__)
        sentences.append(
            f"{line.name}: total {number(sum(values))}, "
            f"highest {number(values[peak])} at {labels[peak]}."
        )
    return f"{len(labels)} points from {labels[0]} to {labels[-1]}. " + " ".join(sentences)


def _x_anchor(i: int, count: int, at: float, label: str, width: int) -> str:
    """How the label of point `i` of `count` lines up with its x position `at`: the first
    starts there and the last ends there (they sit on the plot's edges), any other is centred
    unless half of it would pass an edge of the chart."""
    half = len(label) * CHAR_WIDTH / 2
    if (count > 1 and i == 0) or at - half < 0:
        return "start"
    if (count > 1 and i == count - 1) or at + half > width:
        return "end"
    return "middle"


def line_chart(
    chart_id: str,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    width: int = LINE_WIDTH,
    height: int = LINE_HEIGHT,
) -> Markup:
    """Lines over `labels` (one x position each), on one scale from 0 to a round number at or
    above the highest value; a legend, y ticks, up to MAX_X_LABELS x labels, and a hover title
    per x position naming every series' value there."""
    count = len(labels)
    if count == 0 or not series or any(len(s.values) != count for s in series):
        return _empty(chart_id, title, width, height)
    clean = [(s, [_clean(v) for v in s.values]) for s in series]
    top = nice_ceiling(max(max(values) for _, values in clean))
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + (plot_w / 2 if count == 1 else plot_w * i / (count - 1))

    def y(value: float) -> float:
        return TOP + plot_h - plot_h * value / top

    parts = _open(chart_id, title, _summary(labels, clean), width, height)
    parts.append(Markup('<g class="axis" aria-hidden="true">'))
    for tick in ticks(top):
        parts.append(
            Markup(
                '<line x1="{0}" x2="{1}" y1="{2:.1f}" y2="{2:.1f}" stroke="#e3e6ec"/>'
                '<text x="{3}" y="{4:.1f}" text-anchor="end">{5}</text>'
            ).format(LEFT, width - RIGHT, y(tick), LEFT - 6, y(tick) + 4, compact(tick))
        )
    step = math.ceil(count / MAX_X_LABELS)
    for i in range(0, count, step):
        anchor = _x_anchor(i, count, x(i), labels[i], width)
        parts.append(
            Markup('<text x="{:.1f}" y="{}" text-anchor="{}">{}</text>').format(
                x(i), height - 8, anchor, labels[i]
            )
        )
    parts.append(Markup('</g><g class="legend">'))
    offset = LEFT
    for line, _ in clean:
        parts.append(
            Markup(
                '<rect x="{0}" y="8" width="12" height="12" fill="{1}"/>'
                '<text x="{2}" y="18">{3}</text>'
            ).format(offset, line.colour, offset + 16, line.name)
        )
        offset += 24 + 8 * len(line.name)
    parts.append(Markup("</g>"))
    for line, values in clean:
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        parts.append(
            Markup(
                '<polyline class="series" fill="none" stroke="{}" stroke-width="2" points="{}">'
                "<title>{}</title></polyline>"
            ).format(line.colour, points, line.name)
        )
        if count <= MAX_MARKED_POINTS:
            parts.extend(
                Markup('<circle cx="{:.1f}" cy="{:.1f}" r="2.5" fill="{}"/>').format(
                    x(i), y(v), line.colour
                )
                for i, v in enumerate(values)
            )
    parts.append(Markup('<g class="hover">'))
    band = plot_w / count
    for i, label in enumerate(labels):
        said = ", ".join(f"{line.name} {number(values[i])}" for line, values in clean)
        left = min(max(x(i) - band / 2, LEFT), width - RIGHT - band)
        parts.append(
            Markup(
                '<rect x="{:.1f}" y="{}" width="{:.1f}" height="{}" fill="#000" '
                'fill-opacity="0"><title>{}: {}</title></rect>'
            ).format(left, TOP, band, plot_h, label, said)
        )
    parts.append(Markup("</g></svg>"))
    return Markup("").join(parts)


def bar_chart(
    chart_id: str,
    title: str,
    bars: Sequence[tuple[str, float | Decimal]],
    *,
    colour: str = PALETTE[0],
    width: int = BAR_WIDTH,
) -> Markup:
    """One horizontal bar per (label, value), in the order given, scaled so that the highest
    value fills the row; long labels are shortened (the full one is in the bar's title)."""
    height = BAR_TOP + BAR_ROW * max(len(bars), 1) + 4
    if not bars:
        return _empty(chart_id, title, width, height)
    values = [_clean(v) for _, v in bars]
    labels = [label for label, _ in bars]
    top = max(values) or 1.0
    room = width - BAR_LABEL - BAR_VALUE
    described = "; ".join(f"{label} {number(v)}" for label, v in zip(labels, values, strict=True))
    parts = _open(chart_id, title, described + ".", width, height)
    for row, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = BAR_TOP + row * BAR_ROW
        length = room * value / top
        parts.append(
            Markup(
                '<g class="bar-row"><title>{0}: {1}</title>'
                '<text x="{2}" y="{3}" text-anchor="end">{4}</text>'
                '<rect x="{5}" y="{6}" width="{7:.1f}" height="{8}" fill="{9}"/>'
                '<text x="{10:.1f}" y="{3}">{1}</text></g>'
            ).format(
                label,
                number(value),
                BAR_LABEL - 8,
                y + 17,
                _short(label),
                BAR_LABEL,
                y + 4,
                length,
                BAR_ROW - 8,
                colour,
                BAR_LABEL + length + 6,
            )
        )
    parts.append(Markup("</svg>"))
    return Markup("").join(parts)
