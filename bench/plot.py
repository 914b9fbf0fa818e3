"""The benchmark's picture: one result of ``make bench`` -> one SVG of two panels.

Owns drawing the summary that ``report.summarize`` returns (``bench-results/bench.json``), and
nothing else: it runs nothing, reads no clock, and draws only figures the result holds.

* Latency by percentile: one curve per paced run, the balancer at each pipe count and rate, and
  the floor (the feed straight into the ceiling's client) in grey. Each point is a measured
  sample, the one at a quantile of ``report.QUANTILES`` (nearest rank); the x axis spaces
  1 / (1 - p) by decades, so p90, p99 and p99.9 are evenly apart; latency is on a log scale.
* Throughput: one bar per configuration of the balancer and one per baseline, the ceilings as
  lines across, and above each balancer bar its ratios as ``report`` took them (per repeat,
  then the median), not recomputed from the bars.

Plain SVG 1.1 written with ``xml.etree`` (which escapes the text): no script, no CSS, no
external font, a white background, so that GitHub's README viewer shows it as it is, in light
and dark mode alike.

    python -m bench.plot bench-results/bench.json docs/bench.svg
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 860, 850
LEFT, RIGHT = 76, 610  # the plot areas' horizontal extent; the legends sit to their right
LATENCY_TOP, LATENCY_BOTTOM = 112, 392
THROUGHPUT_TOP, THROUGHPUT_BOTTOM = 500, 750
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")  # Okabe-Ito
FLOOR_COLOR, BASELINE_COLOR, INK, GRID = "#555555", "#A0A0A0", "#222222", "#E4E4E4"
DASHES = ("", "7 4", "2 3", "10 3 2 3")  # one per paced rate
NOTE = (
    "Ratios: within each repeat, then their median. Latency: every repeat's samples pooled, "
    "one a feed frame (its last event's send time).",
    "Floor: the replay feed straight into one client that reads and discards (no balancer, no "
    "pipe, no worker).",
    "Re-render from the saved result: python -m bench.plot bench-results/bench.json bench.svg",
)
QUANTILE_TOP = 0.999  # the x axis ends at p99.9, the last of report.QUANTILES
PERCENTILE_TICKS = ((0.0, "min"), (0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9"))


@dataclass(frozen=True)
class Curve:
    """One paced run's latency distribution: (quantile, microseconds) points, measured."""

    name: str  # the run's name: "latency-4-100k", "ceiling-latency-100k" (a floor)
    label: str
    points: tuple[tuple[float, float], ...]
    color: str
    dash: str


@dataclass(frozen=True)
class Bar:
    """One throughput configuration, and its ratios as text."""

    name: str  # "ws-4", "wss-16", "baseline-4"
    label: str
    trades_per_s: float
    color: str
    tls: bool = False
    ratios: tuple[str, ...] = ()


@dataclass(frozen=True)
class Scale:
    """Maps values in [low, high] to pixels in [start, end], linearly or by logarithm."""

    low: float
    high: float
    start: float
    end: float
    log: bool = False

    def __call__(self, value: float) -> float:
        """The pixel of ``value``."""
        f = math.log10 if self.log else float
        share = (f(value) - f(self.low)) / ((f(self.high) - f(self.low)) or 1.0)
        return round(self.start + share * (self.end - self.start), 2)


def spread(fraction: float) -> float:
    """The x position of a quantile: decades of 1 / (1 - p) (p99 is 2, p99.9 is 3)."""
    return -math.log10(1.0 - fraction)


def log_ticks(low: float, high: float) -> list[float]:
    """The 1-2-5 values from the largest at or below ``low`` to the smallest at or above high."""
    values = [m * 10.0**e for e in range(math.floor(math.log10(low)) - 1, 12) for m in (1, 2, 5)]
    first = max(v for v in values if v <= low * (1 + 1e-9))
    last = min(v for v in values if v >= high * (1 - 1e-9) and v > first)
    return [v for v in values if first <= v <= last]


