"""One measured run: the replay feed, a consumer process and its sinks, and what they reported.

Owns the part every throughput and latency run shares, whoever consumes the feed (the
balancer, or the plain Python baseline): starting the consumer as a child, told to connect to a
port reserved on 127.0.0.1; waiting until each of its sinks has started (its ready file); only
then serving the pool on that port from a replay feed in this process (a thread: it only hands
pre-built 1 MiB batches to ``send``); taking the consumer's CPU time just before the first
event leaves the feed and again once every sink has written its done file (it got as many
messages as its pipes expect); then stopping the consumer with SIGTERM and checking the
sinks' reports against the pool's reference. Knows nothing of how a consumer is configured:
the caller gives its command line, and the consumer retries its connection until the feed is
up (the balancer by its reconnect policy).

Why hold the feed back: sixteen Python sinks take a second or two of CPU to start on two
CPUs; a feed that started at once would queue that long in the pipes and the balancer's
backlog, which would show as latency, and as throughput the sinks then catch up on. Why this
window: the consumer's start-up (imports, spawning the sinks, connecting) is not part of the
cost of a trade, and neither is its shutdown; the sinks' first and last receive times bound
the wall time the same way, so trades/s is what crossed the pipes while it streamed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tradebalancer.replay import ReplayOptions, ReplayServer

from . import hotpath, measure
from .source import Pool

REPO = Path(__file__).resolve().parent.parent
SINK = REPO / "bench" / "sink.py"
KEY = "bench-key"
STREAM_START_TIMEOUT = 60.0  # seconds for a consumer to start, connect and subscribe
DRAIN_GRACE = 20.0  # seconds the sinks get, once the feed sent everything, to receive it
_POLL = 0.002  # seconds between CPU samples while waiting for the stream to start
_DONE_POLL = 0.02


@dataclass(frozen=True)
class Feed:
    """How the replay feed serves a run."""

    trades: int  # a frame boundary of the pool
    rate: float | None = None  # paced trades/s; None: as fast as the socket takes them
    timestamps: bool = False  # "lt" in the last event of each frame (changes the bytes)
    tls: tuple[Path, Path] | None = None  # (certificate, key): wss://


@dataclass
class Outcome:
    """What one run measured and whether the sinks got exactly what was sent."""

    trades: int
    seconds: float = 0.0  # first event at a sink to the last one
    cpu_ns: int = 0  # the consumer's CPU time over the streaming window
    peak_rss_bytes: int = 0
    payload_bytes: int = 0  # the events' JSON bytes delivered
    verified: bool = False
    verification: str = "count+crc32"  # or "count" when the bytes were not the source's
    problems: list[str] = field(default_factory=list)
    latency_ns: list[int] = field(default_factory=list)  # sorted
    sink_cpu_s: float = 0.0
    exit_code: int | None = None

    @property
    def trades_per_s(self) -> float:
        """Trades delivered per second of the streaming window."""
        return self.trades / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ns_per_trade(self) -> float:
        """The consumer's CPU nanoseconds per trade."""
        return self.cpu_ns / self.trades if self.trades else 0.0


def reserve_port() -> int:
    """Return a TCP port of 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def url_for(port: int, tls: bool) -> str:
    """The feed's URL on 127.0.0.1:``port``."""
    return f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/stocks"


def open_replay(pool: Pool, feed: Feed, port: int = 0) -> ReplayServer:
    """Start a replay feed on 127.0.0.1 serving the pool's stream of ``feed.trades``; stop it."""
    options = ReplayOptions(
        port=port,
        certfile=str(feed.tls[0]) if feed.tls else None,
        keyfile=str(feed.tls[1]) if feed.tls else None,
        accept_keys=frozenset({KEY}),
        events=1,  # the stream below replaces the one ReplayServer generates
        rate=feed.rate,
        timestamps=feed.timestamps,
        seed=pool.seed,
        symbols=pool.symbols,
    )
    server = ReplayServer(options)
    server.stream = pool.stream(feed.trades)
    server.start()
    return server


def child_env() -> dict[str, str]:
    """The environment of the consumers: this one, the API key, the source tree importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASSIVE", "POLYGON"))}
    env["MASSIVE_API_KEY"] = KEY
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def sink_args(pipes: str, pipe_count: str, workdir: str, worker: str, expect: Path) -> list[str]:
    """The arguments of bench/sink.py after the interpreter, before any flag or fd."""
    return [
        str(SINK),
        *("--pipes", pipes, "--pipe-count", pipe_count),
        *("--report", f"{workdir}/report-{worker}.json"),
        *("--expect-file", str(expect), "--done", f"{workdir}/done-{worker}.json"),
        *("--ready", f"{workdir}/ready-{worker}.json"),
    ]


def write_expectation(workdir: Path, expected: dict[int, tuple[int, int]]) -> Path:
    """Write the ``{"pipe": count}`` file the sinks watch for; return its path."""
    path = workdir / "expect.json"
    path.write_text(json.dumps({str(pipe): count for pipe, (count, _) in expected.items()}))
    return path


def run_consumer(
    argv: Sequence[str],
    *,
    pool: Pool,
    feed: Feed,
    port: int,
    workdir: Path,
    workers: int,
    expected: dict[int, tuple[int, int]],
    outcome: Outcome,
    profile: Path | None = None,
) -> Outcome:
    """Run ``argv``, then the feed on ``port`` until the ``workers`` sinks are done.

    Fills and returns ``outcome``. With ``profile``, py-spy samples the consumer into that
    file while it streams.
    """
    log_path = workdir / "consumer.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=workdir
        )
    profiler = None
    server: ReplayServer | None = None
    try:
        if not _wait_for_files(process, workdir, "ready", workers, STREAM_START_TIMEOUT):
            outcome.problems.append(f"the sinks did not all start: {_tail(log_path)}")
            return outcome
        server = open_replay(pool, feed, port)
        before = _wait_for_stream(process, server)
        if before is None:
            outcome.problems.append(f"the stream never started: {_tail(log_path)}")
        else:
            if profile is not None:
                profiler = hotpath.open_profiler(process.pid, profile)
            after = _wait_for_sinks(process, server, workdir, workers, outcome)
            if after is not None:
                outcome.cpu_ns = after[0] - before
                outcome.peak_rss_bytes = after[1]
    finally:
        if profiler is not None:
            hotpath.close_profiler(profiler)
        outcome.exit_code = _stop(process)
        if server is not None:
            server.stop()
    if outcome.exit_code not in (0, None):
        outcome.problems.append(f"consumer exited {outcome.exit_code}: {_tail(log_path)}")
    _check_reports(workdir, workers, expected, outcome)
    return outcome


def _wait_for_files(
    process: subprocess.Popen[bytes], workdir: Path, kind: str, workers: int, timeout: float
) -> bool:
    """Wait until every sink wrote its ``kind`` file; False on timeout or the consumer's exit."""
    paths = [workdir / f"{kind}-{worker}.json" for worker in range(workers)]
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(_DONE_POLL)
    return True


