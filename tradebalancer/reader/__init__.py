"""tradebalancer.reader: the worker library. Reads the balancer's framed events, fast.

Owns the worker's side of the pipes: the pipe format (``format``: the header, the length limit,
the first fd), cutting one pipe's bytes into messages (``framing``: sans-I/O, with a C loop),
and reading a worker's pipes (``Reader`` here: waiting on several at once with poll or the
asyncio loop, each read into one reused buffer). ``sample`` is a whole worker, for the demo.
Knows nothing of what an event means, never writes to a pipe, and imports nothing from the
rest of tradebalancer nor any third-party package: a worker host installs it alone
(``tradebalancer-reader``), and a worker that uses it starts fast and stays small.

Writing a worker
----------------
The balancer starts a worker with its pipes' read ends as descriptors 3, 4, ... and (with
``pass_fds = "append"``, the C original's contract) appends those numbers to its arguments.
Each pipe carries ``[u32 little-endian length][the event's JSON bytes exactly as the feed sent
them]``, over and over. A whole worker::

    import sys
    import orjson
    from tradebalancer.reader import Reader, fds_from_argv

    volume: dict[str, int] = {}
    with Reader(fds_from_argv(sys.argv[1:])) as reader:
        for fd, messages in reader.batches():  # one list per read: the fast way
            for message in messages:
                event = orjson.loads(message)
                if event["ev"] == "T":
                    volume[event["sym"]] = volume.get(event["sym"], 0) + event["s"]
    print(volume)  # every pipe reached end of file: the balancer stopped

``for message in reader`` yields the messages one by one; ``async for message in aread(fds)``
does the same on the asyncio loop. Messages are ``bytes``, one event's JSON object each.

Speed notes, measured with ``tests/bench_reader.py`` (2-core VM, ~110-byte trades, a 1 MiB
pipe kept full by a writer process): ``batches()`` takes 19-21 M messages/s (23-26 M/s of the
reader's own CPU time), ``for message in reader`` 10-13 M/s, ``aread_batches`` 14-20 M/s.
Every read lands in one reused buffer: from a full pipe that is as fast as ``os.read``, and
when the balancer's writes are smaller than the buffer, as they are whenever a worker keeps up,
much cheaper (an 8 KiB write read with ``os.read(fd, 1 MiB)`` cost 61 us of CPU, with
``readv`` into the buffer 5.4 us: the fresh 1 MiB block ``os.read`` allocates is mapped anew
each time and faults its pages in).
"""

from __future__ import annotations

import asyncio
import math
import os
import select
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import TracebackType

from .format import FDS_VARIABLE, FIRST_FD, LIMIT
from .framing import MessageParser, ProtocolError, ReaderError

# The worker's API, the format's and the framing's names included: ``except ProtocolError``
# needs no other import.
__all__ = [
    "FDS_VARIABLE",
    "FIRST_FD",
    "LIMIT",
    "MessageParser",
    "ProtocolError",
    "Reader",
    "ReaderError",
    "SkipCallback",
    "aread",
    "aread_batches",
    "fds_from_argv",
    "fds_from_environment",
]

SkipCallback = Callable[[int, bytes], object]


def fds_from_environment(environ: Mapping[str, str] | None = None) -> list[int]:
    """Return the worker's pipe fds, in pipe order, from ``TRADEBALANCER_FDS`` ("3,4,5").

    The balancer sets it for every worker, as systemd sets LISTEN_FDS: the fds cannot be
    confused with the worker's own arguments. Raises ReaderError, saying what to do, when the
    variable is missing or malformed (a worker started by hand: set it, or pass the fds).
    """
    environ = os.environ if environ is None else environ
    value = environ.get(FDS_VARIABLE)
    if value is None:
        raise ReaderError(
            f"{FDS_VARIABLE} is not set: this worker was not started by tradebalancer; set "
            f"{FDS_VARIABLE}=3,4 to read fds 3 and 4 by hand"
        )
    try:
        fds = [int(part) for part in value.split(",")]
    except ValueError:
        fds = []
    if not fds or min(fds) < 0 or len(set(fds)) != len(fds):
        raise ReaderError(f"{FDS_VARIABLE} must list distinct fds like 3,4,5, got {value!r}")
    return fds


def fds_from_argv(argv: Sequence[str]) -> list[int]:
    """Return the trailing integer arguments: the fds the balancer appended, in pipe order.

    ``["--name", "x", "3", "4"]`` gives ``[3, 4]``. An option whose integer value comes last
    would be taken for an fd (``--top 5 3 4`` gives ``[5, 3, 4]``): write ``--top=5``, put it
    earlier, or declare the fds as an argparse positional instead.
    """
    fds: list[int] = []
    for argument in reversed(argv):
        if not (argument.isascii() and argument.isdigit()):
            break
        fds.append(int(argument))
    fds.reverse()
    return fds


