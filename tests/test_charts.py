"""The console's SVG charts, without a server: well-formed SVG, every text escaped, empty data
drawn as such, and values placed on the right scale."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from decimal import Decimal

import jinja2
import pytest
from markupsafe import Markup

from admin.console import charts
from admin.console.charts import Series, bar_chart, line_chart, nice_ceiling, number, ticks

SVG = "{http://www.w3.org/2000/svg}"
EVIL = "<script>alert(1)</script> & \"quoted\" 'single'"


def parse(markup: Markup | str) -> ET.Element:
    """An SVG this project drew, parsed to prove it well-formed (not untrusted input)."""
    root = ET.fromstring(str(markup))  # noqa: S314
    assert root.tag == f"{SVG}svg"
    return root


def texts(root: ET.Element, tag: str) -> list[str]:
    return [el.text or "" for el in root.iter(f"{SVG}{tag}")]


def line_points(root: ET.Element) -> list[list[tuple[float, float]]]:
    return [
        [(float(x), float(y)) for x, y in (p.split(",") for p in line.attrib["points"].split())]
        for line in root.iter(f"{SVG}polyline")
    ]


def test_a_line_chart_is_valid_svg_with_title_description_and_labels() -> None:
    chart = line_chart(
        "c1",
        "Requests per hour",
        ["10:00", "11:00", "12:00"],
        [Series("requests", [3, 7, 1]), Series("errors", [0, 2, 0], charts.PALETTE[1])],
    )
    root = parse(chart)
    assert root.attrib["role"] == "img"
    assert root.attrib["aria-labelledby"] == "c1-title c1-desc"
    assert root.find(f"{SVG}title") is not None
    assert root.find(f"{SVG}title").attrib["id"] == "c1-title"  # type: ignore[union-attr]
    assert texts(root, "title")[0] == "Requests per hour"
    [desc] = texts(root, "desc")
    assert "requests: total 11, highest 7 at 11:00" in desc
    assert "errors: total 2, highest 2 at 11:00" in desc
    assert len(line_points(root)) == 2
    # One hover title per x position, naming every series' value there.
    hovers = [t for t in texts(root, "title") if t.startswith("1")]
    assert hovers == ["10:00: requests 3, errors 0", "11:00: requests 7, errors 2",
                      "12:00: requests 1, errors 0"]  # fmt: skip


def test_every_text_is_escaped() -> None:
    chart = line_chart(EVIL, EVIL, [EVIL, "b"], [Series(EVIL, [1, 2], colour='x" onload="y')])
    bars = bar_chart(EVIL, EVIL, [(EVIL, 1), ("plain", 2)], colour='"><script>')
    for markup in (chart, bars):
        assert "<script>" not in markup
        assert "&lt;script&gt;" in markup
        root = parse(markup)  # well-formed: nothing broke out of a text or attribute
        assert EVIL in texts(root, "title")
        assert all("onload" not in attr for el in root.iter() for attr in el.attrib)
    colours = {el.attrib.get("stroke") for el in parse(chart).iter(f"{SVG}polyline")}
    assert colours == {'x" onload="y'}  # a value, never an attribute of its own


def test_charts_are_markup_a_template_includes_unescaped_once() -> None:
    chart = bar_chart("b", "t", [("<k>", 1)])
    assert isinstance(chart, Markup)
    env = jinja2.Environment(autoescape=True)
    assert env.from_string("{{ c }}").render(c=chart) == str(chart)


@pytest.mark.parametrize(
    "chart",
    [
        line_chart("e", "Empty", [], []),
        line_chart("e", "No series", ["a", "b"], []),
        line_chart("e", "Mismatched", ["a", "b"], [Series("s", [1])]),
        bar_chart("e", "Empty", []),
    ],
)
def test_no_data_is_said_not_drawn(chart: Markup) -> None:
    root = parse(chart)
    assert texts(root, "desc") == ["No data for this period."]
    assert "No data for this period" in texts(root, "text")
    assert not list(root.iter(f"{SVG}polyline"))
    assert not list(root.iter(f"{SVG}rect"))


def test_all_zero_and_single_point_series_are_drawn_on_the_baseline() -> None:
    root = parse(line_chart("z", "Zero", ["a", "b", "c"], [Series("s", [0, 0, 0])]))
    [points] = line_points(root)
    bottom = charts.LINE_HEIGHT - charts.BOTTOM
    assert {y for _, y in points} == {bottom}
    root = parse(line_chart("one", "One", ["only"], [Series("s", [4])]))
    circles = list(root.iter(f"{SVG}circle"))
    assert len(circles) == 1
    middle = charts.LEFT + (charts.LINE_WIDTH - charts.LEFT - charts.RIGHT) / 2
    assert float(circles[0].attrib["cx"]) == pytest.approx(middle)


def test_values_are_placed_on_the_scale() -> None:
    # 0..8 goes on a scale of 0..10: 5 sits half way up, 10 would touch the top.
    root = parse(line_chart("s", "Scale", ["a", "b", "c"], [Series("s", [0, 5, 8])]))
    [points] = line_points(root)
    top, bottom = charts.TOP, charts.LINE_HEIGHT - charts.BOTTOM
    left, right = charts.LEFT, charts.LINE_WIDTH - charts.RIGHT
    assert [x for x, _ in points] == [left, (left + right) / 2, right]
    assert points[0][1] == bottom
    assert points[1][1] == pytest.approx((top + bottom) / 2, abs=0.1)
    assert points[2][1] == pytest.approx(bottom - 0.8 * (bottom - top), abs=0.1)
    # The y ticks read as round numbers, up to the scale's top.
    tick_labels = [t for t in texts(root, "text") if t.replace(",", "").isdigit()]
    assert tick_labels[:6] == ["0", "2", "4", "6", "8", "10"]


def test_bars_are_scaled_to_the_highest() -> None:
    root = parse(bar_chart("b", "Cost", [("a", Decimal("2")), ("b", Decimal("0.5")), ("c", 0)]))
    widths = [float(r.attrib["width"]) for r in root.iter(f"{SVG}rect")]
    room = charts.BAR_WIDTH - charts.BAR_LABEL - charts.BAR_VALUE
    assert widths == [room, pytest.approx(room / 4), 0.0]
    assert int(root.attrib["height"]) == charts.BAR_TOP + 3 * charts.BAR_ROW + 4
    assert texts(root, "title")[1:] == ["a: 2", "b: 0.5", "c: 0"]


def test_long_labels_are_shortened_with_the_full_one_in_the_title() -> None:
    name = "a-very-long-key-name-for-the-billing-team"
    root = parse(bar_chart("b", "Keys", [(name, 1)]))
    label = next(t for t in texts(root, "text") if t.startswith("a-very"))
    assert label.endswith("…")
    assert len(label) == charts.LABEL_CHARS
    assert f"{name}: 1" in texts(root, "title")


def test_unusable_values_are_drawn_as_zero() -> None:
    root = parse(bar_chart("b", "Odd", [("nan", math.nan), ("neg", -3), ("inf", math.inf),
                                        ("one", 1)]))  # fmt: skip
    widths = [float(r.attrib["width"]) for r in root.iter(f"{SVG}rect")]
    assert widths[:3] == [0.0, 0.0, 0.0]
    assert widths[3] > 0


@pytest.mark.parametrize(
    ("value", "ceiling"),
    [(0, 1), (-5, 1), (math.nan, 1), (1, 1), (1.2, 2), (2, 2), (2.2, 2.5), (3, 5), (7, 10),
     (10, 10), (11, 20), (120, 200), (0.0012, 0.002), (999, 1000)],
)  # fmt: skip
def test_nice_ceiling(value: float, ceiling: float) -> None:
    assert nice_ceiling(value) == pytest.approx(ceiling)


def test_ticks_are_round() -> None:
    assert ticks(10) == [0, 2, 4, 6, 8, 10]
    assert ticks(2) == [0, 0.5, 1, 1.5, 2]
    assert ticks(25) == [0, 5, 10, 15, 20, 25]
    assert ticks(50) == [0, 10, 20, 30, 40, 50]
    assert ticks(0.002) == pytest.approx([0, 0.0005, 0.001, 0.0015, 0.002])


def test_numbers_as_labels() -> None:
    assert number(1234) == "1,234"
    assert number(2.0) == "2"
    assert number(Decimal("0.0012")) == "0.0012"
    assert number(2.5) == "2.5"
    assert number(1 / 3) == "0.3333"
    assert number(math.inf) == "0"


def x_label_extent(text: ET.Element) -> tuple[float, float]:
    """Where an x label's text runs from and to, estimated as the chart does."""
    at = float(text.attrib["x"])
    width = len(text.text or "") * charts.CHAR_WIDTH
    start = {"start": at, "middle": at - width / 2, "end": at - width}[text.attrib["text-anchor"]]
    return start, start + width


