"""Pipes: sizing, non-blocking writes, ordered backlogs, end of file for readers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tradebalancer.pipes import (
    Pipe,
    close_pipes,
    flush_pipes,
    open_pipes,
    pipe_max_size,
)
from tradebalancer.units import format_size


@pytest.fixture
def pipes() -> list[Pipe]:
    opened = open_pipes(2, 65536)
    yield opened
    close_pipes(opened)


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks)


def test_pipes_get_the_size_asked_for(pipes: list[Pipe]) -> None:
    """F_SETPIPE_SZ grants a size the kernel allows, and the pipe reports it."""
    assert [pipe.size for pipe in pipes] == [65536, 65536]
    assert [pipe.index for pipe in pipes] == [0, 1]


def test_a_size_past_the_limit_is_halved_until_granted() -> None:
    """Asking for more than fs.pipe-max-size still yields a working pipe."""
    limit = pipe_max_size()
    opened = open_pipes(1, limit * 8)
    try:
        assert 65536 <= opened[0].size <= limit or os.geteuid() == 0
    finally:
        close_pipes(opened)


def test_a_size_under_the_default_is_granted_too() -> None:
    """pipe_size = 4096 gives 4 KiB pipes: it gave 64 KiB without a word."""
    opened = open_pipes(2, 4096)
    try:
        assert [pipe.size for pipe in opened] == [4096, 4096]
    finally:
        close_pipes(opened)


UNPRIVILEGED_PIPES = """
import logging, sys
from tradebalancer.pipes import open_pipes
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
opened = open_pipes(int(sys.argv[1]), int(sys.argv[2]))
print("sizes", sorted({pipe.size for pipe in opened}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as nobody")
def test_an_unprivileged_users_page_limit_is_named_as_such() -> None:
    """As a user past fs.pipe-user-pages-soft, the warning names that limit, not pipe-max-size
    (which said "raise fs.pipe-max-size" when the size asked was within it)."""
    soft_pages = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    if soft_pages == 0:
        pytest.skip("fs.pipe-user-pages-soft is 0 here: no per-user limit to reach")
    size = min(pipe_max_size(), 1 << 20)
    count = soft_pages * 4096 // size + 8  # past the soft limit by eight pipes
    result = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
            *(sys.executable, "-c", UNPRIVILEGED_PIPES, str(count), str(size)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "fs.pipe-user-pages-soft" in result.stdout, result.stdout
    assert "raise fs.pipe-max-size" not in result.stdout


def test_a_full_pipe_queues_the_rest_in_order_and_flush_delivers_it(pipes: list[Pipe]) -> None:
    """Writes never block: the excess waits in the backlog and arrives after, in order."""
    pipe = pipes[0]
    data = bytes(range(256)) * 1024  # 256 KiB into a 64 KiB pipe
    left = pipe.write(data)
    assert 0 < left < len(data)
    assert pipe.write(b"tail") == left + 4
    received = read_all(pipe.read_fd)
    while pipe.flush():
        received += read_all(pipe.read_fd)
    received += read_all(pipe.read_fd)
    assert received == data + b"tail"
    assert pipe.backlog_bytes == 0
    assert pipe.bytes_written == len(data) + 4


def test_unread_bytes_counts_what_sits_in_the_pipe(pipes: list[Pipe]) -> None:
    """FIONREAD on the kept read end tells how much a worker has not read yet."""
    pipes[1].write(b"x" * 1000)
    assert pipes[1].unread_bytes() == 1000


def test_closing_gives_readers_end_of_file_after_the_data() -> None:
    """A worker holding a duplicate read end reads the data, then end of file."""
    pipe = open_pipes(1, 65536)[0]
    worker_end = os.dup(pipe.read_fd)
    pipe.write(b"last words")
    pipe.close()
    pipe.close()  # idempotent
    assert os.read(worker_end, 100) == b"last words"
    assert os.read(worker_end, 100) == b""
    os.close(worker_end)


def test_pipe_max_size_reads_proc(tmp_path: Path) -> None:
    """The limit comes from fs.pipe-max-size, with the kernel default if unreadable."""
    path = tmp_path / "pipe-max-size"
    path.write_text("2147483648\n")
    assert pipe_max_size(path) == 2147483648
    assert pipe_max_size(tmp_path / "missing") == 1 << 20


@pytest.mark.parametrize(
    ("size", "text"),
    [(512, "512 B"), (65536, "64 KiB"), (1 << 20, "1 MiB"), (3 << 29, "1.5 GiB")],
)
def test_format_size(size: int, text: str) -> None:
    """Sizes are shown in binary units."""
    assert format_size(size) == text


def test_flush_pipes_delivers_backlogs_to_a_reader_and_reports_what_did_not_fit() -> None:
    """On shutdown backlogs drain to a reading worker; a pipe nobody reads keeps the rest."""
    import threading
    import time

    drained, stuck = open_pipes(2, 65536)
    data = b"x" * (200 * 1024)
    drained.write(data)
    stuck.write(data)
    received = bytearray()

    def read() -> None:
        while len(received) < len(data):
            received.extend(os.read(drained.read_fd, 65536))

    reader = threading.Thread(target=read)
    reader.start()
    left = flush_pipes([drained, stuck], 1.0, time.monotonic)
    reader.join(5)
    assert bytes(received) == data
    assert left == stuck.backlog_bytes == len(data) - stuck.size
    close_pipes([drained, stuck])


def test_flush_pipes_does_not_wait_for_a_pipe_no_live_worker_reads() -> None:
    """A backlog whose worker is dead is reported at once, not after the whole timeout."""
    import time

    (orphan,) = open_pipes(1, 65536)
    orphan.write(b"x" * (100 * 1024))
    started = time.monotonic()
    left = flush_pipes([orphan], 10.0, time.monotonic, readers=set)
    assert time.monotonic() - started < 1.0
    assert left == orphan.backlog_bytes == 100 * 1024 - orphan.size
    close_pipes([orphan])
