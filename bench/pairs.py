"""Interleaved A/B pairs of benchmark runs: their order, each side's figures, ratios, a summary.

Owns what ``bench.ab`` makes of the results of ``python -m bench`` run by two revisions in
turn: the order of the runs (A B, then B A, ...: whichever side goes second in a pair gets
the warmer caches and the machine's next mood, so each side goes first in half the pairs),
reading each run's result whatever the revision's age (``bench.json`` or the JSON line its
stdout ends with), the per-pair B/A ratios at each pipe count (throughput and CPU per trade,
and with ``--paced`` the paced run's CPU per trade and p50 and p99 latency), and their
summary: the median of the ratios and in how many pairs B was ahead. A ratio within one
pair is the only figure worth reading on a machine whose speed drifts by a third within an
hour; a run's figures alone are shown for the record.

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
PACED_CPU = "paced_cpu_ns_per_trade"
PACED_FIGURES = frozenset({PACED_CPU, "p50_us", "p99_us"})  # from the paced run


@dataclass(frozen=True)
class Figures:
    """One side's runs at one pipe count, as its result reports them: the throughput run, and
    the paced run at the lowest rate if there was one (``bench.ab --paced``)."""

    trades_per_s: float | None
    cpu_ns_per_trade: float | None
    verified: bool = True
    paced_rate: str | None = None  # "100k": the paced run's rate, as the result labels it
    paced_cpu_ns_per_trade: float | None = None
    p50_us: float | None = None
    p99_us: float | None = None
    paced_verified: bool = True

    @property
    def paced(self) -> bool:
        """Whether a paced run is among the figures."""
        return self.paced_rate is not None


@dataclass
class Pair:
    """One A/B pair: which side ran first, and each side's figures by pipe count."""

    index: int  # from 1
    first: str  # "A" or "B"
    figures: dict[str, dict[int, Figures]] = field(default_factory=dict)  # side -> pipes -> ...
    problems: dict[str, str] = field(default_factory=dict)  # side -> why it has no figures

    def ratio(self, pipes: int, name: str) -> float | None:
        """B's figure ``name`` over A's at ``pipes`` pipes; None unless both runs it comes
        from (the throughput run, or the paced run for a paced figure) are verified."""
        a = self.figures.get("A", {}).get(pipes)
        b = self.figures.get("B", {}).get(pipes)
        if a is None or b is None:
            return None
        verified = "paced_verified" if name in PACED_FIGURES else "verified"
        if not (getattr(a, verified) and getattr(b, verified)):
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
        paced: dict[str, Any] = {}
        runs = entry.get("latency") or {}
        if runs:  # the slowest rate: where a wake-up's cost shows most
            label, run = min(runs.items(), key=lambda item: _number(item[1].get("rate")) or 0)
            paced = {
                "paced_rate": str(label),
                "paced_cpu_ns_per_trade": _number(run.get("balancer_cpu_ns_per_trade")),
                "p50_us": _number(run.get("p50_us")),
                "p99_us": _number(run.get("p99_us")),
                "paced_verified": bool(run.get("verified", False)),
            }
        found[int(entry["pipes"])] = Figures(
            _number(entry.get("trades_per_s")),
            _number(entry.get("balancer_cpu_ns_per_trade")),
            bool(entry.get("verified", False)),
            **paced,
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
    # The paced runs' (None without them): CPU per trade, p50 and p99 latency.
    paced_pairs: int = 0  # pairs with both sides' paced runs verified
    paced_cpu_ratio: float | None = None
    p50_ratio: float | None = None
    p99_ratio: float | None = None
    b_cheaper_paced: int = 0


def summarize(pairs: Sequence[Pair], pipes: int) -> Summary:
    """The median B/A ratios at ``pipes`` pipes, and in how many pairs B was ahead."""

    def ratios(name: str) -> list[float]:
        return [r for r in (pair.ratio(pipes, name) for pair in pairs) if r is not None]

    rates, cpus, paced = ratios("trades_per_s"), ratios("cpu_ns_per_trade"), ratios(PACED_CPU)
    p50, p99 = ratios("p50_us"), ratios("p99_us")
    return Summary(
        pipes=pipes,
        pairs=len(rates),
        trades_per_s_ratio=_median(rates),
        cpu_ratio=_median(cpus),
        b_faster=sum(r > 1 for r in rates),
        b_cheaper=sum(r < 1 for r in cpus),
        paced_pairs=len(paced),
        paced_cpu_ratio=_median(paced),
        p50_ratio=_median(p50),
        p99_ratio=_median(p99),
        b_cheaper_paced=sum(r < 1 for r in paced),
    )


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _side(figures: Figures | None, problem: str | None) -> str:
    """One side's figures in a pair's line: "3.82 M/s 235 ns"."""
    if figures is None:
        return f"{'failed' if problem else 'no figure':>18}"
    rate = "-" if figures.trades_per_s is None else f"{figures.trades_per_s / 1e6:.2f} M/s"
    cpu = "-" if figures.cpu_ns_per_trade is None else f"{figures.cpu_ns_per_trade:.0f} ns"
    mark = "" if figures.verified else " (NOT verified)"
    return f"{rate:>10} {cpu:>7}{mark}"


def _paced(figures: Figures | None) -> str:
    """One side's paced run in a pair's second line: "100k 468 ns 210/440 us" (p50/p99)."""
    if figures is None or not figures.paced:
        return "-"
    cpu = figures.paced_cpu_ns_per_trade
    p50, p99 = figures.p50_us, figures.p99_us
    latency = "-" if p50 is None or p99 is None else f"{p50:.0f}/{p99:.0f} us"
    mark = "" if figures.paced_verified else " (NOT verified)"
    return f"{figures.paced_rate} {'-' if cpu is None else f'{cpu:.0f} ns'} {latency}{mark}"


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
        a_figures = pair.figures.get("A", {}).get(pipes)
        b_figures = pair.figures.get("B", {}).get(pipes)
        a = _side(a_figures, pair.problems.get("A"))
        b = _side(b_figures, pair.problems.get("B"))
        lines.append(
            f"{pair.index:>4} {pair.first:>5} {pipes:>5}  {a:>21}  {b:>21}  "
            f"{_ratio(pair.ratio(pipes, 'trades_per_s')):>12} "
            f"{_ratio(pair.ratio(pipes, 'cpu_ns_per_trade')):>8}"
        )
        if any(f is not None and f.paced for f in (a_figures, b_figures)):
            lines.append(
                f"{'':>10} {'paced':>5}  {_paced(a_figures):>21}  {_paced(b_figures):>21}  "
                f"B/A CPU {_ratio(pair.ratio(pipes, PACED_CPU))} "
                f"p50 {_ratio(pair.ratio(pipes, 'p50_us'))} "
                f"p99 {_ratio(pair.ratio(pipes, 'p99_us'))}"
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
        if s.paced_cpu_ratio is not None:
            lines.append(
                f"  {s.pipes:>3} pipes, paced: CPU per trade median {_ratio(s.paced_cpu_ratio)}, "
                f"B cheaper in {s.b_cheaper_paced} of {s.paced_pairs}; latency p50 median "
                f"{_ratio(s.p50_ratio)}, p99 median {_ratio(s.p99_ratio)}"
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
