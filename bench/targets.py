"""Issue 15's targets, judged against one result of ``make bench``: figure, target, ratio, verdict.

Owns the list of targets and how each is read from the summary that ``report.summarize`` returns
(the same dict as ``bench-results/bench.json``), and the table that ends the benchmark's
output. Runs nothing, reads no clock, and imports nothing of the benchmark, so that a test can
feed it a summary built by hand.

Two kinds of target. An absolute one bounds a figure (the balancer's CPU per trade, its peak
RSS): its ratio is the figure over the bound, and it is met at a ratio of 1 or less. A relative
one bounds the figure against the same run's reference, because this machine's speed drifts by
a third within an hour and only ratios within a run mean anything: throughput at 16 pipes
against the read-and-discard ceiling (the median over the repeats of the ratio within each
repeat, as ``report`` takes it), and the latency percentiles at 100 k trades/s against the
floor (the feed straight into one client that reads and discards, its samples pooled over the
repeats as the balancer's are). A target whose run an option skipped says which option; one
whose run failed its verification is not met, whatever its figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

FULL_SPEED_PIPES = 16
PACED_PIPES = 4
PACED_RATE = 100_000.0
PACED_LABEL = "100k"  # report.rate_label(PACED_RATE): the key of the paced run's figures


@dataclass(frozen=True)
class Options:
    """What the run was asked to measure: the options that can skip a target's run."""

    pipes: tuple[int, ...]
    rates: tuple[float, ...]
    latency: bool = True  # False: --no-latency
    ceiling: bool = True  # False: --no-ceiling

    def skipped(self, pipes: int, rate: float | None = None, ceiling: bool = False) -> str | None:
        """Return the option that skipped a run of ``pipes`` (at ``rate``), or None."""
        if rate is not None and not self.latency:
            return "--no-latency"
        if pipes not in self.pipes:
            return f"--pipes {','.join(map(str, self.pipes))} (no {pipes})"
        if rate is not None and rate not in self.rates:
            return f"--rates {','.join(f'{r:g}' for r in self.rates)} (no {rate:g})"
        if ceiling and not self.ceiling:
            return "--no-ceiling"
        return None


@dataclass(frozen=True)
class Target:
    """One target of issue 15 and how this run fared against it."""

    key: str  # stable, for scripts: "cpu-16", "throughput-16", "latency-p99-4-100k", "rss"
    text: str  # what is measured, for people
    unit: str  # of the figure: "ns", "M trades/s", "us", "MB"
    relation: str  # "<=", ">=" or "<": how the ratio must compare with the limit
    limit: float  # the bound: in the figure's unit if absolute, else on the ratio
    relative_to: str | None = None  # None (absolute), "ceiling" or "floor"
    figure: float | None = None  # in ``unit``
    reference: float | None = None  # the ceiling's or the floor's figure, in ``unit``
    ratio: float | None = None  # figure / limit if absolute, else figure / reference
    status: str = "not measured"  # "met", "NOT met" or "not measured"
    note: str = ""  # the option that skipped it, or why it is not met whatever its figure
    run: str = ""  # the run the figure comes from

    @property
    def target_text(self) -> str:
        """The bound as the issue states it: "<= 80 ns", ">= 0.35 x ceiling"."""
        if self.relative_to is None:
            return f"{self.relation} {self.limit:g} {self.unit}"
        return f"{self.relation} {self.limit:g} x {self.relative_to}"


@dataclass
class _Reading:
    """A figure found in the summary, with the run it came from and whether that verified."""

    figure: float | None
    run: str
    verified: bool = True
    reference: float | None = None
    ratio: float | None = None


def _number(value: object) -> float | None:
    """A figure of the summary as a float; None if it is missing or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _configuration(summary: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """The summary's entry of the throughput configuration ``name`` ("ws-16"), if any."""
    for entry in summary.get("configurations") or ():
        if entry.get("name") == name:
            found: Mapping[str, Any] = entry
            return found
    return None


def _paced(summary: Mapping[str, Any], pipes: int) -> Mapping[str, Any] | None:
    """The paced run at ``PACED_RATE`` over ws with ``pipes`` pipes, if it ran."""
    entry = _configuration(summary, f"ws-{pipes}")
    latency = entry.get("latency") if entry else None
    found = latency.get(PACED_LABEL) if isinstance(latency, Mapping) else None
    return found if isinstance(found, Mapping) else None


def _judge(target: Target, reading: _Reading | None, skipped: str | None) -> Target:
    """Fill ``target`` with the reading: its ratio and verdict, or why it was not measured."""
    if skipped is not None:
        return replace(target, note=skipped)
    if reading is None or reading.figure is None:
        note = "the run gave no figure" + (f" ({reading.run})" if reading else "")
        return replace(target, note=note, run=reading.run if reading else "")
    ratio = reading.ratio
    if ratio is None and target.relative_to is None:
        ratio = reading.figure / target.limit
    elif ratio is None and reading.reference:
        ratio = reading.figure / reading.reference
    if ratio is None:
        reason = f"no {target.relative_to} figure"
        return replace(target, figure=reading.figure, note=reason, run=reading.run)
    bound = 1.0 if target.relative_to is None else target.limit
    met = {"<=": ratio <= bound, "<": ratio < bound, ">=": ratio >= bound}[target.relation]
    note = ""
    if not reading.verified:
        met, note = False, "its run failed its verification"
    return replace(
        target,
        figure=reading.figure,
        reference=reading.reference,
        ratio=ratio,
        status="met" if met else "NOT met",
        note=note,
        run=reading.run,
    )


