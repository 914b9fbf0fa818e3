"""A remote worker for the JetStream tests: reads partitions with JetStreamSource, records all.

Appends every event it is handed to ``RECORDS/partition-P.bin`` (framed as on a pipe) and its
monotonic arrival time to ``RECORDS/times-P.txt``, with one write each, so that what the user's
code received survives a kill. ``--crash-at N`` kills the process with SIGKILL when handed its
N-th event of this run, before recording it: a crash inside the user's code. Stops on SIGTERM.

    python tests/jsworker.py --servers URL --stream S --durable D --partitions 2,3
        --records DIR [--cursor FILE] [--credentials FILE] [--crash-at N]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from tradebalancer.reader import ReaderError
from tradebalancer.reader.jetstream import JetStreamSource


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--durable", required=True)
    parser.add_argument("--partitions", required=True)
    parser.add_argument("--records", required=True, type=Path)
    parser.add_argument("--cursor")
    parser.add_argument("--credentials")
    parser.add_argument("--crash-at", type=int, default=0)
    parser.add_argument("--ack-wait", type=float, default=2.0)
    args = parser.parse_args()
    args.records.mkdir(parents=True, exist_ok=True)
    partitions = [int(p) for p in args.partitions.split(",")]
    files = {
        p: os.open(args.records / f"partition-{p}.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        for p in partitions
    }
    times = {
        p: os.open(args.records / f"times-{p}.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        for p in partitions
    }
    try:
        source = JetStreamSource(
            args.servers.split(","),
            stream=args.stream,
            durable=args.durable,
            partitions=partitions,
            credentials=args.credentials,
            cursor=args.cursor,
            ack_wait=args.ack_wait,
        )
        signal.signal(signal.SIGTERM, lambda *_: source.stop())
        handed = 0
        with source:
            (args.records / "ready").touch()
            for message in source:  # one by one: the cursor moves per event
                handed += 1
                if handed == args.crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                partition = source.partition
                os.write(files[partition], len(message).to_bytes(4, "little") + message)
                os.write(times[partition], b"%d\n" % time.monotonic_ns())
    except ReaderError as exc:
        print(f"jsworker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
