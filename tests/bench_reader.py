"""How fast tradebalancer.reader takes messages out of a full pipe (not collected by pytest).

A child process builds the framed stream first (~110-byte trade events, as the feed sends
them), then writes it into a 1 MiB pipe as fast as the pipe takes it; this process waits until
the pipe is full, then times reading everything to end of file. Several ways of reading are
timed on the same data, best of ``--repeat`` runs each, in wall time and in this process's CPU
time (the second is steadier on a shared machine):

    .venv/bin/python tests/bench_reader.py [--messages 3000000] [--repeat 3]

``raw`` reads and discards (the pipe's own ceiling); ``batches`` is ``Reader.batches()``;
``iter`` is ``for message in Reader``; ``asyncio`` is ``aread_batches``; ``parse`` is the
parser alone on in-memory 1 MiB chunks (no pipe, no poll).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable

from tradebalancer.reader import Reader, aread_batches
from tradebalancer.reader.framing import MessageParser

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20

# The child: build every frame first, then only write.
WRITER = r"""
import os, random, sys
count, fd = int(sys.argv[1]), int(sys.argv[2])
random.seed(7)
symbols = [b"SYM%d" % i for i in range(2000)]
frames = []
for i in range(min(count, 200_000)):
    body = b'{"ev":"T","sym":"%s","i":"%d","x":4,"p":%.2f,"s":%d,"c":[14,41],"t":17%011d,"z":3}' % (
        random.choice(symbols), i, random.uniform(1, 900), random.randint(1, 900), i
    )
    frames.append(len(body).to_bytes(4, "little") + body)
block = b"".join(frames)
whole, rest = divmod(count, len(frames))
view = memoryview(block)
for _ in range(whole):
    offset = 0
    while offset < len(block):
        offset += os.write(fd, view[offset:])
tail = b"".join(frames[:rest])
offset = 0
while offset < len(tail):
    offset += os.write(fd, tail[offset:])
"""


def start_writer(count: int) -> tuple[subprocess.Popen[bytes], int]:
    """Start the writer on a fresh 1 MiB pipe; return it and the read end once the pipe is full."""
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_SIZE)
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(count), str(write_fd)], pass_fds=[write_fd]
    )
    os.close(write_fd)
    buffered = bytearray(4)
    while True:  # the pipe is full when FIONREAD stops short of its size only by a frame
        fcntl.ioctl(read_fd, termios.FIONREAD, buffered)
        if struct.unpack("i", buffered)[0] >= PIPE_SIZE - 4096 or child.poll() is not None:
            break
        time.sleep(0.01)
    return child, read_fd


def read_raw(fd: int) -> int:
    """Read and discard; return the bytes read."""
    total = 0
    while data := os.read(fd, 1 << 20):
        total += len(data)
    return total


def read_batches(fd: int) -> int:
    """Reader.batches(); return the messages read."""
    count = 0
    with Reader([fd]) as reader:
        for _, messages in reader.batches():
            count += len(messages)
    return count


def read_iter(fd: int) -> int:
    """``for message in Reader``; return the messages read."""
    count = 0
    with Reader([fd]) as reader:
        for _ in reader:
            count += 1
    return count


def read_asyncio(fd: int) -> int:
    """aread_batches on a fresh event loop; return the messages read."""

    async def run() -> int:
        count = 0
        async for _, messages in aread_batches([fd]):
            count += len(messages)
        return count

    return asyncio.run(run())


def time_pipe(name: str, read: Callable[[int], int], count: int, repeat: int) -> None:
    """Print the best of ``repeat`` runs of ``read`` on a full pipe of ``count`` messages."""
    best = best_cpu = float("inf")
    result = 0
    for _ in range(repeat):
        child, fd = start_writer(count)
        started, started_cpu = time.perf_counter(), time.process_time()
        result = read(fd)
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - started_cpu)
        if name == "raw":
            os.close(fd)
        child.wait()
    if name != "raw" and result != count:
        raise SystemExit(f"{name}: read {result} messages, expected {count}")
    print(
        f"{name:8} {count / best / 1e6:6.2f} M messages/s  {best:6.3f} s wall "
        f"({count / best_cpu / 1e6:.2f} M/s of this process's CPU time)"
    )


def time_parse(count: int, repeat: int) -> None:
    """Print the parser's own speed on the same frames, in 1 MiB chunks from memory."""
    frames = [
        b'{"ev":"T","sym":"SYM%d","i":"%d","x":4,"p":%d.25,"s":%d,"c":[14,41],"t":17000000%05d}'
        % (i % 2000, i, i % 900, i % 700, i % 99999)
        for i in range(count)
    ]
    stream = b"".join(len(frame).to_bytes(4, "little") + frame for frame in frames)
    chunks = [stream[i : i + (1 << 20)] for i in range(0, len(stream), 1 << 20)]
    best = float("inf")
    for _ in range(repeat):
        parser = MessageParser()
        got = 0
        started = time.perf_counter()
        for chunk in chunks:
            got += len(parser.receive_data(chunk))
        best = min(best, time.perf_counter() - started)
        if got != count:
            raise SystemExit(f"parse: got {got} messages, expected {count}")
    size = len(stream) / count
    print(f"{'parse':8} {count / best / 1e6:6.2f} M messages/s  (in memory, {size:.0f} B/frame)")


def main() -> None:
    """Run every approach and print messages per second."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", help="comma-separated: raw,batches,iter,asyncio,parse")
    args = parser.parse_args()
    approaches: dict[str, Callable[[int], int]] = {
        "raw": read_raw,
        "batches": read_batches,
        "iter": read_iter,
        "asyncio": read_asyncio,
    }
    wanted = args.only.split(",") if args.only else [*approaches, "parse"]
    for name, read in approaches.items():
        if name in wanted:
            time_pipe(name, read, args.messages, args.repeat)
    if "parse" in wanted:
        time_parse(args.messages, args.repeat)


if __name__ == "__main__":
    main()
