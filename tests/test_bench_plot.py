"""bench/plot.py: a result of make bench drawn as SVG, checked by parsing the SVG it writes.

The results are built by hand in the shape ``bench/report.py`` gives them (no benchmark runs
here). bench/ is no package of the project: its plot module is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_plot", REPO / "bench" / "plot.py")
assert _spec is not None and _spec.loader is not None
plot = importlib.util.module_from_spec(_spec)
sys.modules["bench_plot"] = plot  # dataclasses look their module up
_spec.loader.exec_module(plot)

SVG = "{http://www.w3.org/2000/svg}"
QUANTILES = (0.0, 0.5, 0.9, 0.99, 0.999)


def paced(name: str, rate: float, latencies: list[float]) -> dict[str, Any]:
    """A paced run's figures: its percentile curve from the given latencies (us, ascending)."""
    return {
        "name": name,
        "rate": rate,
        "latency_samples": 1000,
        "percentiles_us": [[q, us] for q, us in zip(QUANTILES, latencies, strict=True)],
    }


def result(
    latency: float = 100.0, throughput: float = 3.8e6, ceiling: float = 18.7e6
) -> dict[str, Any]:
    """A result of two pipe counts, wss, two rates, the floors, the baseline and the ceiling."""
    curve = [latency * f for f in (0.5, 1, 2, 4, 8)]
    configurations = [
        {
            "name": f"ws-{pipes}",
            "pipes": pipes,
            "tls": False,
            "trades_per_s": throughput / (1 + pipes / 100),
            "latency": {
                label: paced(f"latency-{pipes}-{label}", rate, [v * pipes for v in curve])
                for label, rate in (("100k", 1e5), ("1M", 1e6))
            },
        }
        for pipes in (4, 16)
    ]
    configurations.append(
        {"name": "wss-16", "pipes": 16, "tls": True, "trades_per_s": throughput, "latency": {}}
    )
    return {
        "configurations": configurations,
        "ratios": {
            "ws-4_over_baseline-4_trades_per_s": 31.44,
            "ws-4_over_ceiling_trades_per_s": 0.2049,
            "ws-16_over_baseline-16_trades_per_s": 34.6,
            "ws-16_over_ceiling_trades_per_s": 0.1872,
            "wss-16_over_ws-16_trades_per_s": 0.9413,
        },
        "baseline": {
            str(pipes): {"name": f"baseline-{pipes}", "trades_per_s": throughput / 30}
            for pipes in (4, 16)
        },
        "ceiling": {
            "ceiling": {"name": "ceiling", "rate": None, "trades_per_s": ceiling},
            "ceiling-wss": {"name": "ceiling-wss", "rate": None, "trades_per_s": ceiling / 2},
            "ceiling-latency-100k": paced("ceiling-latency-100k", 1e5, curve),
            "ceiling-latency-1M": paced("ceiling-latency-1M", 1e6, curve),
        },
        "machine": {"cpus": 2, "kernel": "6.1.0", "python": "3.11.2", "loadavg_start": 0.5},
        "repeat": 3,
        "version": "0.1.0",
        "date": "2026-12-06 11:00 UTC",
        "commit": "4f7ba61",
    }


def draw(summary: dict[str, Any]) -> ET.Element:
    """The parsed SVG of a result."""
    return ET.fromstring(plot.render(summary))


def texts(svg: ET.Element, cls: str | None = None) -> list[str]:
    """Every text of the SVG, or those of one class."""
    return [t.text or "" for t in svg.iter(f"{SVG}text") if cls is None or t.get("class") == cls]


def test_the_picture_is_plain_svg_1_1() -> None:
    """The SVG parses as XML, is SVG 1.1 in its namespace, generic fonts, no script, no link."""
    text = plot.render(result())
    svg = ET.fromstring(text)
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    assert svg.tag == f"{SVG}svg" and svg.get("version") == "1.1"
    assert svg.get("font-family") == "sans-serif"
    assert {element.tag for element in svg.iter()} <= {
        f"{SVG}{tag}" for tag in ("svg", "g", "rect", "line", "polyline", "text", "title")
    }
    assert "href" not in text and "<script" not in text and "style=" not in text


