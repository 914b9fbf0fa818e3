"""The benchmark's results: medians over the repeats, a table for people, one JSON line.

Owns reducing the outcomes of every run (``harness.Outcome``, by run name, one per repeat) to
the figures ``make bench`` prints, and printing them. Throughput figures are medians over the
repeats; ratios (balancer against the baseline and the ceiling, wss against ws) are taken
within each repeat first, then their median, so a machine that is slower during one repeat
moves both sides of a ratio alike. Latency percentiles pool the samples of every repeat (one
sample per feed frame: a few thousand per run, too few for a per-run p99.9); beside p50, p99
and p99.9, ``percentiles_us`` keeps the distribution's curve for ``bench/plot.py``: the sample
at each of ``QUANTILES``, so every point of the plotted curve is a measured sample.

Runs nothing and reads no clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .harness import Outcome
from .measure import median, percentile

# The minimum, p50, then ten steps a decade of 1 / (1 - p) up to p99.9: the x axis of a
# latency-by-percentile plot, where p90, p99 and p99.9 are evenly spaced.
QUANTILES = tuple(sorted({0.5, *(round(1 - 10 ** (-step / 10), 6) for step in range(31))}))


@dataclass(frozen=True)
class Run:
    """One measured configuration: what runs, on how many pipes, against which feed."""

    name: str  # "ws-16", "wss-16", "latency-4-100k", "baseline-16", "ceiling"
    kind: str  # "balancer", "baseline" or "ceiling"
    trades: int
    pipes: int = 0
    workers: int = 0
    tls: bool = False
    rate: float | None = None  # paced trades/s; None: as fast as the socket takes them


def rate_label(rate: float) -> str:
    """Return 100000 as "100k", 1000000 as "1M"."""
    if rate >= 1e6 and rate % 1e6 == 0:
        return f"{rate / 1e6:.0f}M"
    if rate >= 1e3 and rate % 1e3 == 0:
        return f"{rate / 1e3:.0f}k"
    return f"{rate:g}"


def _mb_per_s(outcome: Outcome) -> float:
    return outcome.payload_bytes / outcome.seconds / 1e6 if outcome.seconds else math.nan


def _cpu_share(outcome: Outcome) -> float:
    return outcome.cpu_ns / 1e9 / outcome.seconds if outcome.seconds else math.nan


def figures(run: Run, outcomes: Sequence[Outcome]) -> dict[str, object]:
    """Return the medians (and the verdict) of one configuration's repeats."""

    def middle(value: Callable[[Outcome], float]) -> float | None:
        return median([value(outcome) for outcome in outcomes if outcome.seconds])

    problems = [problem for outcome in outcomes for problem in outcome.problems]
    result: dict[str, object] = {
        "name": run.name,
        "pipes": run.pipes,
        "workers": run.workers,
        "tls": run.tls,
        "rate": run.rate,
        "trades": run.trades,
        "runs": len(outcomes),
        "trades_per_s": middle(lambda o: o.trades_per_s),
        "mb_per_s": middle(_mb_per_s),
        "cpu_ns_per_trade": middle(lambda o: o.cpu_ns_per_trade),
        "cpu_share": middle(_cpu_share),
        "peak_rss_bytes": middle(lambda o: o.peak_rss_bytes),
        "verified": bool(outcomes) and all(outcome.verified for outcome in outcomes),
        "verification": outcomes[0].verification if outcomes else None,
        "problems": problems[:10],
        "trades_per_s_runs": [round(outcome.trades_per_s) for outcome in outcomes],
    }
    if run.rate is not None:
        pooled = sorted(sample for outcome in outcomes for sample in outcome.latency_ns)
        for label, fraction in (("p50_us", 0.5), ("p99_us", 0.99), ("p999_us", 0.999)):
            result[label] = percentile(pooled, fraction) / 1e3 if pooled else None
        result["max_us"] = pooled[-1] / 1e3 if pooled else None
        result["latency_samples"] = len(pooled)
        result["percentiles_us"] = [
            [fraction, percentile(pooled, fraction) / 1e3] for fraction in QUANTILES if pooled
        ]
    return result