def _wait_for_stream(process: subprocess.Popen[bytes], server: ReplayServer) -> int | None:
    """Return the consumer's CPU time just before the feed sent its first event."""
    deadline = time.monotonic() + STREAM_START_TIMEOUT
    before: int | None = None
    while time.monotonic() < deadline and process.poll() is None:
        try:
            sample = measure.cpu_ns(process.pid)
        except OSError:
            return None
        if server.stats.events_sent:
            return before if before is not None else sample
        before = sample
        time.sleep(_POLL)
    return None


def _wait_for_sinks(
    process: subprocess.Popen[bytes],
    server: ReplayServer,
    workdir: Path,
    workers: int,
    outcome: Outcome,
) -> tuple[int, int] | None:
    """Wait for every done file; return the consumer's (CPU ns, peak RSS) then, or None."""
    done = [workdir / f"done-{worker}.json" for worker in range(workers)]
    sent_all_at: float | None = None
    while True:
        if all(path.exists() for path in done):
            try:
                return measure.cpu_ns(process.pid), measure.peak_rss_bytes(process.pid)
            except OSError:
                outcome.problems.append("the consumer exited before it could be measured")
                return None
        if process.poll() is not None:
            outcome.problems.append("the consumer exited before the sinks got every event")
            return None
        now = time.monotonic()
        if sent_all_at is None and server.stream.exhausted:
            sent_all_at = now
        if server.finished.is_set():
            # Every event is out and the consumer's connection is closed: stop listening, so
            # that its reconnection attempts are refused at once instead of served.
            server.stop()
        if sent_all_at is not None and now - sent_all_at > DRAIN_GRACE:
            missing = [path.name for path in done if not path.exists()]
            outcome.problems.append(
                f"{DRAIN_GRACE:.0f} s after the feed sent everything, no done file from "
                f"{', '.join(missing)}: events are missing"
            )
            return None
        time.sleep(_DONE_POLL)


def _stop(process: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then SIGKILL after 30 s; return the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


def _check_reports(
    workdir: Path, workers: int, expected: dict[int, tuple[int, int]], outcome: Outcome
) -> None:
    """Compare every pipe's (count, crc) with the reference; fill times, latency, problems."""
    got: dict[int, tuple[int, int]] = {}
    firsts, lasts, latency = [], [], []
    payload = errors = skipped = 0
    for worker in range(workers):
        path = workdir / f"report-{worker}.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            outcome.problems.append(f"no report from sink {worker}: {exc}")
            continue
        for pipe, figures in report["pipes"].items():
            if int(pipe) in got:
                outcome.problems.append(f"pipe {pipe} was read by two sinks")
            got[int(pipe)] = (figures["count"], figures["crc"])
            payload += figures["bytes"]
            skipped += figures["skipped"]
        errors += report["error_count"]
        outcome.problems.extend(report["errors"][:3])
        outcome.sink_cpu_s += report["cpu"]
        if report["first_ns"]:
            firsts.append(report["first_ns"])
            lasts.append(report["last_ns"])
        latency.extend(report["latency_ns"])
    crc_too = outcome.verification == "count+crc32"
    for pipe, (count, crc) in sorted(expected.items()):
        have = got.get(pipe)
        if have is None:
            outcome.problems.append(f"pipe {pipe}: no report")
        elif have[0] != count:
            outcome.problems.append(f"pipe {pipe}: {have[0]} events, expected {count}")
        elif crc_too and have[1] != crc:
            outcome.problems.append(f"pipe {pipe}: CRC-32 {have[1]:08x}, expected {crc:08x}")
    if skipped:
        outcome.problems.append(f"the sinks skipped {skipped} bytes (broken framing)")
    if errors:
        outcome.problems.append(f"the sinks found {errors} bad events")
    if firsts:
        outcome.seconds = (max(lasts) - min(firsts)) / 1e9
    outcome.payload_bytes = payload
    outcome.latency_ns = sorted(latency)
    outcome.verified = not outcome.problems and len(got) == len(expected)


def _tail(path: Path, size: int = 2000) -> str:
    """The end of a log file, for a problem's message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-size:].strip()


def python() -> str:
    """The interpreter running the benchmark: the consumers run under it too."""
    return sys.executable
