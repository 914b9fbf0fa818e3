"""The verifying sink on a "remote host": bench/sink.py's reports, read from JetStream.

Reads the partitions with ``tradebalancer.reader.jetstream`` (a durable consumer, batches) and
writes the same ready, done and report files as ``bench/sink.py`` (count and CRC-32 chained
per partition, latencies from the feed's ``"lt"`` stamps), so ``bench/harness.py`` measures
and verifies a JetStream run exactly as a pipe run. It starts before the balancer and waits
for the stream the bridge creates. Stops on SIGTERM.

    python -m bench.jssink --servers URL --stream S --durable D --pipes 0,1,2,3
        --report FILE --expect-file FILE --done FILE --ready FILE [--latency]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import zlib

from tradebalancer.reader import ReaderError
from tradebalancer.reader.jetstream import JetStreamSource

from .sink import _LATENCY, _write_atomically


def open_source(args: argparse.Namespace, pipes: list[int]) -> JetStreamSource:
    """Open the consumer, waiting up to a minute for the bridge to create the stream."""
    deadline = time.monotonic() + 60
    while True:
        source = JetStreamSource(
            args.servers.split(","), stream=args.stream, durable=args.durable, partitions=pipes
        )
        try:
            return source.__enter__()
        except ReaderError as exc:
            if "no JetStream stream" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser()
    for name in ("--servers", "--stream", "--durable", "--pipes", "--report", "--expect-file"):
        parser.add_argument(name, required=True)
    parser.add_argument("--done", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()
    pipes = [int(p) for p in args.pipes.split(",")]
    with open(args.expect_file) as file:
        counts = json.load(file)
    expected = sum(counts.get(str(p), 0) for p in pipes)
    count = dict.fromkeys(pipes, 0)
    size = dict.fromkeys(pipes, 0)
    crc = dict.fromkeys(pipes, 0)
    latencies: list[int] = []
    first_ns = last_ns = seen = 0
    source = open_source(args, pipes)
    signal.signal(signal.SIGTERM, lambda *_: source.stop())
    _write_atomically(args.ready, {"pid": os.getpid()})
    try:
        for partition, messages in source.batches(timeout=0.25):
            if partition < 0:
                continue
            now = time.monotonic_ns()
            first_ns = first_ns or now
            last_ns = now
            joined = b"".join(messages)
            count[partition] += len(messages)
            size[partition] += len(joined)
            crc[partition] = zlib.crc32(joined, crc[partition])
            if args.latency:
                latencies.extend(now - int(t) for t in _LATENCY.findall(joined))
            before, seen = seen, seen + len(messages)
            if before < expected <= seen:  # the report first: the driver reads it at once
                write_report(args, pipes, count, size, crc, latencies, first_ns, last_ns)
                done = {"first_ns": first_ns, "last_ns": last_ns, "seen": seen}
                _write_atomically(args.done, done)
    finally:
        source.__exit__(None, None, None)
    write_report(args, pipes, count, size, crc, latencies, first_ns, last_ns)
    return 0


def write_report(
    args: argparse.Namespace,
    pipes: list[int],
    count: dict[int, int],
    size: dict[int, int],
    crc: dict[int, int],
    latencies: list[int],
    first_ns: int,
    last_ns: int,
) -> None:
    """Write the report as bench/sink.py does."""
    report = {
        "pipes": {
            str(p): {"count": count[p], "crc": crc[p], "bytes": size[p], "skipped": 0}
            for p in pipes
        },
        "errors": [],
        "error_count": 0,
        "latency_ns": sorted(latencies),
        "cpu": os.times().user + os.times().system,
        "first_ns": first_ns,
        "last_ns": last_ns,
    }
    _write_atomically(args.report, report)


if __name__ == "__main__":
    sys.exit(main())
