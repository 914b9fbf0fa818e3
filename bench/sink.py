"""A verifying sink worker: reads its pipes with tradebalancer.reader and reports what it got.

Used by ``make bench`` and by the end-to-end tests as the worker command. Per pipe it keeps the
message count and a CRC-32 chained over every message's bytes in order; the driver computes the
same from the source frames with an independent reference splitter, so equal figures prove
framing, routing, order, and that nothing is missing or repeated, at C speed (one crc32 call
per read batch). Optional per-message work: the route key check and JSON validity (--strict),
latency from the replay feed's embedded send timestamps (--latency), and a full copy of every
message for tests (--record).

For the benchmark: ``--expect-file`` names a JSON object ``{"pipe": count}``; once the sink has
read as many messages as its pipes expect in all, it writes the ``--done`` file (its first and
last receive times so far), so the driver knows when to stop the balancer without a record of
the messages; ``--ready`` names a file it writes once it is about to read, so the driver can
hold the feed back until every sink has started. The sink still reads on to end of file, and
its report counts what came after too: a repeated message makes the verification fail,
whatever the done file said. The report carries ``first_ns`` and ``last_ns``, the
CLOCK_MONOTONIC times of the first and the last read that brought messages.

    python -m bench.sink --pipes 0,1 --report FILE [--strict] [--latency] [--record DIR]
        [--expect-file FILE --done FILE --ready FILE] 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import zlib

import orjson

from tradebalancer.reader import Reader, fds_from_argv
from tradebalancer.routing import DEFAULT_ROUTE_KEYS, pipe_for

_LATENCY = re.compile(rb'"lt":(\d+)')


def main(argv: list[str] | None = None) -> int:
    """Run the sink; write a JSON report at end of file (or on SIGTERM)."""
    argv = sys.argv[1:] if argv is None else argv
    fds = fds_from_argv(argv)
    parser = argparse.ArgumentParser(prog="sink")
    parser.add_argument("--pipes", required=True, help="comma-separated pipe indexes, fd order")
    parser.add_argument("--pipe-count", type=int, default=0, help="N, for the routing check")
    parser.add_argument("--report", required=True)
    parser.add_argument("--strict", action="store_true", help="parse JSON and check routing")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--record", help="directory: append every message to pipe-N.bin")
    parser.add_argument("--crash-after", type=int, default=0, help="exit(1) after N messages")
    parser.add_argument("--crash-once", help="crash only if this file does not exist (creates it)")
    parser.add_argument("--delay", type=float, default=0.0, help="sleep this long per batch")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=-1,
        help="SIGSTOP itself once N messages are read and recorded (0: before reading any)",
    )
    parser.add_argument("--expect-file", help='JSON {"pipe": count}: write --done when all came')
    parser.add_argument("--done", help="the file to write once the expected messages came")
    parser.add_argument("--ready", help="the file to write when about to read")
    args = parser.parse_args(argv[: len(argv) - len(fds)])
    pipes = [int(p) for p in args.pipes.split(",")]
    by_fd = dict(zip(fds, pipes, strict=True))
    count = dict.fromkeys(pipes, 0)
    crc = dict.fromkeys(pipes, 0)
    size = dict.fromkeys(pipes, 0)
    skipped: dict[int, int] = dict.fromkeys(pipes, 0)
    latencies: list[int] = []
    errors: list[str] = []
    records = {}
    if args.record:
        os.makedirs(args.record, exist_ok=True)
        records = {
            p: os.open(
                os.path.join(args.record, f"pipe-{p}.bin"), os.O_WRONLY | os.O_APPEND | os.O_CREAT
            )
            for p in pipes
        }

    def on_skip(fd: int, data: bytes) -> None:
        skipped[by_fd[fd]] += len(data)
        if args.record:
            with open(os.path.join(args.record, f"skipped-{by_fd[fd]}.bin"), "ab") as f:
                f.write(data)

    expected = 0
    if args.expect_file:
        with open(args.expect_file, "rb") as f:
            counts = orjson.loads(f.read())
        expected = sum(int(counts.get(str(p), 0)) for p in pipes)
    done_pending = bool(args.done)
    first_ns = last_ns = 0

    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    reader = Reader(fds, on_skip=on_skip)
    seen = 0
    if args.ready:
        _write_atomically(args.ready, {"pid": os.getpid()})
    if args.stop_after == 0:
        os.kill(os.getpid(), signal.SIGSTOP)  # a worker that never reads
    # The timeout lets an idle sink notice SIGTERM: batches() then yields (-1, []). A batch
    # read is always recorded before stopping: the reader took it from the pipe.
    for fd, messages in reader.batches(timeout=0.25):
        if fd < 0:
            if stop:
                break
            continue
        now = time.monotonic_ns()
        if not first_ns:
            first_ns = now
        last_ns = now
        pipe = by_fd[fd]
        joined = b"".join(messages)
        count[pipe] += len(messages)
        size[pipe] += len(joined)
        crc[pipe] = zlib.crc32(joined, crc[pipe])
        if args.record:
            os.write(records[pipe], b"".join(len(m).to_bytes(4, "little") + m for m in messages))
        if args.latency:
            latencies.extend(now - int(t) for t in _LATENCY.findall(joined))
        if args.strict:
            for message in messages:
                try:
                    event = orjson.loads(message)
                except orjson.JSONDecodeError:
                    errors.append(f"pipe {pipe}: invalid JSON {message[:80]!r}")
                    continue
                field = DEFAULT_ROUTE_KEYS.get(event.get("ev"), "sym")
                key = event.get(field, "")
                if args.pipe_count and pipe_for(str(key).encode(), args.pipe_count) != pipe:
                    errors.append(f"pipe {pipe}: {key!r} belongs on another pipe")
        seen += len(messages)
        if done_pending and seen >= expected:
            done_pending = False
            _write_atomically(args.done, {"first_ns": first_ns, "last_ns": last_ns, "seen": seen})
        if args.crash_after and seen >= args.crash_after:
            if not args.crash_once:
                os._exit(1)
            if not os.path.exists(args.crash_once):
                open(args.crash_once, "w").close()
                os._exit(1)
        if args.stop_after > 0 and seen >= args.stop_after:
            args.stop_after = -1
            os.kill(os.getpid(), signal.SIGSTOP)  # a worker that stops reading: SIGSTOP, a hang
        if args.delay:
            time.sleep(args.delay)
        if stop:
            break
    elapsed = time.monotonic() - started
    latencies.sort()
    report = {
        "pipes": {
            str(p): {"count": count[p], "crc": crc[p], "bytes": size[p], "skipped": skipped[p]}
            for p in pipes
        },
        "errors": errors[:20],
        "error_count": len(errors),
        "elapsed": elapsed,
        "latency_ns": latencies if args.latency else [],
        "cpu": os.times().user + os.times().system,
        "first_ns": first_ns,
        "last_ns": last_ns,
    }
    _write_atomically(args.report, report)
    return 0


def _write_atomically(path: str, value: object) -> None:
    """Write ``value`` as JSON to ``path`` through a rename: a reader never sees half of it."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(value, f)
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
