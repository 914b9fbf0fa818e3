"""The worker library's own speed: messages per second ``Reader.batches()`` takes from a pipe.

Owns one measurement: a writer child fills a pipe of the balancer's size with framed trades
(the pool's events, exactly as the balancer frames them) and keeps it full until it has
written ``messages``; once the pipe is full this process times ``Reader.batches()`` to end of
file, in wall time and in its own CPU time. The writer competes for the two CPUs, so the wall
rate is what a worker gets from a pipe that is never empty, and the CPU rate is the library's
cost alone, steadier on a busy machine.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass

from tradebalancer.pipes import pipe_max_size
from tradebalancer.reader import Reader
from tradebalancer.replay import synth

from .source import Pool

F_SETPIPE_SZ = 1031
BLOCK_EVENTS = 100_000  # distinct events in the writer's block, repeated to the count asked

# The writer: the framed block from a file, written again and again, then the rest.
_WRITER = r"""
import os, sys
path, fd, whole, rest = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with open(path, "rb") as f:
    block = f.read()
for data in [block] * whole + [block[:rest]]:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
"""


@dataclass(frozen=True)
class ReaderRate:
    """Messages read, and how long it took in wall time and in the reader's CPU time."""

    messages: int
    seconds: float
    cpu_seconds: float

    @property
    def per_s(self) -> float:
        """Messages per second of wall time."""
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_s(self) -> float:
        """Messages per second of the reader's CPU time."""
        return self.messages / self.cpu_seconds if self.cpu_seconds else 0.0


def framed_block(pool: Pool, events: int = BLOCK_EVENTS) -> tuple[bytes, list[int]]:
    """Return the pool's first ``events`` events framed, and the end offset of each message."""
    parts: list[bytes] = []
    ends: list[int] = []
    size = 0
    for frame in pool.frames:
        for event in synth.split_events(frame):
            parts.append(len(event).to_bytes(4, "little") + event)
            size += 4 + len(event)
            ends.append(size)
            if len(ends) == events:
                return b"".join(parts), ends
    return b"".join(parts), ends


def measure(block: bytes, ends: list[int], messages: int) -> ReaderRate:
    """Time Reader.batches() over ``messages`` messages of ``framed_block`` from a full pipe."""
    whole, rest = divmod(messages, len(ends))
    rest_bytes = ends[rest - 1] if rest else 0
    with tempfile.NamedTemporaryFile(prefix="tradebalancer-bench-") as data:
        data.write(block)
        data.flush()
        read_fd, write_fd = os.pipe()
        size = fcntl.fcntl(write_fd, F_SETPIPE_SZ, pipe_max_size())
        argv = [sys.executable, "-c", _WRITER, data.name, str(write_fd), str(whole)]
        writer = subprocess.Popen([*argv, str(rest_bytes)], pass_fds=[write_fd])
        os.close(write_fd)
        try:
            _wait_until_full(read_fd, size, writer)
            started, cpu_started = time.perf_counter(), time.process_time()
            count = 0
            with Reader([read_fd]) as reader:
                for _, batch in reader.batches():
                    count += len(batch)
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
        finally:
            writer.wait()
    if count != messages:
        raise RuntimeError(f"the reader got {count} messages, {messages} were written")
    return ReaderRate(count, seconds, cpu)


def _wait_until_full(fd: int, size: int, writer: subprocess.Popen[bytes]) -> None:
    """Wait until the pipe holds all but a message's worth of ``size`` bytes (FIONREAD).

    Also stop once the pipe stopped filling for a second: a large pipe (256 MiB) may take
    less than its nominal size when the kernel cannot back every slot with a page.
    """
    unread = bytearray(4)
    held, since = -1, time.monotonic()
    while writer.poll() is None:
        fcntl.ioctl(fd, termios.FIONREAD, unread)
        now_held = struct.unpack("i", unread)[0]
        if now_held >= size - 4096:
            return
        if now_held != held:
            held, since = now_held, time.monotonic()
        elif time.monotonic() - since > 1.0:
            return
        time.sleep(0.005)
