"""Interleaved A/B pairs of benchmark runs: their order, each side's figures, ratios, a summary.

Owns what ``bench.ab`` makes of the results of ``python -m bench`` run by two revisions in
turn: the order of the runs (A B, then B A, ...: whichever side goes second in a pair gets
the warmer caches and the machine's next mood, so each side goes first in half the pairs),
reading each run's result whatever the revision's age (``bench.json`` or the JSON line its
stdout ends with), the per-pair B/A ratios at each pipe count, and their summary: the median
of the ratios and in how many pairs B was ahead. A ratio within one pair is the only figure
worth reading on a machine whose speed drifts by a third within an hour; a run's figures
alone are shown for the record.

Runs nothing and reads no clock; imports nothing of the benchmark, so that a test can feed it
results built by hand.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SIDES = ("A", "B")


@dataclass(frozen=True)
class Figures:
    """One side's throughput run at one pipe count, as its result reports it."""

    trades_per_s: float | None
    cpu_ns_per_trade: float | None
    verified: bool = True


@dataclass
class Pair:
    """One A/B pair: which side ran first, and each side's figures by pipe count."""

    index: int  # from 1
    first: str  # "A" or "B"
    figures: dict[str, dict[int, Figures]] = field(default_factory=dict)  # side -> pipes -> ...
    problems: dict[str, str] = field(default_factory=dict)  # side -> why it has no figures

    def ratio(self, pipes: int, name: str) -> float | None:
        """B's figure ``name`` over A's at ``pipes`` pipes; None unless both are verified."""
        a = self.figures.get("A", {}).get(pipes)
        b = self.figures.get("B", {}).get(pipes)
        if a is None or b is None or not (a.verified and b.verified):
            return None
        top, bottom = getattr(b, name), getattr(a, name)
        if top is None or not bottom:
            return None
        ratio: float = top / bottom
        return ratio


def order(pairs: int) -> list[tuple[str, str]]:
    """The sides of each pair in the order they run: A B, B A, A B, ..."""
    return [("A", "B") if index % 2 == 0 else ("B", "A") for index in range(pairs)]


def parse_output(stdout: str) -> dict[str, Any] | None:
    """The result in a run's stdout: its last line that is a JSON object with configurations."""
    for line in reversed(stdout.splitlines()):
        if not line.startswith("{"):
            continue
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and "configurations" in result:
            return result
    return None


def figures_of(result: Mapping[str, Any]) -> dict[int, Figures]:
    """Each plain-ws throughput configuration of a result, by pipe count."""
    found: dict[int, Figures] = {}
    for entry in result.get("configurations") or ():
        if entry.get("tls") or not str(entry.get("name", "")).startswith("ws-"):
            continue
        found[int(entry["pipes"])] = Figures(
            _number(entry.get("trades_per_s")),
            _number(entry.get("balancer_cpu_ns_per_trade")),
            bool(entry.get("verified", False)),
        )
    return found


def _number(value: object) -> float | None:
    """A figure as a float; None if it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


@dataclass(frozen=True)
class Summary:
    """The pairs at one pipe count, summed up."""

    pipes: int
    pairs: int  # pairs with both sides verified
    trades_per_s_ratio: float | None  # median over those pairs of B / A
    cpu_ratio: float | None
    b_faster: int  # pairs where B moved more trades per second
    b_cheaper: int  # pairs where B spent less CPU per trade


def summarize(pairs: Sequence[Pair], pipes: int) -> Summary:
    """The median B/A ratios at ``pipes`` pipes, and in how many pairs B was ahead."""
    rates = [r for r in (pair.ratio(pipes, "trades_per_s") for pair in pairs) if r is not None]
    cpus = [r for r in (pair.ratio(pipes, "cpu_ns_per_trade") for pair in pairs) if r is not None]
    return Summary(
        pipes=pipes,
        pairs=len(rates),
        trades_per_s_ratio=statistics.median(rates) if rates else None,
        cpu_ratio=statistics.median(cpus) if cpus else None,
        b_faster=sum(r > 1 for r in rates),
        b_cheaper=sum(r < 1 for r in cpus),
    )


def _side(figures: Figures | None, problem: str | None) -> str:
    """One side's figures in a pair's line: "3.82 M/s 235 ns"."""
    if figures is None:
        return f"{'failed' if problem else 'no figure':>18}"
    rate = "-" if figures.trades_per_s is None else f"{figures.trades_per_s / 1e6:.2f} M/s"
    cpu = "-" if figures.cpu_ns_per_trade is None else f"{figures.cpu_ns_per_trade:.0f} ns"
    mark = "" if figures.verified else " (NOT verified)"
    return f"{rate:>10} {cpu:>7}{mark}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_header(labels: Mapping[str, str]) -> str:
    """What A and B are, and the columns of the pairs' lines."""
    lines = [f"{side}: {labels[side]}" for side in SIDES]
    lines.append(
        f"{'pair':>4} {'first':>5} {'pipes':>5}  {'A trades/s, CPU/trade':>21}  "
        f"{'B trades/s, CPU/trade':>21}  {'B/A trades/s':>12} {'B/A CPU':>8}"
    )
    return "\n".join(lines) + "\n"


def render_pair(pair: Pair, pipe_counts: Sequence[int]) -> str:
    """A line per pipe count of one pair: each side's figures and the B/A ratios."""
    lines = []
    for pipes in pipe_counts:
        a = _side(pair.figures.get("A", {}).get(pipes), pair.problems.get("A"))
        b = _side(pair.figures.get("B", {}).get(pipes), pair.problems.get("B"))
        lines.append(
            f"{pair.index:>4} {pair.first:>5} {pipes:>5}  {a:>21}  {b:>21}  "
            f"{_ratio(pair.ratio(pipes, 'trades_per_s')):>12} "
            f"{_ratio(pair.ratio(pipes, 'cpu_ns_per_trade')):>8}"
        )
    lines.extend(f"     {side} failed: {problem}" for side, problem in pair.problems.items())
    return "\n".join(lines) + "\n"


def render_summary(summaries: Sequence[Summary], total: int) -> str:
    """The medians of the ratios and the counts of pairs B was ahead in, per pipe count."""
    lines = [f"Summary over {total} pair(s), B/A (above 1: B moves more; below 1: B costs less):"]
    for s in summaries:
        if not s.pairs:
            lines.append(f"  {s.pipes:>3} pipes: no pair with both sides verified")
            continue
        lines.append(
            f"  {s.pipes:>3} pipes: trades/s median {_ratio(s.trades_per_s_ratio)}, "
            f"B faster in {s.b_faster} of {s.pairs}; CPU per trade median "
            f"{_ratio(s.cpu_ratio)}, B cheaper in {s.b_cheaper} of {s.pairs}"
        )
    return "\n".join(lines) + "\n"


def to_json(pairs: Sequence[Pair], summaries: Sequence[Summary]) -> dict[str, Any]:
    """Every pair's figures and the summary, as plain data."""
    return {
        "pairs": [
            {
                "index": pair.index,
                "first": pair.first,
                "figures": {
                    side: {str(pipes): f.__dict__ for pipes, f in by_pipes.items()}
                    for side, by_pipes in pair.figures.items()
                },
                "problems": pair.problems,
            }
            for pair in pairs
        ],
        "summary": [s.__dict__ for s in summaries],
    }