@pytest.mark.parametrize("count", [1, 2, 7, 24, 30, 31, 60, 168])
@pytest.mark.parametrize("label", ["Nov 26", "Tue 13:00", "a much longer label, say"])
def test_x_labels_stay_inside_the_chart(count: int, label: str) -> None:
    labels = [label] * count
    root = parse(line_chart("c", "t", labels, [Series("requests", list(range(count)))]))
    width = float(root.attrib["viewBox"].split()[2])
    axis = next(g for g in root.iter(f"{SVG}g") if g.attrib.get("class") == "axis")
    x_labels = [t for t in axis.iter(f"{SVG}text") if t.text == label]
    assert x_labels
    for text in x_labels:
        start, end = x_label_extent(text)
        assert start >= 0, (count, text.attrib)
        assert end <= width, (count, text.attrib)


def test_the_last_point_s_label_ends_at_the_right_edge() -> None:
    # 31 days: labels every 6th day, the last one on the last point (the chart's right edge).
    labels = [f"Nov {day:02d}" for day in range(1, 32)]
    root = parse(line_chart("c", "t", labels, [Series("requests", [1] * 31)]))
    anchors = {t.text: t.attrib.get("text-anchor") for t in root.iter(f"{SVG}text")}
    assert anchors["Nov 01"] == "start"
    assert anchors["Nov 13"] == "middle"
    assert anchors["Nov 31"] == "end"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (0, "0"),
        (950, "950"),
        (9500, "9,500"),
        (25_000, "25k"),
        (2_500_000, "2.5M"),
        (1_200_000_000, "1.2B"),
        (0.25, "0.25"),
    ],
)
def test_axis_ticks_are_compact(value: float, shown: str) -> None:
    assert charts.compact(value) == shown


def test_tick_labels_of_large_values_fit_left_of_the_plot() -> None:
    svg = line_chart("big", "Big", ["a", "b"], [Series("requests", [0, 2_400_000])])
    ticks_shown = [t for t in texts(parse(svg), "text") if t and t[0].isdigit()]
    assert "2.5M" in ticks_shown or "3M" in ticks_shown, ticks_shown
    assert all(len(t) <= 6 for t in ticks_shown), ticks_shown
