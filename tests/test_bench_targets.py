"""bench/targets.py: issue 15's targets judged against results built by hand (nothing timed).

The results have the shape ``bench/report.py`` gives them. bench/ is no package of the project:
its targets module is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_targets", REPO / "bench" / "targets.py")
assert _spec is not None and _spec.loader is not None
targets = importlib.util.module_from_spec(_spec)
sys.modules["bench_targets"] = targets  # dataclasses look their module up
_spec.loader.exec_module(targets)

EVERYTHING = targets.Options(pipes=(4, 16), rates=(100_000.0, 1_000_000.0))


def summary(
    cpu16: float = 60.0,
    share16: float = 0.4,
    cpu4_paced: float = 250.0,
    p50: float = 40.0,
    p99: float = 300.0,
    floor_p50: float = 30.0,
    floor_p99: float = 200.0,
    rss: float = 70e6,
    verified: bool = True,
) -> dict[str, Any]:
    """A result of ws-4 and ws-16, paced runs at 100 k and 1 M, the ceiling and its floors."""
    ceiling = 20e6

    def paced(pipes: int, label: str, rate: float) -> dict[str, Any]:
        own = pipes == 4 and label == "100k"
        return {
            "name": f"latency-{pipes}-{label}",
            "rate": rate,
            "p50_us": p50 if own else 999.0,
            "p99_us": p99 if own else 9999.0,
            "balancer_cpu_ns_per_trade": cpu4_paced if own else 999.0,
            "peak_rss_bytes": 40e6,
            "verified": verified,
        }

    configurations = [
        {
            "name": f"ws-{pipes}",
            "pipes": pipes,
            "tls": False,
            "trades_per_s": share16 * ceiling if pipes == 16 else 4e6,
            "balancer_cpu_ns_per_trade": cpu16 if pipes == 16 else 999.0,
            "peak_rss_bytes": rss if pipes == 16 else 50e6,
            "verified": verified,
            "latency": {
                label: paced(pipes, label, rate) for label, rate in (("100k", 1e5), ("1M", 1e6))
            },
        }
        for pipes in (4, 16)
    ]
    return {
        "configurations": configurations,
        "ceiling_trades_per_s": ceiling,
        "ratios": {"ws-16_over_ceiling_trades_per_s": share16},
        "ceiling": {
            "ceiling": {"name": "ceiling", "trades_per_s": ceiling},
            "ceiling-latency-100k": {
                "name": "ceiling-latency-100k",
                "p50_us": floor_p50,
                "p99_us": floor_p99,
            },
        },
    }


def by_key(rows: list[Any]) -> dict[str, Any]:
    """The rows by their key."""
    return {row.key: row for row in rows}


def test_every_target_of_the_issue_is_listed_in_its_order() -> None:
    """The table has the issue's five targets, latency as p50 and p99, in the issue's order."""
    rows = targets.evaluate(summary(), EVERYTHING)
    assert [row.key for row in rows] == [
        "cpu-16",
        "throughput-16",
        "cpu-4-100k",
        "latency-p50-4-100k",
        "latency-p99-4-100k",
        "rss",
    ]


def test_a_run_within_every_target_meets_them_all() -> None:
    """Figures inside every bound are all met, each ratio taken as the issue defines it."""
    rows = by_key(targets.evaluate(summary(), EVERYTHING))
    assert {row.status for row in rows.values()} == {"met"}
    assert rows["cpu-16"].ratio == pytest.approx(60 / 80)
    assert rows["throughput-16"].ratio == pytest.approx(0.4)
    assert rows["throughput-16"].figure == pytest.approx(8.0)  # M trades/s
    assert rows["throughput-16"].reference == pytest.approx(20.0)
    assert rows["cpu-4-100k"].ratio == pytest.approx(250 / 300)
    assert rows["latency-p50-4-100k"].ratio == pytest.approx(40 / 30)
    assert rows["latency-p99-4-100k"].ratio == pytest.approx(300 / 200)
    assert rows["rss"].figure == pytest.approx(70.0)
    assert rows["rss"].ratio == pytest.approx(0.7)


def test_todays_figures_miss_the_targets_the_issue_says_they_miss() -> None:
    """The issue's figures of today are not met, RSS is; each ratio says by how much."""
    today = summary(
        cpu16=246, share16=0.19, cpu4_paced=613, p50=257, p99=681, floor_p50=29, floor_p99=201
    )
    rows = by_key(targets.evaluate(today, EVERYTHING))
    assert {key for key, row in rows.items() if row.status == "NOT met"} == {
        "cpu-16",
        "throughput-16",
        "cpu-4-100k",
        "latency-p50-4-100k",
        "latency-p99-4-100k",
    }
    assert rows["rss"].status == "met"
    assert rows["latency-p50-4-100k"].ratio == pytest.approx(257 / 29)


@pytest.mark.parametrize(
    ("changes", "key", "met"),
    [
        ({"cpu16": 80.0}, "cpu-16", True),
        ({"cpu16": 80.1}, "cpu-16", False),
        ({"share16": 0.35}, "throughput-16", True),
        ({"share16": 0.349}, "throughput-16", False),
        ({"cpu4_paced": 300.0}, "cpu-4-100k", True),
        ({"p50": 45.0}, "latency-p50-4-100k", True),
        ({"p50": 45.1}, "latency-p50-4-100k", False),
        ({"p99": 400.0}, "latency-p99-4-100k", True),
        ({"p99": 401.0}, "latency-p99-4-100k", False),
        ({"rss": 99.9e6}, "rss", True),
        ({"rss": 100e6}, "rss", False),
    ],
)
def test_each_bound_is_inclusive_as_the_issue_writes_it(
    changes: dict[str, float], key: str, met: bool
) -> None:
    """<= and >= bounds are met at the bound itself, RSS's "under 100 MB" is not."""
    rows = by_key(targets.evaluate(summary(**changes), EVERYTHING))
    assert rows[key].status == ("met" if met else "NOT met")