def evaluate(summary: Mapping[str, Any], options: Options) -> list[Target]:
    """Return every target of issue 15, judged against ``summary``, in the issue's order."""
    full = f"ws-{FULL_SPEED_PIPES}"
    throughput = _configuration(summary, full)
    paced = _paced(summary, PACED_PIPES)
    floor = (summary.get("ceiling") or {}).get(f"ceiling-latency-{PACED_LABEL}")
    paced_name = f"latency-{PACED_PIPES}-{PACED_LABEL}"
    rows: list[Target] = []

    cpu = None
    if throughput is not None:
        cpu = _Reading(
            _number(throughput.get("balancer_cpu_ns_per_trade")), full, bool(throughput["verified"])
        )
    rows.append(
        _judge(
            Target(
                "cpu-16",
                f"balancer CPU per trade, full speed, {FULL_SPEED_PIPES} pipes",
                "ns",
                "<=",
                80,
            ),
            cpu,
            options.skipped(FULL_SPEED_PIPES),
        )
    )

    share = None
    if throughput is not None:
        rate = _number(throughput.get("trades_per_s"))
        ceiling = _number(summary.get("ceiling_trades_per_s"))
        ratios = summary.get("ratios") or {}
        share = _Reading(
            rate / 1e6 if rate is not None else None,
            full,
            bool(throughput["verified"]),
            reference=ceiling / 1e6 if ceiling is not None else None,
            ratio=_number(ratios.get(f"{full}_over_ceiling_trades_per_s")),
        )
    rows.append(
        _judge(
            Target(
                f"throughput-{FULL_SPEED_PIPES}",
                f"throughput, {FULL_SPEED_PIPES} pipes, of the read-and-discard ceiling",
                "M trades/s",
                ">=",
                0.35,
                "ceiling",
            ),
            share,
            options.skipped(FULL_SPEED_PIPES, ceiling=True),
        )
    )

    paced_cpu = None
    if paced is not None:
        figure = _number(paced.get("balancer_cpu_ns_per_trade"))
        paced_cpu = _Reading(figure, paced_name, bool(paced.get("verified")))
    rows.append(
        _judge(
            Target(
                f"cpu-{PACED_PIPES}-{PACED_LABEL}",
                f"balancer CPU per trade at 100 k trades/s, {PACED_PIPES} pipes",
                "ns",
                "<=",
                300,
            ),
            paced_cpu,
            options.skipped(PACED_PIPES, PACED_RATE),
        )
    )

    for key, label, limit in (("p50_us", "p50", 1.5), ("p99_us", "p99", 2.0)):
        latency = None
        if paced is not None:
            reference = _number(floor.get(key)) if isinstance(floor, Mapping) else None
            latency = _Reading(
                _number(paced.get(key)), paced_name, bool(paced.get("verified")), reference
            )
        rows.append(
            _judge(
                Target(
                    f"latency-{label}-{PACED_PIPES}-{PACED_LABEL}",
                    f"latency {label} at 100 k trades/s, {PACED_PIPES} pipes, of the floor",
                    "us",
                    "<=",
                    limit,
                    "floor",
                ),
                latency,
                options.skipped(PACED_PIPES, PACED_RATE, ceiling=True),
            )
        )

    rows.append(
        _judge(
            Target("rss", "balancer peak RSS, largest of its runs", "MB", "<", 100),
            _largest_rss(summary),
            None,
        )
    )
    return rows


def _largest_rss(summary: Mapping[str, Any]) -> _Reading | None:
    """The largest peak RSS of the balancer over its runs (throughput and paced), in MB."""
    found: list[tuple[float, str, bool]] = []
    for entry in summary.get("configurations") or ():
        runs = [entry, *(entry.get("latency") or {}).values()]
        for run in runs:
            rss = _number(run.get("peak_rss_bytes"))
            if rss:  # 0: the run failed before it was measured
                found.append((rss / 1e6, str(run.get("name")), bool(run.get("verified"))))
    if not found:
        return None
    rss, name, verified = max(found)
    return _Reading(rss, name, verified)


def _format(value: float | None, unit: str) -> str:
    """A figure with the digits that mean something for its unit: "246 ns", "3.53 M/s"."""
    if value is None:
        return "-"
    if unit == "M trades/s":
        return f"{value:,.2f} M/s"
    return f"{value:,.0f} {unit}"


def render(rows: Sequence[Target]) -> str:
    """The table of the targets, with a line that says how to read it and a count."""
    out = [
        "Issue 15's targets, this run (ratio: the figure over the target; for throughput and "
        "latency, over the same run's ceiling or floor):"
    ]
    header = f"{'target':<62}{'figure':>11}  {'target':<31}{'ratio':>6}  verdict"
    out += [header, "-" * len(header)]
    for row in rows:
        target = row.target_text
        if row.relative_to is not None and row.reference is not None:
            target += f" ({_format(row.reference, row.unit)})"
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
        verdict = row.status + (f": {row.note}" if row.note else "")
        out.append(
            f"{row.text:<62}{_format(row.figure, row.unit):>11}  {target:<31}{ratio:>6}  {verdict}"
        )
    met = sum(row.status == "met" for row in rows)
    measured = sum(row.status != "not measured" for row in rows)
    out.append(f"{met} of {len(rows)} targets met ({measured} measured).")
    return "\n".join(out) + "\n"


def to_json(rows: Sequence[Target]) -> list[dict[str, Any]]:
    """The rows as the result's ``targets``: plain dicts, the bound as the issue states it too."""
    return [{**row.__dict__, "target": row.target_text} for row in rows]