def test_one_series_per_configuration_of_the_result() -> None:
    """Each paced run is a curve and each throughput run a bar, named after the run."""
    svg = draw(result())
    series = {g.get("id"): g for g in svg.iter(f"{SVG}g") if g.get("class") == "series"}
    curves = {f"latency-{p}-{r}" for p in (4, 16) for r in ("100k", "1M")}
    floors = {"ceiling-latency-100k", "ceiling-latency-1M"}
    bars = {"ws-4", "ws-16", "wss-16", "baseline-4", "baseline-16"}
    assert set(series) == curves | floors | bars
    for name in curves | floors:
        assert series[name].find(f"{SVG}polyline") is not None
    for name in bars:
        assert series[name].find(f"{SVG}rect") is not None


def test_the_floors_are_drawn_apart_from_the_balancer() -> None:
    """The floor curves have their own colour, and each rate its own dash, in the legend too."""
    found = {curve.name: curve for curve in plot.curves(result())}
    floor, ours = found["ceiling-latency-100k"], found["latency-4-100k"]
    assert floor.color == plot.FLOOR_COLOR != ours.color
    assert floor.dash == ours.dash != found["latency-4-1M"].dash
    assert "floor, 100 k trades/s (1,000 samples)" in {c.label for c in found.values()}


def test_the_axes_and_the_title_say_their_units_and_the_run() -> None:
    """The axis titles carry units; the title the version, date, commit and machine."""
    written = texts(draw(result()))
    assert "latency (µs, log scale)" in written
    assert "trades/s (millions)" in written
    assert any(t.startswith("percentile") for t in written)
    assert {"min", "p50", "p90", "p99", "p99.9"} <= set(written)
    title = " ".join(written[:2])
    for fact in ("0.1.0", "2026-12-06 11:00 UTC", "4f7ba61", "2 CPUs", "Linux 6.1.0", "3 repeats"):
        assert fact in title


def test_the_ratios_written_are_the_results_ratios() -> None:
    """Each ratio label is the result's ratio, rounded, not one recomputed from the bars."""
    summary = result()
    ratios = {key.removesuffix("_trades_per_s"): v for key, v in summary["ratios"].items()}
    assert sorted(texts(draw(summary), "ratio")) == sorted(
        [
            f"{ratios['ws-4_over_ceiling']:.2f} of the ceiling",  # 0.20
            f"{ratios['ws-16_over_ceiling']:.2f} of the ceiling",  # 0.19
            f"{ratios['ws-4_over_baseline-4']:.0f}x the baseline",  # 31
            f"{ratios['ws-16_over_baseline-16']:.0f}x the baseline",  # 35
            f"{ratios['wss-16_over_ws-16']:.2f}x ws",  # 0.94
        ]
    )


def test_the_bar_and_ceiling_figures_are_the_results() -> None:
    """Each bar's figure and each ceiling's is the result's trades/s to three digits."""
    summary = result(throughput=3.82e6, ceiling=18.7e6)
    written = texts(draw(summary))
    for value in (3.82e6 / 1.04, 3.82e6 / 1.16, 3.82e6, 3.82e6 / 30, 18.7e6, 9.35e6):
        assert plot.millions(value) in written
    assert [plot.millions(v) for v in (3.82e6, 2.4e6, 12.55e6, 127_333, 70_600, 950)] == [
        "3.82 M",
        "2.40 M",
        "12.6 M",
        "127 k",
        "70.6 k",
        "0.950 k",
    ]