def test_the_throughput_ratio_is_the_one_taken_within_each_repeat() -> None:
    """With repeats, the ratio is report's median of per-repeat ratios, not medians divided."""
    result = summary(share16=0.4)
    result["ratios"]["ws-16_over_ceiling_trades_per_s"] = 0.33
    rows = by_key(targets.evaluate(result, EVERYTHING))
    assert rows["throughput-16"].ratio == pytest.approx(0.33)
    assert rows["throughput-16"].status == "NOT met"


@pytest.mark.parametrize(
    ("options", "skipped"),
    [
        (
            targets.Options(pipes=(4, 16), rates=(1e5,), latency=False),
            {
                "cpu-4-100k": "--no-latency",
                "latency-p50-4-100k": "--no-latency",
                "latency-p99-4-100k": "--no-latency",
            },
        ),
        (
            targets.Options(pipes=(4, 16), rates=(1e5,), ceiling=False),
            {
                "throughput-16": "--no-ceiling",
                "latency-p50-4-100k": "--no-ceiling",
                "latency-p99-4-100k": "--no-ceiling",
            },
        ),
        (
            targets.Options(pipes=(4,), rates=(1e5,)),
            {"cpu-16": "--pipes 4 (no 16)", "throughput-16": "--pipes 4 (no 16)"},
        ),
        (
            targets.Options(pipes=(4, 16), rates=(1e6,)),
            {
                "cpu-4-100k": "--rates 1e+06 (no 100000)",
                "latency-p50-4-100k": "--rates 1e+06 (no 100000)",
                "latency-p99-4-100k": "--rates 1e+06 (no 100000)",
            },
        ),
    ],
)
def test_a_target_whose_run_an_option_skipped_names_the_option(
    options: Any, skipped: dict[str, str]
) -> None:
    """A skipped target is "not measured" with the option that skipped it; the rest are judged."""
    rows = targets.evaluate(summary(), options)
    found = {row.key: row.note for row in rows if row.status == "not measured"}
    assert found == skipped
    assert all(row.status == "met" for row in rows if row.key not in skipped)


def test_a_skipped_run_is_named_even_when_its_figures_are_absent() -> None:
    """A result without the paced runs, as --no-latency writes it, still gives every row."""
    result = summary()
    for entry in result["configurations"]:
        entry["latency"] = {}
    del result["ceiling"]["ceiling-latency-100k"]
    options = targets.Options(pipes=(4, 16), rates=(1e5,), latency=False)
    rows = by_key(targets.evaluate(result, options))
    assert rows["latency-p99-4-100k"].status == "not measured"
    assert rows["latency-p99-4-100k"].note == "--no-latency"
    assert rows["cpu-16"].status == "met"


def test_a_run_that_failed_its_verification_meets_nothing() -> None:
    """Figures of a run whose sinks found a difference are shown, but not met."""
    rows = targets.evaluate(summary(verified=False), EVERYTHING)
    assert {row.status for row in rows} == {"NOT met"}
    assert all("verification" in row.note for row in rows)


def test_a_run_that_gave_no_figure_is_not_measured() -> None:
    """A run that ran but failed before its figures were taken says so, not "met"."""
    result = summary()
    result["configurations"][1]["balancer_cpu_ns_per_trade"] = None
    rows = by_key(targets.evaluate(result, EVERYTHING))
    assert rows["cpu-16"].status == "not measured"
    assert rows["cpu-16"].note == "the run gave no figure (ws-16)"


def test_rss_is_the_largest_of_the_balancers_runs_paced_ones_included() -> None:
    """The RSS figure is the largest peak over every balancer run, and names that run."""
    result = summary(rss=30e6)
    result["configurations"][0]["latency"]["1M"]["peak_rss_bytes"] = 120e6
    row = by_key(targets.evaluate(result, EVERYTHING))["rss"]
    assert (row.figure, row.run, row.status) == (120.0, "latency-4-1M", "NOT met")


def test_the_table_shows_each_figure_target_ratio_and_verdict() -> None:
    """The rendered table has a line per target and a count of those met."""
    options = targets.Options(pipes=(4, 16), rates=(1e5,), latency=False)
    text = targets.render(targets.evaluate(summary(cpu16=246), options))
    lines = text.splitlines()
    cpu = next(line for line in lines if line.startswith("balancer CPU per trade, full"))
    assert "246 ns" in cpu and "<= 80 ns" in cpu and "3.08" in cpu and "NOT met" in cpu
    share = next(line for line in lines if line.startswith("throughput, 16 pipes"))
    assert ">= 0.35 x ceiling (20.00 M/s)" in share and "0.40" in share
    assert "not measured: --no-latency" in text
    assert lines[-1] == "2 of 6 targets met (3 measured)."


def test_the_rows_go_into_the_result_as_plain_json() -> None:
    """to_json gives dicts json can write, the bound as the issue words it among them."""
    rows = targets.to_json(targets.evaluate(summary(), EVERYTHING))
    again = json.loads(json.dumps(rows))
    assert again[0]["key"] == "cpu-16"
    assert again[0]["target"] == "<= 80 ns"
    assert again[1]["target"] == ">= 0.35 x ceiling"
    assert again[1]["status"] == "met"
