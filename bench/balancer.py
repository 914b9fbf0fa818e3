"""The balancer under test: ``tradebalancer run`` with a generated configuration and the sinks.

Owns the configuration of a benchmark run of the real service, as a user runs it: ``python -m
tradebalancer --config FILE run bench``, its pipes at the kernel's largest unprivileged size
(``pipe_size = "max"``), its default 1 MiB receive batch, and ``bench/sink.py`` as the worker
command. A run is measured by ``harness.run_consumer``; this module only says what to run.

The sinks check the count and the CRC-32 of each pipe, which proves the exact bytes, their
order and their routing at C speed, because the expected figures come from an independent
splitter (``source.py``). ``strict`` adds the per-message check (orjson parse and the route of
each event's symbol) in the sinks: about 1.5 us per event, too slow to keep up with the
balancer on two cores, so it is for a small confirming run only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import harness
from .source import Pool


@dataclass(frozen=True)
class Setup:
    """What the balancer runs with."""

    pipes: int
    workers: int
    latency: bool = False  # the sinks collect send-to-receive latencies
    strict: bool = False  # the sinks parse every event and check its route
    ca: Path | None = None  # trust this CA (wss runs)
    options: tuple[str, ...] = ()  # more "key = value" lines for the feed's table


def write_config(setup: Setup, url: str, workdir: Path, expect: Path) -> Path:
    """Write the balancer's TOML configuration into ``workdir``; return its path."""
    sink = [
        "{{ python }}",
        *harness.sink_args(
            "{{ pipes | join(',') }}", "{{ pipe_count }}", "{{ workdir }}", "{{ worker }}", expect
        ),
    ]
    if setup.latency:
        sink.append("--latency")
    if setup.strict:
        sink.append("--strict")
    lines = [
        "[feeds.bench]",
        f"url = {json.dumps(url)}",
        'subscribe = ["T.*"]',
        'api_key_file = ""',
        f"pipes = {setup.pipes}",
        f"workers = {setup.workers}",
        'pipe_size = "max"',
        f"working_directory = {json.dumps(str(workdir))}",
        f"command = {json.dumps(sink)}",
        # The feed starts once the sinks have: until then connecting is refused, and tried
        # again soon. After the stream the feed stops listening, so retries cost little.
        "reconnect.initial = 0.05",
        "reconnect.max = 0.25",
    ]
    if setup.ca is not None:
        lines += [
            'tls = "user"',  # this kernel has no kTLS; the point is user-space TLS's cost
            f"ca_file = {json.dumps(str(setup.ca))}",
            'server_hostname = "localhost"',
        ]
    lines += setup.options
    path = workdir / "tradebalancer.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(
    pool: Pool,
    setup: Setup,
    feed: harness.Feed,
    *,
    keep: bool = False,
    profile: Path | None = None,
) -> harness.Outcome:
    """Run the balancer on ``feed`` with ``setup``; return what was measured and verified.

    ``keep`` keeps the run's directory (configuration, log, sink reports); it is kept anyway
    when something went wrong. ``profile`` samples the balancer with py-spy into that file.
    """
    workdir = Path(tempfile.mkdtemp(prefix="tradebalancer-bench-"))
    expected = pool.expected(setup.pipes, feed.trades)
    outcome = harness.Outcome(
        trades=feed.trades,
        verification="count" if feed.timestamps else "count+crc32",
    )
    try:
        expect = harness.write_expectation(workdir, expected)
        port = harness.reserve_port()
        url = harness.url_for(port, feed.tls is not None)
        config = write_config(setup, url, workdir, expect)
        argv = [harness.python(), "-m", "tradebalancer", "--config", str(config)]
        harness.run_consumer(
            [*argv, "run", "bench"],
            pool=pool,
            feed=feed,
            port=port,
            workdir=workdir,
            workers=setup.workers,
            expected=expected,
            outcome=outcome,
            profile=profile,
        )
    finally:
        if not keep and not outcome.problems:
            shutil.rmtree(workdir, ignore_errors=True)
        elif outcome.problems:
            outcome.problems.append(f"files kept in {workdir}")
    return outcome