def test_each_curve_is_the_measured_points_and_nothing_else() -> None:
    """A curve has one vertex per percentile of its run, its latency mapped back exactly."""
    summary = result(latency=37.0)
    svg = draw(summary)
    area = plot_areas(svg)[0]
    line = next(g for g in svg.iter(f"{SVG}g") if g.get("id") == "latency-4-1M")
    polyline = line.find(f"{SVG}polyline")
    assert polyline is not None
    ys = [float(point.split(",")[1]) for point in polyline.get("points", "").split()]
    expected = [us for _, us in summary["configurations"][0]["latency"]["1M"]["percentiles_us"]]
    assert len(ys) == len(expected)
    # The highest and lowest of all curves sit inside the axis's 1-2-5 bounds: invert the scale.
    ticks = plot.log_ticks(37.0 * 0.5, 37.0 * 8 * 16)
    for y, us in zip(ys, expected, strict=True):
        share = (area[1] + area[3] - y) / area[3]
        back = 10 ** (math.log10(ticks[0]) + share * math.log10(ticks[-1] / ticks[0]))
        assert math.isclose(back, us, rel_tol=1e-3)


def plot_areas(svg: ET.Element) -> list[tuple[float, float, float, float]]:
    """The plot areas' (x, y, width, height), latency first."""
    return [
        tuple(float(r.get(k, "nan")) for k in ("x", "y", "width", "height"))  # type: ignore[misc]
        for r in svg.iter(f"{SVG}rect")
        if r.get("class") == "plot-area"
    ]


def inside(x: float, y: float, area: tuple[float, float, float, float]) -> bool:
    """Whether (x, y) is in the area, edges included (to a hundredth of a pixel)."""
    left, top, width, height = area
    return left - 0.01 <= x <= left + width + 0.01 and top - 0.01 <= y <= top + height + 0.01


@settings(max_examples=60, deadline=None)
@given(
    latency=st.floats(min_value=0.001, max_value=1e6),
    throughput=st.floats(min_value=1.0, max_value=1e9),
    ceiling=st.floats(min_value=1.0, max_value=1e9),
)
def test_every_point_and_bar_lies_inside_its_plot_area(
    latency: float, throughput: float, ceiling: float
) -> None:
    """Whatever the figures, each curve's vertices and each bar stay inside their panel."""
    svg = draw(result(latency, throughput, ceiling))
    latency_area, throughput_area = plot_areas(svg)
    for polyline in svg.iter(f"{SVG}polyline"):
        for point in polyline.get("points", "").split():
            x, y = map(float, point.split(","))
            assert inside(x, y, latency_area), (point, latency_area)
    bars = [g.find(f"{SVG}rect") for g in svg.iter(f"{SVG}g") if g.get("class") == "series"]
    for bar in filter(None, bars):
        x, y = float(bar.get("x", "nan")), float(bar.get("y", "nan"))
        width, height = float(bar.get("width", "nan")), float(bar.get("height", "nan"))
        assert height >= 0
        assert inside(x, y, throughput_area) and inside(x + width, y + height, throughput_area)


def test_a_result_without_paced_runs_says_so() -> None:
    """Runs left out (--no-latency, --no-baseline) leave their place empty, said in words."""
    summary = result()
    for entry in summary["configurations"]:
        entry["latency"] = {}
    summary["ceiling"] = {}
    summary["baseline"] = {}
    summary["ratios"] = {"wss-16_over_ws-16_trades_per_s": 0.9413}  # as the bench leaves it
    svg = draw(summary)
    assert "no paced runs in this result" in texts(svg)
    assert not list(svg.iter(f"{SVG}polyline"))
    assert texts(svg, "ratio") == ["0.94x ws"]
    assert {g.get("id") for g in svg.iter(f"{SVG}g")} == {"ws-4", "ws-16", "wss-16"}


def test_a_saved_result_is_drawn_again_from_its_file(tmp_path: Path) -> None:
    """python -m bench.plot RESULT SVG writes the same picture as the bench did."""
    summary = result()
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(summary))
    assert plot.main([str(saved), str(tmp_path / "bench.svg")]) == 0
    assert (tmp_path / "bench.svg").read_text(encoding="utf-8") == plot.render(summary)