def ratio(
    results: Mapping[str, Sequence[Outcome]],
    top: str,
    bottom: str,
    value: Callable[[Outcome], float],
) -> float | None:
    """Return the median over the repeats of ``value(top) / value(bottom)``, same repeat."""
    pairs = zip(results.get(top, ()), results.get(bottom, ()), strict=False)
    ratios = [value(a) / value(b) for a, b in pairs if a.seconds and b.seconds and value(b)]
    return median(ratios)


def all_figures(
    runs: Sequence[Run], results: Mapping[str, Sequence[Outcome]]
) -> dict[str, dict[str, object]]:
    """Return ``figures`` of every run, by name."""
    return {run.name: figures(run, results.get(run.name, ())) for run in runs}


def summarize(
    runs: Sequence[Run],
    results: Mapping[str, Sequence[Outcome]],
    extra: Mapping[str, object],
) -> dict[str, object]:
    """Return the whole result: per configuration, baseline, ceiling, ratios, plus ``extra``."""
    by_name = all_figures(runs, results)
    configurations = []
    for run in runs:
        if run.kind != "balancer" or run.rate is not None:
            continue
        entry = {
            key: by_name[run.name][key]
            for key in ("name", "pipes", "workers", "tls", "trades", "trades_per_s", "mb_per_s")
        }
        entry["balancer_cpu_ns_per_trade"] = by_name[run.name]["cpu_ns_per_trade"]
        entry["balancer_cpu_share"] = by_name[run.name]["cpu_share"]
        for key in ("peak_rss_bytes", "verified", "verification", "trades_per_s_runs"):
            entry[key] = by_name[run.name][key]
        latency = {
            rate_label(other.rate): {
                key: by_name[other.name][key]
                for key in (
                    "name",
                    "rate",
                    "p50_us",
                    "p99_us",
                    "p999_us",
                    "max_us",
                    "latency_samples",
                    "percentiles_us",
                )
            }
            | {
                "balancer_cpu_ns_per_trade": by_name[other.name]["cpu_ns_per_trade"],
                "peak_rss_bytes": by_name[other.name]["peak_rss_bytes"],
                "verified": by_name[other.name]["verified"],
            }
            for other in runs
            if other.kind == "balancer"
            and other.rate is not None
            and other.pipes == run.pipes
            and other.tls == run.tls
        }
        entry["latency"] = latency
        slowest = min((r.rate for r in runs if r.rate and r.pipes == run.pipes), default=None)
        entry["p99_us"] = latency[rate_label(slowest)]["p99_us"] if latency and slowest else None
        configurations.append(entry)
    ratios: dict[str, float | None] = {}
    for run in runs:
        if run.kind == "balancer" and run.rate is None and not run.tls:
            base = f"baseline-{run.pipes}"
            if base in by_name:
                ratios[f"{run.name}_over_{base}_trades_per_s"] = ratio(
                    results, run.name, base, lambda o: o.trades_per_s
                )
            if "ceiling" in by_name:
                ratios[f"{run.name}_over_ceiling_trades_per_s"] = ratio(
                    results, run.name, "ceiling", lambda o: o.trades_per_s
                )
        if run.kind == "balancer" and run.tls:
            plain = f"ws-{run.pipes}"
            ratios[f"{run.name}_over_{plain}_trades_per_s"] = ratio(
                results, run.name, plain, lambda o: o.trades_per_s
            )
            ratios[f"{run.name}_over_{plain}_cpu_ns_per_trade"] = ratio(
                results, run.name, plain, lambda o: o.cpu_ns_per_trade
            )
    baseline = {
        str(by_name[r.name]["pipes"]): by_name[r.name] for r in runs if r.kind == "baseline"
    }
    ceilings = {r.name: by_name[r.name] for r in runs if r.kind == "ceiling"}
    largest = max((r.pipes for r in runs if r.kind == "baseline"), default=0)
    summary: dict[str, object] = {
        "bench": "tradebalancer",
        "configurations": configurations,
        "baseline_trades_per_s": baseline.get(str(largest), {}).get("trades_per_s"),
        "ceiling_trades_per_s": ceilings.get("ceiling", {}).get("trades_per_s"),
        "ratios": ratios,
        "baseline": baseline,
        "ceiling": ceilings,
        "verified": all(
            entry["verified"] for entry in by_name.values() if entry["runs"] and entry["trades"]
        ),
    }
    summary.update(extra)
    return summary


