"""The plain Python baseline: the load balancer as a user would write it first.

Owns the program the balancer is compared with: the websockets asyncio client, ``json`` to
parse each message, ``routing.pipe_for`` (the same FNV-1a mapping, uncached) for each trade's
symbol, and one ``os.write`` of ``[length][json.dumps(event)]`` per trade to the pipe of its
symbol. The pipes have the balancer's size (the kernel's largest unprivileged one) and the
same sinks (``bench/sink.py``) read them, split over the workers as the balancer splits them,
so the two differ only in the code between the socket and the pipes.

The events are re-serialised, so their bytes differ from the feed's (``187.30`` becomes
``187.3``): the driver checks each pipe's count, not its CRC. A user's program runs until it is
stopped; so does this one (SIGTERM), which lets the driver measure its CPU time, as it does the
balancer's, while it is still alive.

    python -m bench.baseline --url URL --pipes 16 --workers 16 --workdir DIR --expect FILE
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from websockets.asyncio.client import connect

from tradebalancer.pipes import pipe_max_size
from tradebalancer.routing import pipe_for

from .harness import (
    KEY,
    Feed,
    Outcome,
    python,
    reserve_port,
    run_consumer,
    sink_args,
    url_for,
    write_expectation,
)
from .source import Pool

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python 3.10+ on Linux), spelt out for type checkers


async def forward(url: str, ca: str | None, fds: list[int]) -> None:
    """Subscribe to every trade and write each to the pipe of its symbol, until the feed ends."""
    context = ssl.create_default_context(cafile=ca) if url.startswith("wss:") else None
    pipes = len(fds)
    for _ in range(3000):  # the feed starts once every sink has: until then, try again
        try:
            ws = await connect(url, ssl=context, server_hostname="localhost" if context else None)
            break
        except ConnectionRefusedError:
            await asyncio.sleep(0.01)
    else:
        raise SystemExit(f"cannot connect to {url}")
    async with ws:
        await ws.send(json.dumps({"action": "auth", "params": KEY}))
        await ws.send(json.dumps({"action": "subscribe", "params": "T.*"}))
        async for message in ws:
            for event in json.loads(message):
                if event.get("ev") != "T":
                    continue  # status messages
                data = json.dumps(event, separators=(",", ":")).encode()
                fd = fds[pipe_for(event["sym"].encode(), pipes)]
                os.write(fd, len(data).to_bytes(4, "little") + data)


async def serve(args: argparse.Namespace, fds: list[int]) -> None:
    """Forward until SIGTERM, staying alive after the feed ends, like a service."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(forward(args.url, args.ca, fds))
    await stop.wait()
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: list[str] | None = None) -> int:
    """Open the pipes, start the sinks, forward until SIGTERM, then let the sinks finish."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", help="trust this CA (wss://)")
    parser.add_argument("--pipes", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--expect", required=True, help="the sinks' --expect-file")
    args = parser.parse_args(argv)
    size = pipe_max_size()
    ends = [os.pipe() for _ in range(args.pipes)]
    for read_fd, write_fd in ends:
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, size)
        os.set_inheritable(read_fd, True)
    sinks = []
    for worker in range(args.workers):
        first = worker * args.pipes // args.workers
        last = (worker + 1) * args.pipes // args.workers
        reads = [ends[pipe][0] for pipe in range(first, last)]
        numbers = ",".join(str(pipe) for pipe in range(first, last))
        command = [
            sys.executable,
            *sink_args(numbers, str(args.pipes), args.workdir, str(worker), args.expect),
            *map(str, reads),
        ]
        sinks.append(subprocess.Popen(command, pass_fds=reads))
    for read_fd, _ in ends:
        os.close(read_fd)
    writes = [write_fd for _, write_fd in ends]
    try:
        asyncio.run(serve(args, writes))
    finally:
        for fd in writes:
            os.close(fd)
        for sink in sinks:
            sink.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run(pool: Pool, pipes: int, workers: int, feed: Feed, ca: Path | None = None) -> Outcome:
    """Run the baseline on ``feed``; return what was measured (counts verified, not bytes)."""
    expected = pool.expected(pipes, feed.trades)
    outcome = Outcome(trades=feed.trades, verification="count")
    with tempfile.TemporaryDirectory(prefix="tradebalancer-bench-") as name:
        workdir = Path(name)
        expect = write_expectation(workdir, expected)
        port = reserve_port()
        argv = [python(), "-m", "bench.baseline", "--url", url_for(port, feed.tls is not None)]
        if ca is not None:
            argv += ["--ca", str(ca)]
        argv += ["--pipes", str(pipes), "--workers", str(workers)]
        argv += ["--workdir", str(workdir), "--expect", str(expect)]
        run_consumer(
            argv,
            pool=pool,
            feed=feed,
            port=port,
            workdir=workdir,
            workers=workers,
            expected=expected,
            outcome=outcome,
        )
    return outcome
