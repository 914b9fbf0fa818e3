"""``make bench``: the balancer end to end, against a plain Python baseline and a raw ceiling.

Owns the benchmark's plan and command line. Every run is real: the replay feed on 127.0.0.1
(a thread of this process serving pre-generated frames), ``tradebalancer run`` as a child
process with its pipes and its workers, and ``bench/sink.py`` as the workers, which verify every
pipe's count and CRC-32 against an independent reference (``source.py``). Per repeat, in this
order, so that a busy spell of the machine spreads over all of them:

* throughput, ws, at each pipe count (default 4 and 16): trades/s, MB/s, the balancer's CPU
  ns per trade and CPU share, its peak RSS;
* throughput over wss with user-space TLS at the largest pipe count (the cost of TLS);
* latency at each paced rate (default 100 k and 1 M trades/s) and pipe count, from the feed's
  send to the sink's receive; the feed's timestamps change the bytes, so only counts are
  checked;
* the ceiling: a client that does the websocket handshake, then reads and discards (ws, wss),
  and at each paced rate, the latency floor (the feed's send to that client's read);
* the baseline: websockets + json + one write per trade, with the same sinks, at each pipe
  count (fewer trades: it is some 20 times slower);
* the reader library's rate from a full pipe.

Then, once: a small run whose sinks also parse every event and check its route (``--strict``
in the sinks, too slow to keep up at full speed on two CPUs), and with ``--profile DIR`` a
py-spy profile of the balancer at the largest pipe count. Progress goes to stderr; stdout gets
the tables, last of them issue 15's targets with this run's figures (``targets.py``), then
the whole result as one JSON line; the same result goes to ``bench-results/bench.json`` and
its picture (``bench/plot.py``) to ``bench-results/bench.svg`` (``--results DIR``), and with
``--json FILE`` to that file too (what ``bench.ab`` reads). The exit status is 1 if any run
failed its verification.

    python -m bench [--quick] [--repeat 3] [--trades 5000000] [--pipes 4,16] [--profile DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import tradebalancer
from tradebalancer.pipes import pipe_max_size

from . import (
    balancer,
    baseline,
    ceiling,
    harness,
    hotpath,
    measure,
    plot,
    readerrate,
    report,
    stages,
    targets,
)
from .report import Run, rate_label
from .source import Pool


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """Write a throw-away CA and a localhost certificate with the tests' own tlsca.py."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    spec = importlib.util.spec_from_file_location("tlsca", tests / "tlsca.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ca: tuple[Path, Path, Path] = module.make_ca(directory)
    return ca


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; ``--quick`` changes the defaults of the sizes."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a smoke run: 200k trades, 1 repeat, short paces")
    add("--repeat", type=int, help="repeats of every run (default 3; quick 1)")
    add("--trades", type=int, help="trades per throughput run (default 5,000,000)")
    add("--pool", type=int, help="distinct pre-generated trades, looped (default 1,000,000)")
    add("--pipes", default="4,16", help="pipe counts, comma-separated (default 4,16)")
    add("--workers", type=int, help="sink processes per run (default: one per pipe)")
    add("--rates", default="100000,1000000", help="paced rates for the latency runs")
    add("--latency-seconds", type=float, help="length of each paced run (default 4; quick 1)")
    add("--baseline-trades", type=int, help="trades per baseline run (default 500,000)")
    add("--reader-messages", type=int, help="messages for the reader's rate (default 3 M)")
    add("--no-tls", action="store_true", help="skip the wss runs")
    add("--no-latency", action="store_true", help="skip the paced runs")
    add("--no-baseline", action="store_true", help="skip the baseline")
    add("--no-ceiling", action="store_true", help="skip the ceiling")
    add("--no-strict", action="store_true", help="skip the strict check")
    add("--no-stages", action="store_true", help="skip the in-process stage costs")
    add("--profile", metavar="DIR", help="profile the balancer with py-spy, files in DIR")
    add(
        "--balancer-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help='a line for the balancer\'s [feeds.bench] table, e.g. "backlog_limit = 16777216"',
    )
    add("--keep", action="store_true", help="keep each run's directory (config, log, reports)")
    add(
        "--results",
        default="bench-results",
        metavar="DIR",
        help="write the result as bench.json and its picture as bench.svg here "
        "(default bench-results; '' for neither)",
    )
    add(
        "--json", metavar="FILE", help="also write the result to FILE, as bench.json (for bench.ab)"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "repeat": 1 if quick else 3,
        "trades": 200_000 if quick else 5_000_000,
        "pool": 200_000 if quick else 1_000_000,
        "latency_seconds": 1.0 if quick else 4.0,
        "baseline_trades": 100_000 if quick else 500_000,
        "reader_messages": 500_000 if quick else 3_000_000,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.pipe_counts = [int(p) for p in args.pipes.split(",")]
    args.rate_list = [float(r) for r in args.rates.split(",")]
    if args.repeat < 1 or min(args.pipe_counts) < 1 or args.trades < 1:
        parser.error("--repeat, --pipes and --trades must be positive")
    return args


def plan(args: argparse.Namespace, pool: Pool) -> list[Run]:
    """Return the runs of one repeat, in the order they run."""
    runs: list[Run] = []
    trades = pool.boundary(args.trades)
    largest = max(args.pipe_counts)

    def workers(pipes: int) -> int:
        return min(args.workers or pipes, pipes)

    runs += [
        Run(f"ws-{pipes}", "balancer", trades, pipes, workers(pipes)) for pipes in args.pipe_counts
    ]
    if not args.no_tls:
        runs.append(Run(f"wss-{largest}", "balancer", trades, largest, workers(largest), tls=True))
    if not args.no_latency:
        for pipes in args.pipe_counts:
            for rate in args.rate_list:
                paced = pool.boundary(int(rate * args.latency_seconds))
                name = f"latency-{pipes}-{rate_label(rate)}"
                runs.append(Run(name, "balancer", paced, pipes, workers(pipes), rate=rate))
    if not args.no_ceiling:
        runs.append(Run("ceiling", "ceiling", trades))
        if not args.no_tls:
            runs.append(Run("ceiling-wss", "ceiling", trades, tls=True))
        if not args.no_latency:  # the latency floor: the feed straight into one client
            for rate in args.rate_list:
                paced = pool.boundary(int(rate * args.latency_seconds))
                runs.append(Run(f"ceiling-latency-{rate_label(rate)}", "ceiling", paced, rate=rate))
    if not args.no_baseline:
        few = pool.boundary(args.baseline_trades)
        runs += [
            Run(f"baseline-{pipes}", "baseline", few, pipes, workers(pipes))
            for pipes in args.pipe_counts
        ]
    return runs


def execute(
    run: Run, pool: Pool, tls: tuple[Path, Path, Path] | None, args: argparse.Namespace
) -> harness.Outcome:
    """Run one configuration once."""
    timestamps = run.rate is not None
    files = (tls[1], tls[2]) if run.tls and tls else None
    ca = tls[0] if run.tls and tls else None
    feed = harness.Feed(trades=run.trades, rate=run.rate, timestamps=timestamps, tls=files)
    if run.kind == "ceiling":
        return ceiling.run(pool, feed, ca)
    if run.kind == "baseline":
        return baseline.run(pool, run.pipes, run.workers, feed, ca)
    options = tuple(args.balancer_option)
    setup = balancer.Setup(run.pipes, run.workers, latency=timestamps, ca=ca, options=options)
    return balancer.run(pool, setup, feed, keep=args.keep)


def progress(message: str) -> None:
    """One line of progress on stderr."""
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def describe(run: Run, outcome: harness.Outcome) -> str:
    """A progress line for one finished run."""
    verdict = "verified" if outcome.verified else "FAILED: " + "; ".join(outcome.problems[:2])
    text = f"{run.name}: {outcome.trades_per_s / 1e6:.2f} M trades/s"
    if run.kind != "ceiling":
        text += f", {outcome.cpu_ns_per_trade:.0f} ns CPU/trade"
        text += f", peak RSS {outcome.peak_rss_bytes / 1e6:.0f} MB"
    if outcome.latency_ns:
        p99 = measure.percentile(outcome.latency_ns, 0.99) / 1e3
        text += f", p99 {p99:.0f} us"
    return f"{text}; {verdict}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the tables and the JSON line; 1 if anything failed."""
    args = parse_arguments(argv)
    date, source = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit()
    load_start = measure.sample_load()
    loadavg_start = os.getloadavg()
    started = time.monotonic()
    progress(f"generating {args.pool:,} trades and the reference split per pipe")
    pool = Pool(args.pool, sorted(set(args.pipe_counts)))
    progress(f"pool ready: {pool.events:,} trades, {pool.frame_bytes / 1e6:.0f} MB of frames")
    runs = plan(args, pool)
    results: dict[str, list[harness.Outcome]] = {run.name: [] for run in runs}
    readers: list[readerrate.ReaderRate] = []
    block, ends = readerrate.framed_block(pool)
    wire = stages.wire_batches(pool)
    costs: dict[int, list[stages.StageCost]] = {pipes: [] for pipes in args.pipe_counts}
    with tempfile.TemporaryDirectory(prefix="tradebalancer-bench-ca-") as directory:
        tls = None if args.no_tls else make_ca(Path(directory))
        for repeat in range(args.repeat):
            progress(f"repeat {repeat + 1} of {args.repeat}")
            for run in runs:
                outcome = execute(run, pool, tls, args)
                results[run.name].append(outcome)
                progress(describe(run, outcome))
            readers.append(readerrate.measure(block, ends, args.reader_messages))
            progress(f"reader: {readers[-1].per_s / 1e6:.2f} M messages/s")
            if not args.no_stages:
                for pipes in args.pipe_counts:
                    costs[pipes].append(stages.measure(wire, pipes))
                    shares = ", ".join(
                        f"{stage} {ns:.0f}" for stage, ns in costs[pipes][-1].ns_per_trade.items()
                    )
                    cost = costs[pipes][-1]
                    progress(
                        f"stages, {pipes} pipes, ns/trade: {shares}; of split, the JSON check "
                        f"{cost.validate:.0f}; Python split {cost.split_python:.0f}"
                    )
        extra: dict[str, object] = {}
        if not args.no_strict:
            extra["strict"] = strict_check(pool, min(args.pipe_counts))
        if args.profile:
            extra["profile"] = profile(pool, max(args.pipe_counts), args)
    load_end = measure.sample_load()
    extra["reader"] = {
        "messages": args.reader_messages,
        "messages_per_s": measure.median([r.per_s for r in readers]),
        "messages_per_cpu_s": measure.median([r.per_cpu_s for r in readers]),
    }
    if not args.no_stages:
        extra["stages"] = {
            str(pipes): {
                "trades": wire.trades,
                **{
                    stage: measure.median([c.ns_per_trade[stage] for c in found])
                    for stage in stages.STAGES
                },
                "total": measure.median([c.total for c in found]),
                "split_python": measure.median([c.split_python for c in found]),
                "validate": measure.median([c.validate for c in found]),
            }
            for pipes, found in costs.items()
        }
    extra["balancer_options"] = args.balancer_option
    extra["repeat"] = args.repeat
    extra["quick"] = args.quick
    extra["seconds"] = round(time.monotonic() - started, 1)
    extra["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        # The balancer runs with pipe_size = "max": what this machine's settings allow.
        "pipe_max_size": pipe_max_size(),
        "loadavg_start": round(loadavg_start[0], 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
        **{k: round(v, 3) for k, v in measure.other_load(load_start, load_end).items()},
    }
    extra["version"] = tradebalancer.__version__
    extra["date"] = date
    extra["commit"] = source
    summary = report.summarize(runs, results, extra)
    strict_ok = not isinstance(extra.get("strict"), dict) or extra["strict"]["verified"]
    summary["verified"] = bool(summary["verified"]) and bool(strict_ok)
    goals = targets.evaluate(summary, target_options(args))
    summary["targets"] = targets.to_json(goals)
    sys.stdout.write(report.render(summary, runs, report.all_figures(runs, results)))
    sys.stdout.write("\n" + targets.render(goals))
    sys.stdout.write(json.dumps(summary, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    if args.results:
        save(summary, Path(args.results))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if summary["verified"] else 1


def target_options(args: argparse.Namespace) -> targets.Options:
    """What the command line asked to measure, as the targets' table needs to know it."""
    return targets.Options(
        pipes=tuple(args.pipe_counts),
        rates=tuple(args.rate_list),
        latency=not args.no_latency,
        ceiling=not args.no_ceiling,
    )


def commit() -> str | None:
    """The source tree's commit, "+changes" if it differs from it; None outside a git tree."""
    repo = Path(__file__).resolve().parent.parent

    def git(*arguments: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(repo), *arguments], capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changed else "")


def save(summary: dict[str, object], directory: Path) -> None:
    """Write the result as ``bench.json`` and its picture as ``bench.svg`` in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.json").write_text(json.dumps(summary, indent=1) + "\n")
    (directory / "bench.svg").write_text(plot.render(summary), encoding="utf-8")
    progress(f"wrote {directory / 'bench.json'} and {directory / 'bench.svg'}")


def strict_check(pool: Pool, pipes: int) -> dict[str, object]:
    """One small run whose sinks also parse every event and check its pipe."""
    trades = pool.boundary(min(pool.events, 200_000))
    setup = balancer.Setup(pipes, pipes, strict=True)
    outcome = balancer.run(pool, setup, harness.Feed(trades=trades))
    progress(f"strict check: {'verified' if outcome.verified else outcome.problems[:3]}")
    return {
        "trades": trades,
        "pipes": pipes,
        "verified": outcome.verified,
        "problems": outcome.problems[:5],
    }


def profile(pool: Pool, pipes: int, args: argparse.Namespace) -> dict[str, object]:
    """Profile the balancer with py-spy during one throughput run; summarize by stage."""
    if hotpath.find_py_spy() is None:
        progress("no py-spy next to the interpreter or on PATH: no profile (pip install py-spy)")
        return {"samples": 0}
    directory = Path(args.profile)
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / f"balancer-{pipes}-pipes.txt"
    setup = balancer.Setup(pipes, min(args.workers or pipes, pipes))
    outcome = balancer.run(
        pool, setup, harness.Feed(trades=pool.boundary(args.trades)), profile=output
    )
    progress(f"profiled run: {describe(Run('profile', 'balancer', outcome.trades), outcome)}")
    if not output.exists():
        return {"samples": 0}
    summary = hotpath.summarize(output)
    summary["pipes"] = pipes
    summary["file"] = str(output)
    summary["trades_per_s"] = outcome.trades_per_s
    summary["cpu_ns_per_trade"] = outcome.cpu_ns_per_trade
    return summary


if __name__ == "__main__":
    sys.exit(main())