def _number(value: object, scale: float = 1.0, digits: int = 0) -> str:
    """Format a figure for the table; "-" for a missing one."""
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return "-"
    return f"{value / scale:,.{digits}f}"


def render(
    summary: Mapping[str, object],
    runs: Sequence[Run],
    figures_of: Mapping[str, Mapping[str, object]],
) -> str:
    """Return the human-readable tables."""
    out: list[str] = []
    machine = summary.get("machine", {})
    assert isinstance(machine, dict)
    out.append(
        f"tradebalancer benchmark: {summary.get('repeat')} repeat(s), medians; "
        f"{machine.get('cpus')} CPUs; load average {machine.get('loadavg_start')} at start; "
        f"other work used {_number(machine.get('other_cpu_share'), 0.01)}% of the CPUs and the "
        f"hypervisor stole {_number(machine.get('steal_share'), 0.01, 1)}% during the run; "
        f"fs.pipe-max-size {_number(machine.get('pipe_max_size'), 1 << 20)} MiB (the package "
        "raises it: systemd/sysctl.d)"
    )
    out.append("")
    out.append(
        "Throughput: the replay feed sends pre-generated frames as fast as the socket takes them."
    )
    header = (
        f"{'configuration':<38}{'pipes':>6}{'trades':>12}{'trades/s':>12}{'MB/s':>8}"
        f"{'CPU ns/trade':>14}{'CPU':>6}{'peak RSS':>10}  verified"
    )
    out.append(header)
    out.append("-" * len(header))
    labels = {
        "balancer": "tradebalancer run, {tls}",
        "baseline": "baseline (asyncio+json+write)",
        "ceiling": "ceiling (read, discard), {tls}",
    }
    rows = [r for r in runs if r.rate is None]
    for run in rows:
        entry = figures_of.get(run.name)
        if entry is None:
            continue
        label = labels[run.kind].format(tls="wss, user TLS" if run.tls else "ws")
        verdict = "yes" if entry["verified"] else "NO"
        if entry["verification"] == "none":
            verdict = "n/a"
        elif entry["verified"]:
            verdict += f" ({entry['verification']})"
        out.append(
            f"{label:<38}{_number(run.pipes) if run.pipes else '-':>6}"
            f"{_number(run.trades, 1e6, 2) + ' M':>12}"
            f"{_number(entry['trades_per_s'], 1e6, 2) + ' M':>12}"
            f"{_number(entry['mb_per_s']):>8}{_number(entry['cpu_ns_per_trade']):>14}"
            f"{_number(entry['cpu_share'], 0.01) + '%':>6}"
            f"{_number(entry['peak_rss_bytes'], 1e6) + ' MB':>10}  {verdict}"
        )
    out.append(
        "CPU ns/trade and CPU: the process between the socket and the pipes (the balancer, the "
        "baseline; the ceiling client), over the streaming window; peak RSS: its VmHWM."
    )
    latency_rows = [r for r in runs if r.rate is not None]
    if latency_rows:
        out.append("")
        out.append(
            "Latency: paced feed, replay send -> sink receive (the last event of each frame); "
            "samples pooled over the repeats. Pipes '-': the floor, the feed straight into the "
            "ceiling client (no balancer, no pipe, no worker)."
        )
        header = (
            f"{'pipes':>5}{'rate/s':>8}{'trades':>10}{'p50 us':>9}{'p99 us':>9}{'p99.9 us':>10}"
            f"{'max us':>9}{'samples':>9}{'CPU ns/trade':>14}{'peak RSS':>10}  verified"
        )
        out.append(header)
        out.append("-" * len(header))
        for run in latency_rows:
            entry = figures_of[run.name]
            verdict = f"yes ({entry['verification']})" if entry["verified"] else "NO"
            pipes = "-" if run.kind == "ceiling" else str(run.pipes)
            out.append(
                f"{pipes:>5}{rate_label(run.rate or 0):>8}{_number(run.trades):>10}"
                f"{_number(entry['p50_us']):>9}{_number(entry['p99_us']):>9}"
                f"{_number(entry['p999_us']):>10}{_number(entry['max_us']):>9}"
                f"{_number(entry['latency_samples']):>9}{_number(entry['cpu_ns_per_trade']):>14}"
                f"{_number(entry['peak_rss_bytes'], 1e6) + ' MB':>10}  {verdict}"
            )
    out.extend(_render_extras(summary))
    failures = [
        f"  {name}: {problem}"
        for name, entry in figures_of.items()
        for problem in entry["problems"][:3]
    ]
    if failures:
        out.append("")
        out.append("PROBLEMS:")
        out.extend(failures)
    return "\n".join(out) + "\n"