def linear_ticks(high: float) -> list[float]:
    """Ticks from 0 past ``high`` by a step of 1, 2 or 5 times a power of ten."""
    raw = high / 5 or 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    step = min(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    return [step * i for i in range(math.ceil(high / step * (1 + 1e-9)) + 1)]


def rate_text(rate: float) -> str:
    """100000 -> "100 k", 1000000 -> "1 M"."""
    return f"{rate / 1e6:g} M" if rate >= 1e6 else f"{rate / 1e3:g} k"


def millions(value: float) -> str:
    """Trades/s to three digits, as the bench's table: "3.82 M", "2.40 M", "70.6 k"."""
    scaled, unit = (value / 1e6, "M") if value >= 1e6 else (value / 1e3, "k")
    decimals = max(0, 2 - math.floor(math.log10(scaled))) if scaled >= 0.001 else 3
    return f"{scaled:.{decimals}f} {unit}"


def curves(summary: Mapping[str, Any]) -> list[Curve]:
    """The latency curves of the result: the balancer's by pipe count and rate, then the floors.

    A log axis has no place for a latency of 0 or less (clocks of one machine should never give
    one): such a point is left out, not moved.
    """
    runs: list[tuple[str, int | None, float, Mapping[str, Any]]] = []
    for entry in summary.get("configurations", []):
        runs.extend(
            (figures["name"], entry["pipes"], figures["rate"], figures)
            for figures in entry.get("latency", {}).values()
        )
    for name, figures in summary.get("ceiling", {}).items():
        if figures.get("rate"):
            runs.append((name, None, figures["rate"], figures))
    pipes = sorted({p for _, p, _, _ in runs if p is not None})
    rates = sorted({r for _, _, r, _ in runs})
    found = []
    for name, count, rate, figures in runs:
        points = tuple((q, us) for q, us in figures.get("percentiles_us") or () if us > 0)
        if not points:
            continue
        who = f"{count} pipes" if count is not None else "floor"
        label = f"{who}, {rate_text(rate)} trades/s ({figures['latency_samples']:,} samples)"
        color = FLOOR_COLOR if count is None else COLORS[pipes.index(count) % len(COLORS)]
        found.append(Curve(name, label, points, color, DASHES[rates.index(rate) % len(DASHES)]))
    return found


def bars(summary: Mapping[str, Any]) -> list[Bar]:
    """Each balancer configuration with its ratios, each followed by its baseline, if measured."""
    ratios = summary.get("ratios", {})
    pipes = sorted({entry["pipes"] for entry in summary.get("configurations", [])})
    found = []
    for entry in summary.get("configurations", []):
        name, count = entry["name"], entry["pipes"]
        texts = []
        if (r := ratios.get(f"{name}_over_ceiling_trades_per_s")) is not None:
            texts.append(f"{r:.2f} of the ceiling")
        if (r := ratios.get(f"{name}_over_baseline-{count}_trades_per_s")) is not None:
            texts.append(f"{r:.0f}x the baseline")
        if (r := ratios.get(f"{name}_over_ws-{count}_trades_per_s")) is not None:
            texts.append(f"{r:.2f}x ws")
        if entry.get("trades_per_s") is not None:
            tls = "wss, user-space TLS" if entry["tls"] else "ws"
            color = COLORS[pipes.index(count) % len(COLORS)]
            label = f"{count} pipes, {tls}"
            found.append(Bar(name, label, entry["trades_per_s"], color, entry["tls"], tuple(texts)))
        base = summary.get("baseline", {}).get(str(count))
        if not entry["tls"] and base and base.get("trades_per_s") is not None:
            label = f"baseline, {count} pipes"
            found.append(Bar(base["name"], label, base["trades_per_s"], BASELINE_COLOR))
    return found


def ceilings(summary: Mapping[str, Any]) -> list[tuple[str, float, str]]:
    """The read-and-discard ceilings: (label, trades/s, dash)."""
    found = []
    for name, label, dash in (("ceiling", "ws", "7 4"), ("ceiling-wss", "wss", "2 3")):
        value = summary.get("ceiling", {}).get(name, {}).get("trades_per_s")
        if value is not None:
            found.append((f"ceiling, {label} (read and discard)", value, dash))
    return found


class Canvas:
    """An SVG document being drawn: elements appended to the root or to a group of it."""

    def __init__(self) -> None:
        size = {"width": str(WIDTH), "height": str(HEIGHT), "viewBox": f"0 0 {WIDTH} {HEIGHT}"}
        self.root = ET.Element(
            "svg",
            {"xmlns": "http://www.w3.org/2000/svg", "version": "1.1", **size}
            | {"font-family": "sans-serif", "font-size": "12", "fill": INK},
        )
        self.add("rect", x=0, y=0, width=WIDTH, height=HEIGHT, fill="#FFFFFF")

    def add(self, tag: str, text: str | None = None, /, **style: object) -> ET.Element:
        """Append an element to the root; see ``add_to``."""
        return self.add_to(self.root, tag, text, **style)

    @staticmethod
    def add_to(
        parent: ET.Element, tag: str, text: str | None = None, /, **style: object
    ) -> ET.Element:
        """Append an element; in attribute names, "_" becomes "-" ("class_" is "class")."""
        names = {k.rstrip("_").replace("_", "-"): str(v) for k, v in style.items()}
        element = ET.SubElement(parent, tag, names)
        element.text = text
        return element

    def text(self, x: float, y: float, content: str, /, **style: object) -> ET.Element:
        """A text whose baseline starts at (x, y), or is centred there (``text_anchor``)."""
        return self.add("text", content, x=round(x, 2), y=round(y, 2), **style)

    def line(self, x1: float, y1: float, x2: float, y2: float, /, **style: object) -> None:
        """A straight line, in ink unless ``stroke`` says otherwise."""
        self.add("line", x1=x1, y1=y1, x2=x2, y2=y2, **({"stroke": INK} | style))

    def to_string(self) -> str:
        """The document, with its XML declaration."""
        return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(self.root, "unicode")


def draw_frame(canvas: Canvas, top: float, bottom: float, title: str, y_title: str) -> None:
    """The plot area's box, the panel's title and the y axis's title."""
    canvas.text(LEFT, top - 14, title, font_size=14, font_weight="bold")
    box = {"width": RIGHT - LEFT, "height": bottom - top, "fill": "none", "stroke": INK}
    canvas.add("rect", x=LEFT, y=top, class_="plot-area", **box)
    middle = (top + bottom) / 2
    canvas.text(18, middle, y_title, text_anchor="middle", transform=f"rotate(-90 18 {middle})")


def draw_legend(canvas: Canvas, top: float, entries: Sequence[tuple[str, str, str, bool]]) -> None:
    """Legend entries (label, color, dash, drawn as a bar) from ``top``, right of the plots."""
    for index, (label, color, dash, bar) in enumerate(entries):
        y = top + 10 + index * 34
        if bar:
            canvas.add("rect", x=RIGHT + 16, y=y - 6, width=22, height=12, fill=color)
        else:
            style = {"stroke": color, "stroke_width": 2, "stroke_dasharray": dash or "none"}
            canvas.line(RIGHT + 16, y, RIGHT + 38, y, **style)
        first, _, rest = label.partition(" (")
        canvas.text(RIGHT + 44, y + 4, first)
        if rest:
            canvas.text(RIGHT + 44, y + 18, "(" + rest, font_size=11)


def draw_latency(canvas: Canvas, found: Sequence[Curve]) -> None:
    """The latency panel: a polyline a curve, on a log scale of microseconds."""
    title = "Latency by percentile, paced: replay send → worker receive"
    draw_frame(canvas, LATENCY_TOP, LATENCY_BOTTOM, title, "latency (µs, log scale)")
    axis = "percentile (the axis spaces 1 / (1 - p) by decades: p90, p99, p99.9 evenly)"
    canvas.text((LEFT + RIGHT) / 2, LATENCY_BOTTOM + 36, axis, text_anchor="middle")
    if not found:
        canvas.text(LEFT + 12, LATENCY_TOP + 24, "no paced runs in this result")
        return
    values = [us for curve in found for _, us in curve.points]
    ticks = log_ticks(min(values), max(values))
    x = Scale(0.0, spread(QUANTILE_TOP), LEFT, RIGHT)
    y = Scale(ticks[0], ticks[-1], LATENCY_BOTTOM, LATENCY_TOP, log=True)
    for value in ticks:  # over four decades, only the powers of ten are labelled
        canvas.line(LEFT, y(value), RIGHT, y(value), stroke=GRID)
        if len(ticks) <= 13 or math.log10(value).is_integer():
            label = f"{value:,.0f}" if value >= 1 else f"{value:g}"
            canvas.text(LEFT - 6, y(value) + 4, label, text_anchor="end")
    for fraction, label in PERCENTILE_TICKS:
        at = x(spread(fraction))
        canvas.line(at, LATENCY_TOP, at, LATENCY_BOTTOM, stroke=GRID)
        canvas.text(at, LATENCY_BOTTOM + 16, label, text_anchor="middle")
    for curve in found:
        series = canvas.add("g", class_="series", id=curve.name)
        canvas.add_to(series, "title", curve.label)
        points = " ".join(f"{x(spread(min(q, QUANTILE_TOP)))},{y(us)}" for q, us in curve.points)
        style = {"stroke": curve.color, "stroke_width": 2, "stroke_dasharray": curve.dash or "none"}
        canvas.add_to(series, "polyline", points=points, fill="none", **style)
    draw_legend(canvas, LATENCY_TOP, [(c.label, c.color, c.dash, False) for c in found])


def draw_throughput(
    canvas: Canvas, found: Sequence[Bar], bounds: Sequence[tuple[str, float, str]]
) -> None:
    """The throughput panel: a bar a configuration, the ceilings as lines across."""
    title = "Throughput, as fast as the socket takes it, every pipe verified"
    draw_frame(canvas, THROUGHPUT_TOP, THROUGHPUT_BOTTOM, title, "trades/s (millions)")
    if not found:
        canvas.text(LEFT + 12, THROUGHPUT_TOP + 24, "no throughput runs in this result")
        return
    ticks = linear_ticks(max([b.trades_per_s for b in found] + [v for _, v, _ in bounds]) * 1.08)
    y = Scale(0.0, ticks[-1], THROUGHPUT_BOTTOM, THROUGHPUT_TOP)
    for value in ticks:
        canvas.line(LEFT, y(value), RIGHT, y(value), stroke=GRID)
        canvas.text(LEFT - 6, y(value) + 4, f"{value / 1e6:g}", text_anchor="end")
    slot = (RIGHT - LEFT) / len(found)
    for index, bar in enumerate(found):
        left, top = LEFT + (index + 0.2) * slot, y(bar.trades_per_s)
        center = left + slot * 0.3
        series = canvas.add("g", class_="series", id=bar.name)
        canvas.add_to(series, "title", f"{bar.label}: {millions(bar.trades_per_s)} trades/s")
        size = {"width": round(slot * 0.6, 2), "height": round(THROUGHPUT_BOTTOM - top, 2)}
        opacity = 0.55 if bar.tls else 1
        canvas.add_to(series, "rect", x=round(left, 2), y=top, fill=bar.color, **size,
                      fill_opacity=opacity)  # fmt: skip
        figure = millions(bar.trades_per_s)
        canvas.text(center, top - 5, figure, text_anchor="middle", font_weight="bold")
        for row, text in enumerate(bar.ratios):
            canvas.text(center, top - 20 - 14 * row, text, text_anchor="middle", class_="ratio")
        for row, word in enumerate(bar.label.split(", ", 1)):
            canvas.text(center, THROUGHPUT_BOTTOM + 16 + 14 * row, word, text_anchor="middle")
    legend = []
    for label, value, dash in bounds:
        canvas.line(LEFT, y(value), RIGHT, y(value), stroke_width=1.5, stroke_dasharray=dash)
        figure = millions(value)
        canvas.text(RIGHT - 4, y(value) - 5, figure, text_anchor="end", font_weight="bold")
        legend.append((label, INK, dash, False))
    for color in dict.fromkeys(b.color for b in found):
        kind = next(b for b in found if b.color == color)
        what = f"tradebalancer run, {kind.label.split(',')[0]}"
        if color == BASELINE_COLOR:
            what = "baseline (asyncio, json, a write a trade)"
        legend.append((what, color, "", True))
    draw_legend(canvas, THROUGHPUT_TOP, legend)


def title(summary: Mapping[str, Any]) -> tuple[str, str]:
    """The two title lines: which run, and on what machine under what load."""
    machine = summary.get("machine", {})
    quick = " --quick" if summary.get("quick") else ""
    first = (
        f"tradebalancer {summary.get('version', '?')}, make bench{quick}, "
        f"{summary.get('date', 'date not recorded')}, commit {summary.get('commit') or '?'}"
    )

    def share(key: str) -> str:
        value = machine.get(key)
        return f"{value * 100:.0f}%" if isinstance(value, float) and not math.isnan(value) else "?"

    repeats = summary.get("repeat", "?")
    second = (
        f"{machine.get('cpus', '?')} CPUs, Linux {machine.get('kernel', '?')}, Python "
        f"{machine.get('python', '?')}; load {machine.get('loadavg_start', '?')} at start, "
        f"other work {share('other_cpu_share')} and steal {share('steal_share')} of the CPUs; "
        f"{repeats} repeat{'' if repeats == 1 else 's'}, medians"
    )
    return first, second


def render(summary: Mapping[str, Any]) -> str:
    """The SVG of a result, as text."""
    canvas = Canvas()
    first, second = title(summary)
    canvas.text(20, 28, first, font_size=15, font_weight="bold")
    canvas.text(20, 48, second)
    draw_latency(canvas, curves(summary))
    draw_throughput(canvas, bars(summary), ceilings(summary))
    for row, line in enumerate(NOTE):
        canvas.text(20, HEIGHT - 44 + 15 * row, line, font_size=11)
    return canvas.to_string()


def main(argv: Sequence[str] | None = None) -> int:
    """Render a saved result without running the benchmark again."""
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument("results", help="bench.json, as make bench writes it")
    parser.add_argument("svg", help="the picture to write")
    args = parser.parse_args(argv)
    summary = json.loads(Path(args.results).read_text())
    Path(args.svg).write_text(render(summary), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