class Reader:
    """Reads framed messages from several pipe fds as they arrive, until all reach end of file.

    The fds are the Reader's (``close`` closes them) unless ``closefd=False``. It never changes
    an fd's flags in the synchronous API: a blocking read after poll() reports data cannot
    block, and the fds are shared with the balancer, which keeps their read ends open.
    """

    def __init__(
        self,
        fds: Sequence[int],
        *,
        buffer_size: int = 1 << 20,
        on_skip: SkipCallback | None = None,
        closefd: bool = True,
    ) -> None:
        if not fds:
            raise ValueError("Reader needs at least one fd")
        if len(set(fds)) != len(fds):
            raise ValueError(f"Reader got an fd twice: {list(fds)}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.fds = list(fds)
        # Reads past LIMIT would send the parse loop down its checked path; a 1 MiB pipe never
        # holds more than 1 MiB anyway.
        self.buffer_size = min(buffer_size, 1 << 22)
        # Every read lands in this one buffer, the messages are copied out (see speed notes).
        self._buffers = [bytearray(self.buffer_size)]
        self._view = memoryview(self._buffers[0])
        self.on_skip = on_skip
        self.closefd = closefd
        self.parsers = {fd: MessageParser(fd) for fd in self.fds}
        self.open_fds = list(self.fds)  # the fds that have not reached end of file
        self.skipped_bytes = 0
        self.messages = 0
        self.bytes = 0  # read from the fds: headers, bodies and skipped bytes
        self.closed = False

    def __enter__(self) -> Reader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        """Yield the messages one by one, from whichever fd has data, until all reach EOF."""
        for _, messages in self.batches():
            yield from messages

    def batches(self, timeout: float | None = None) -> Iterator[tuple[int, list[bytes]]]:
        """Yield ``(fd, messages)`` per read, until every fd reached end of file.

        With ``timeout``, ``(-1, [])`` is yielded whenever that many seconds pass without a
        batch, so a worker can do periodic work (print, flush) while its pipes are idle.
        """
        poller = select.poll()
        for fd in self.open_fds:
            poller.register(fd, select.POLLIN)
        read = self._read
        wait_ms: int | None = None
        deadline = 0.0 if timeout is None else time.monotonic() + timeout
        while self.open_fds:
            if timeout is not None:
                now = time.monotonic()
                if now >= deadline:
                    deadline = now + timeout
                    yield -1, []
                    continue
                wait_ms = math.ceil((deadline - now) * 1000)
            for fd, _ in poller.poll(wait_ms):
                try:
                    data = read(fd)
                except BlockingIOError:  # O_NONBLOCK set elsewhere, and a spurious wake-up
                    continue
                if not data:
                    poller.unregister(fd)
                messages = self._receive(fd, data)
                if messages:
                    if timeout is not None:
                        deadline = time.monotonic() + timeout
                    yield fd, messages
                self._check(fd)

    async def abatches(self) -> AsyncIterator[tuple[int, list[bytes]]]:
        """Yield ``(fd, messages)`` per read on the running asyncio loop, until all reach EOF.

        The fds are made non-blocking for the duration and given back their flags after. An
        fd is read again only once its batch has been consumed, so a slow consumer slows the
        reading down rather than piling data up in memory.
        """
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[int] = asyncio.Queue()
        was_blocking = {fd: os.get_blocking(fd) for fd in self.open_fds}

        def on_readable(fd: int) -> None:
            loop.remove_reader(fd)
            ready.put_nowait(fd)

        try:
            for fd in self.open_fds:
                os.set_blocking(fd, False)
                loop.add_reader(fd, on_readable, fd)
            while self.open_fds:
                fd = await ready.get()
                data: memoryview | None
                try:
                    data = self._read(fd)
                except BlockingIOError:
                    data = None
                if data is None or data:
                    loop.add_reader(fd, on_readable, fd)
                if data is None:
                    continue
                messages = self._receive(fd, data)
                if messages:
                    yield fd, messages
                self._check(fd)
        finally:
            for fd, blocking in was_blocking.items():
                loop.remove_reader(fd)
                if not self.closed:
                    os.set_blocking(fd, blocking)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Yield the messages one by one on the running asyncio loop."""
        async for _, messages in self.abatches():
            for message in messages:
                yield message

    def close(self) -> None:
        """Close the fds (unless ``closefd=False``); idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.closefd:
            for fd in self.fds:
                os.close(fd)

    def _read(self, fd: int) -> memoryview:
        """Read what ``fd`` holds (up to ``buffer_size``) into the reused buffer."""
        return self._view[: os.readv(fd, self._buffers)]

    def _receive(self, fd: int, data: memoryview) -> list[bytes]:
        parser = self.parsers[fd]
        self.bytes += len(data)
        if data:
            messages = parser.receive_data(data)
        else:
            parser.receive_eof()
            self.open_fds.remove(fd)
            messages = []
        self.messages += len(messages)
        if parser.skipped_bytes:  # only ever non-zero on a pipe that started mid-message
            for run in parser.skipped_received():
                self.skipped_bytes += len(run)
                if self.on_skip is not None:
                    self.on_skip(fd, run)
        return messages

    def _check(self, fd: int) -> None:
        error = self.parsers[fd].error
        if error is not None:
            raise error


async def aread(
    fds: Sequence[int],
    *,
    buffer_size: int = 1 << 20,
    on_skip: SkipCallback | None = None,
    closefd: bool = True,
) -> AsyncIterator[bytes]:
    """Yield the messages of ``fds`` one by one on the running asyncio loop, until all reach EOF."""
    with Reader(fds, buffer_size=buffer_size, on_skip=on_skip, closefd=closefd) as reader:
        async for message in reader:
            yield message


async def aread_batches(
    fds: Sequence[int],
    *,
    buffer_size: int = 1 << 20,
    on_skip: SkipCallback | None = None,
    closefd: bool = True,
) -> AsyncIterator[tuple[int, list[bytes]]]:
    """Yield ``(fd, messages)`` per read on the running asyncio loop: the fast asyncio way."""
    with Reader(fds, buffer_size=buffer_size, on_skip=on_skip, closefd=closefd) as reader:
        async for batch in reader.abatches():
            yield batch