def _render_extras(summary: Mapping[str, object]) -> list[str]:
    """The ratios, the reader's rate, the strict run and the profile, as lines."""
    out: list[str] = [""]
    ratios = summary.get("ratios", {})
    assert isinstance(ratios, dict)
    if ratios:
        out.append("Ratios (within each repeat, then the median):")
        out.extend(f"  {name:<52} {_number(value, 1, 3)}" for name, value in ratios.items())
    reader = summary.get("reader")
    if isinstance(reader, dict):
        out.append(
            f"Reader library: {_number(reader['messages_per_s'], 1e6, 2)} M messages/s from a "
            f"full pipe ({_number(reader['messages_per_cpu_s'], 1e6, 2)} M per second of the "
            f"reader's CPU), {_number(reader['messages'])} messages."
        )
    costs = summary.get("stages")
    if isinstance(costs, dict) and costs:
        out.append(
            "Hot path in one process, no sinks (CPU ns per trade, the service's own objects on "
            "1 MiB batches of the feed's bytes):"
        )
        for pipes, cost in costs.items():
            parts = ", ".join(
                f"{stage} {_number(cost[stage])}"
                for stage in ("websocket", "split", "join", "write")
            )
            out.append(
                f"  {pipes:>3} pipes: {parts}; total {_number(cost['total'])}"
                f" (of split, the JSON check: {_number(cost.get('validate'))}; split without "
                f"the C router: {_number(cost.get('split_python'))})"
            )
    strict = summary.get("strict")
    if isinstance(strict, dict):
        verdict = "verified" if strict["verified"] else "NOT verified"
        out.append(
            f"Strict check ({_number(strict['trades'])} trades, {strict['pipes']} pipes, every "
            f"event parsed by orjson and its route checked in the sinks, plus count+crc32): "
            f"{verdict}."
        )
    profile = summary.get("profile")
    if isinstance(profile, dict) and profile.get("samples"):
        out.append(
            f"Where the balancer's CPU goes ({profile['pipes']} pipes, "
            f"{profile['samples']} py-spy samples, innermost Python frame):"
        )
        stages = profile["stages"]
        assert isinstance(stages, dict)
        out.extend(f"  {share * 100:5.1f}%  {stage}" for stage, share in stages.items())
        out.append("  busiest lines:")
        lines = profile["lines"]
        assert isinstance(lines, list)
        out.extend(f"  {share * 100:5.1f}%  {line}" for line, share in lines)
    return out
