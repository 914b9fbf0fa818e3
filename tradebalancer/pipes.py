"""The pipes to the workers: creating and sizing them, writing without blocking, backlogs.

Owns every pipe's two file descriptors and the bytes not yet accepted by a pipe. The balancer
keeps each pipe's read end open for the pipe's whole life, so a worker's death never breaks the
pipe (no EPIPE, no SIGPIPE): the data stays in the pipe for the worker's successor.

Writes never block the event loop. The write end is non-blocking; what a full pipe does not
take goes to that pipe's backlog in user space, in order, and is written when the pipe becomes
writable again. One slow worker therefore grows only its own backlog; the service watches the
total against its limit and stops reading the socket past it (backpressure) instead of dropping.

Knows nothing of events or JSON: it moves bytes that are already framed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

from .errors import WorkerError
from .units import format_size

logger = logging.getLogger(__name__)

PIPE_MAX_SIZE_PATH = Path("/proc/sys/fs/pipe-max-size")
DEFAULT_PIPE_SIZE = 65536  # the kernel's default, our floor when sizing fails


def pipe_max_size(path: Path = PIPE_MAX_SIZE_PATH) -> int:
    """Return the largest pipe an unprivileged process may ask for (fs.pipe-max-size)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default for fs.pipe-max-size


class Pipe:
    """One pipe to a worker: the write end is ours, the read end is kept open for the worker."""

    def __init__(self, index: int, read_fd: int, write_fd: int, size: int) -> None:
        self.index = index
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.size = size
        self.backlog: deque[memoryview] = deque()
        self.backlog_bytes = 0
        self.bytes_written = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        """Write ``data`` now or queue it behind the backlog; return the bytes left queued."""
        if self.backlog:
            self.backlog.append(memoryview(data))
            self.backlog_bytes += len(data)
            return self.backlog_bytes
        try:
            written = os.write(self.write_fd, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:  # not EPIPE: we hold the read end; a closed or broken fd
            raise self._broken(exc) from exc
        self.bytes_written += written
        if written < len(data):
            rest = memoryview(data)[written:]
            self.backlog.append(rest)
            self.backlog_bytes += len(rest)
        return self.backlog_bytes

    def flush(self) -> int:
        """Write as much of the backlog as the pipe takes now; return the bytes still queued."""
        backlog = self.backlog
        while backlog:
            chunk = backlog[0]
            try:
                written = os.write(self.write_fd, chunk)
            except BlockingIOError:
                break
            except OSError as exc:
                raise self._broken(exc) from exc
            self.bytes_written += written
            self.backlog_bytes -= written
            if written < len(chunk):
                backlog[0] = chunk[written:]
                break
            backlog.popleft()
        return self.backlog_bytes

    def unread_bytes(self) -> int:
        """Return how many bytes sit in the pipe, written and not yet read by a worker."""
        buffer = bytearray(4)
        fcntl.ioctl(self.read_fd, _FIONREAD, buffer)
        return int.from_bytes(buffer, "little")

    def close_write(self) -> None:
        """Close the write end: a worker reads what the pipe holds, then sees end of file."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def remainder(self) -> Iterator[bytes | memoryview]:
        """Yield what no worker took, in stream order: the bytes left in the pipe (read out
        through our read end, which empties it), then the backlog that never entered it. Only
        once no worker reads the pipe any more."""
        os.set_blocking(self.read_fd, False)
        while True:
            try:
                chunk = os.read(self.read_fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            yield chunk
        yield from self.backlog

    def close(self) -> None:
        """Close both ends (their numbers become -1); a worker reading on sees end of file."""
        if not self.closed:
            self.closed = True
            self.close_write()
            os.close(self.read_fd)
            self.read_fd = -1

    def _broken(self, exc: OSError) -> WorkerError:
        return WorkerError(
            f"cannot write to pipe {self.index}: {exc.strerror or exc} (errno {exc.errno}); "
            "this is a bug, please report it"
        )


class PipeSet:
    """Every pipe of one feed: opened together, written a batch at a time, flushed on stop.

    The service's one view of its pipes: the per-pipe write of a batch, the total backlog, the
    pipes that hold one (to watch for writability), the worst of them, the drain on shutdown.
    """

    def __init__(self, pipes: Sequence[Pipe]) -> None:
        self._pipes = list(pipes)
        self.backlog_bytes = 0  # queued in all backlogs after the last write or flush

    @classmethod
    def open(cls, count: int, size: int, *, largest: bool = False, feed: str = "NAME") -> PipeSet:
        """Open ``count`` pipes of about ``size`` bytes (see ``open_pipes``)."""
        return cls(open_pipes(count, size, largest=largest, feed=feed))

    def __len__(self) -> int:
        return len(self._pipes)

    def __iter__(self) -> Iterator[Pipe]:
        return iter(self._pipes)

    def __getitem__(self, index: int) -> Pipe:
        return self._pipes[index]

    def write_batch(self, out: list[list[bytes]]) -> int:
        """Write each pipe's share of a batch with one write(); return the bytes handed over.

        ``out`` holds one list of chunks per pipe (split.py), emptied here. What a pipe does not
        take now waits in its backlog; ``backlog_bytes`` is the total after the call. One
        write per pipe per batch: about 8x fewer syscalls than one per event.
        """
        written = backlog = 0
        for pipe, chunks in zip(self._pipes, out, strict=True):
            if chunks:
                data = b"".join(chunks)  # one chunk (the C router's) is not copied
                chunks.clear()
                written += len(data)
                backlog += pipe.write(data)
            elif pipe.backlog_bytes:
                backlog += pipe.flush()
        self.backlog_bytes = backlog
        return written

    def flush(self, pipe: Pipe) -> int:
        """Write what ``pipe`` takes of its backlog now; return what it still holds."""
        before = pipe.backlog_bytes
        left = pipe.flush()
        self.backlog_bytes -= before - left
        return left

    def backlogged(self) -> list[Pipe]:
        """The pipes that hold a backlog (to watch for writability)."""
        return [pipe for pipe in self._pipes if pipe.backlog_bytes]

    def worst(self) -> Pipe:
        """The pipe with the largest backlog."""
        return max(self._pipes, key=lambda pipe: pipe.backlog_bytes)

    def drain(
        self,
        timeout: float,
        clock: Callable[[], float],
        readers: Callable[[], Collection[int]] | None = None,
    ) -> int:
        """On shutdown: ``flush_pipes`` over every pipe; log and return what did not fit."""
        left = flush_pipes(self._pipes, timeout, clock, readers)
        self.backlog_bytes = left
        if left:
            logger.error(
                "%s could not reach the workers within %.0f s (a worker is stuck or dead)",
                format_size(left),
                timeout,
            )
        return left

    def close_writes(self) -> None:
        """Close every write end: the workers read what the pipes hold, then end of file."""
        for pipe in self._pipes:
            pipe.close_write()

    def close(self) -> None:
        """Close every pipe."""
        close_pipes(self._pipes)


_FIONREAD = 0x541B  # termios.FIONREAD on Linux


def open_pipes(count: int, size: int, *, largest: bool = False, feed: str = "NAME") -> list[Pipe]:
    """Create ``count`` pipes of about ``size`` bytes, logging the size the kernel granted.

    F_SETPIPE_SZ may grant more than asked (it rounds up to a power-of-two number of pages) or
    refuse: EPERM past fs.pipe-max-size or the per-user page limits, ENOMEM past the largest
    ring of buffer slots the kernel allocates, whatever fs.pipe-max-size says (fs/pipe.c:
    pipe_resize_ring() uses kcalloc; 256 MiB pipes on Debian 12's x86-64 kernel). Then halve
    and retry, so the service still runs with smaller pipes rather than not at all, and warn.
    With ``largest`` (pipe_size = "max") ``size`` is only a ceiling: a pipe the kernel cannot
    make any larger (ENOMEM) is what was asked for, and no warning.
    """
    pipes: list[Pipe] = []
    refusals: set[int] = set()
    try:
        for index in range(count):
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(write_fd, False)
            pipes.append(Pipe(index, read_fd, write_fd, _set_size(write_fd, size, refusals)))
    except OSError as exc:
        close_pipes(pipes)
        raise WorkerError(
            f"cannot create pipe {len(pipes)} of {count}: {exc.strerror}; "
            f"lower feeds.{feed}.pipes or raise the open-file limit (LimitNOFILE=)"
        ) from exc
    granted = "/".join(format_size(s) for s in sorted({pipe.size for pipe in pipes}))
    if not refusals or (largest and refusals == {errno.ENOMEM}):
        logger.info("%d pipes of %s each", count, granted)
    elif refusals == {errno.ENOMEM}:
        logger.warning(
            "%d pipes: asked for %s each, the kernel granted %s, the largest pipe it can "
            "allocate; lower pipe_size",
            count,
            format_size(size),
            granted,
        )
    elif size <= pipe_max_size():
        # EPERM within fs.pipe-max-size: this user's pipes hold more pages than
        # fs.pipe-user-pages-soft allows an unprivileged user (pipe(7))
        logger.warning(
            "%d pipes: asked for %s each, the kernel granted %s: this user's pipes reached "
            "fs.pipe-user-pages-soft; raise it (the package's sysctl.d drop-in sets 0, no "
            "limit), lower pipe_size or pipes, or run with CAP_SYS_RESOURCE",
            count,
            format_size(size),
            granted,
        )
    else:
        logger.warning(
            "%d pipes: asked for %s each, the kernel granted %s; raise fs.pipe-max-size "
            "(the package's sysctl.d drop-in sets 2 GiB)",
            count,
            format_size(size),
            granted,
        )
    return pipes


def _set_size(fd: int, size: int, refusals: set[int]) -> int:
    """Size the pipe ``fd`` to ``size`` or the largest half of it the kernel takes.

    Adds the errno of every refusal to ``refusals``.
    """
    wanted = size  # asked for as is, smaller than the default pipe too (the kernel takes a page)
    while True:
        try:
            return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, wanted)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EINVAL, errno.ENOMEM):
                raise
            refusals.add(exc.errno)
            if wanted <= DEFAULT_PIPE_SIZE:
                return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
            wanted = max(wanted // 2, DEFAULT_PIPE_SIZE)


def flush_pipes(
    pipes: Sequence[Pipe],
    timeout: float,
    clock: Callable[[], float],
    readers: Callable[[], Collection[int]] | None = None,
) -> int:
    """Write every backlog out within ``timeout`` seconds; return the bytes that did not fit.

    Used on shutdown, when the event loop is gone: waits for writability with select().
    ``readers``, asked before each wait, names the pipes a live worker still reads: a pipe
    nobody reads can never take its backlog, so it is not waited for.
    """
    deadline = clock() + timeout
    pending = [pipe for pipe in pipes if pipe.backlog_bytes]
    while pending:
        if readers is not None:
            live = readers()
            pending = [pipe for pipe in pending if pipe.index in live]
        pending = [pipe for pipe in pending if pipe.flush()]
        if not pending or clock() >= deadline:
            break
        select.select([], [pipe.write_fd for pipe in pending], [], 0.05)
    return sum(pipe.backlog_bytes for pipe in pipes)


def close_pipes(pipes: Sequence[Pipe]) -> None:
    """Close every pipe in ``pipes``."""
    for pipe in pipes:
        pipe.close()
