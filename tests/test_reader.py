"""The worker-side reader: real pipes, many fds, resyncing, errors, end of file, asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from framed import frame, sized, trade

from tradebalancer.reader import (
    LIMIT,
    ProtocolError,
    Reader,
    ReaderError,
    aread,
    aread_batches,
    fds_from_argv,
    fds_from_environment,
)

pytestmark = pytest.mark.usefixtures("framing_loop")

# A child that copies its stdin into the pipe fd given as its argument, then exits.
COPIER = r"""
import os, sys
fd = int(sys.argv[1])
view = memoryview(sys.stdin.buffer.read())
while view:
    view = view[os.write(fd, view):]
"""

# A child that writes `count` framed events to each of its fds in turn: {"fd":INDEX,"i":I}.
ROUND_ROBIN = r"""
import os, sys
count, fds = int(sys.argv[1]), [int(a) for a in sys.argv[2:]]
for i in range(count):
    for index, fd in enumerate(fds):
        body = b'{"fd":%d,"i":%d,"pad":"%s"}' % (index, i, b"x" * (i % 37))
        os.write(fd, len(body).to_bytes(4, "little") + body)
"""


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A fresh pipe; whichever end the test (or a Reader) has not closed is closed after it."""
    read_fd, write_fd = os.pipe()
    inode = os.fstat(read_fd).st_ino
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        # Close only what is still this pipe: a number closed during the test may be reused.
        with contextlib.suppress(OSError):
            if os.fstat(fd).st_ino == inode:
                os.close(fd)


def copy_in_child(write_fd: int, data: bytes) -> subprocess.Popen[bytes]:
    """Start a child that writes ``data`` into ``write_fd``; the caller's copy is closed."""
    child = subprocess.Popen(
        [sys.executable, "-c", COPIER, str(write_fd)], stdin=subprocess.PIPE, pass_fds=[write_fd]
    )
    os.close(write_fd)
    assert child.stdin is not None
    threading.Thread(target=feed_stdin, args=(child, data), daemon=True).start()
    return child


def feed_stdin(child: subprocess.Popen[bytes], data: bytes) -> None:
    assert child.stdin is not None
    child.stdin.write(data)
    child.stdin.close()


def test_fds_from_environment_reads_the_list_the_balancer_sets() -> None:
    """TRADEBALANCER_FDS lists the worker's pipe fds, in pipe order."""
    assert fds_from_environment({"TRADEBALANCER_FDS": "3,4,5"}) == [3, 4, 5]
    assert fds_from_environment({"TRADEBALANCER_FDS": "7"}) == [7]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "TRADEBALANCER_FDS is not set: this worker was not started by tradebalancer"),
        ({"TRADEBALANCER_FDS": ""}, "must list distinct fds like 3,4,5, got ''"),
        ({"TRADEBALANCER_FDS": "3;4"}, "must list distinct fds"),
        ({"TRADEBALANCER_FDS": "3,3"}, "must list distinct fds"),
        ({"TRADEBALANCER_FDS": "-1"}, "must list distinct fds"),
    ],
)
def test_fds_from_environment_says_what_is_wrong(environ: dict[str, str], message: str) -> None:
    """A missing or malformed TRADEBALANCER_FDS is a ReaderError that says what to do."""
    with pytest.raises(ReaderError, match=message):
        fds_from_environment(environ)


def test_fds_from_argv_takes_the_trailing_integers() -> None:
    """The fds are the integer arguments at the end, in order; anything else ends them."""
    assert fds_from_argv(["--name", "w-0", "3", "4", "5"]) == [3, 4, 5]
    assert fds_from_argv(["7"]) == [7]
    assert fds_from_argv(["3", "--verbose"]) == []
    assert fds_from_argv([]) == []
    assert fds_from_argv(["--top=5", "3"]) == [3]
    assert fds_from_argv(["x", "\u0663"]) == []  # an Arabic-Indic digit is not an fd


def test_a_child_process_stream_round_trips(pipe: tuple[int, int]) -> None:
    """Every event a child writes comes out once, in order, byte for byte."""
    read_fd, write_fd = pipe
    bodies = [trade(i) for i in range(5000)]
    stream = b"".join(map(frame, bodies))
    child = copy_in_child(write_fd, stream)
    with Reader([read_fd]) as reader:
        received = list(reader)
    assert child.wait() == 0
    assert received == bodies
    assert (reader.messages, reader.bytes, reader.skipped_bytes) == (5000, len(stream), 0)


def test_several_fds_are_read_as_data_arrives_and_each_keeps_its_order() -> None:
    """Eight pipes written in turn by one child come out per fd, complete and in order."""
    pipes = [os.pipe() for _ in range(8)]
    write_fds = [w for _, w in pipes]
    child = subprocess.Popen(
        [sys.executable, "-c", ROUND_ROBIN, "2000", *map(str, write_fds)], pass_fds=write_fds
    )
    for fd in write_fds:
        os.close(fd)
    read_fds = [r for r, _ in pipes]
    got: dict[int, list[bytes]] = {fd: [] for fd in read_fds}
    with Reader(read_fds) as reader:
        for fd, messages in reader.batches():
            got[fd].extend(messages)
    assert child.wait() == 0
    for index, fd in enumerate(read_fds):
        events = [json.loads(message) for message in got[fd]]
        assert [event["i"] for event in events] == list(range(2000))
        assert {event["fd"] for event in events} == {index}
    assert reader.messages == 8 * 2000


def test_messages_written_byte_by_byte_are_reassembled(pipe: tuple[int, int]) -> None:
    """A writer thread sending one byte per write, read in 3-byte reads, loses nothing."""
    read_fd, write_fd = pipe
    bodies = [trade(i) for i in range(60)] + [b"{}"]
    stream = b"".join(map(frame, bodies))

    def write_slowly() -> None:
        for i in range(len(stream)):
            os.write(write_fd, stream[i : i + 1])
        os.close(write_fd)

    writer = threading.Thread(target=write_slowly)
    writer.start()
    with Reader([read_fd], buffer_size=3) as reader:
        received = [message for _, messages in reader.batches() for message in messages]
    writer.join()
    assert received == bodies


def test_one_megabyte_messages_cross_many_reads(pipe: tuple[int, int]) -> None:
    """Messages of 1 MB through a 64 KiB pipe arrive whole, between small ones."""
    read_fd, write_fd = pipe
    bodies = [sized(1 << 20), trade(1), sized((1 << 20) + 3), trade(2), sized(1 << 20)]
    child = copy_in_child(write_fd, b"".join(map(frame, bodies)))
    with Reader([read_fd], buffer_size=65536) as reader:
        received = list(reader)
    assert child.wait() == 0
    assert received == bodies


def test_a_message_just_below_the_limit_is_accepted(pipe: tuple[int, int]) -> None:
    """The largest event the balancer may send (0x7AFFFF bytes) goes through the reader."""
    read_fd, write_fd = pipe
    bodies = [trade(0), sized(LIMIT - 1), trade(1)]
    child = copy_in_child(write_fd, b"".join(map(frame, bodies)))
    with Reader([read_fd]) as reader:
        received = list(reader)
    assert child.wait() == 0
    assert received == bodies


def test_a_worker_that_died_mid_message_leaves_its_successor_a_clean_start(
    pipe: tuple[int, int],
) -> None:
    """A first worker process reads part of a message and dies; the next one skips the rest."""
    read_fd, write_fd = pipe
    bodies = [trade(i) for i in range(100)]
    stream = b"".join(map(frame, bodies))
    os.write(write_fd, stream)
    os.close(write_fd)
    taken = 3 * len(frame(bodies[0])) + 10  # ten bytes into the fourth message
    dead = subprocess.run(
        [sys.executable, "-c", f"import os; os.read({read_fd}, {taken})"], pass_fds=[read_fd]
    )
    assert dead.returncode == 0
    skipped: list[tuple[int, bytes]] = []
    with Reader([read_fd], on_skip=lambda fd, data: skipped.append((fd, data))) as reader:
        received = list(reader)
    fourth_end = sum(len(frame(body)) for body in bodies[:4])
    assert received == bodies[4:]
    assert b"".join(data for _, data in skipped) == stream[taken:fourth_end]
    assert {fd for fd, _ in skipped} == {read_fd}
    assert reader.skipped_bytes == fourth_end - taken


def test_an_oversized_length_later_raises_after_the_good_messages(pipe: tuple[int, int]) -> None:
    """A header of 0x7B0000 or more after good messages is a ProtocolError naming its offset."""
    read_fd, write_fd = pipe
    good = [trade(i) for i in range(3)]
    good_size = len(b"".join(map(frame, good)))
    os.write(write_fd, b"".join(map(frame, good)) + LIMIT.to_bytes(4, "little") + b"{}")
    os.close(write_fd)
    received: list[bytes] = []
    with Reader([read_fd]) as reader, pytest.raises(ProtocolError) as caught:
        received.extend(reader)
    assert received == good
    assert caught.value.offset == good_size
    assert caught.value.fd == read_fd
    assert "0x7b0000" in str(caught.value)


def test_a_body_that_does_not_open_an_object_raises(pipe: tuple[int, int]) -> None:
    """A body starting with anything but "{" after the first boundary is a ProtocolError."""
    read_fd, write_fd = pipe
    os.write(write_fd, frame(trade(1)) + frame(b"[1,2]") + frame(trade(2)))
    os.close(write_fd)
    received: list[bytes] = []
    with Reader([read_fd]) as reader, pytest.raises(ProtocolError, match=r"not '\{'"):
        received.extend(reader)
    assert received == [trade(1)]


def test_an_unfinished_message_at_end_of_file_is_skipped_and_counted(
    pipe: tuple[int, int],
) -> None:
    """The writer dying mid-message leaves bytes that are reported skipped, not an error."""
    read_fd, write_fd = pipe
    whole = frame(trade(1)) + frame(trade(2))
    os.write(write_fd, whole + frame(trade(3))[:9])
    os.close(write_fd)
    skipped: list[bytes] = []
    with Reader([read_fd], on_skip=lambda fd, data: skipped.append(data)) as reader:
        assert list(reader) == [trade(1), trade(2)]
    assert skipped == [frame(trade(3))[:9]]
    assert reader.skipped_bytes == 9


def test_reading_ends_only_when_every_fd_reached_end_of_file() -> None:
    """An empty pipe that closes first does not end the reading of one still being written."""
    (empty_read, empty_write), (busy_read, busy_write) = os.pipe(), os.pipe()
    os.close(empty_write)
    bodies = [trade(i) for i in range(50)]

    def write_later() -> None:
        for body in bodies:
            os.write(busy_write, frame(body))
        os.close(busy_write)

    writer = threading.Thread(target=write_later)
    with Reader([empty_read, busy_read]) as reader:
        writer.start()
        batches = list(reader.batches())
    writer.join()
    assert {fd for fd, _ in batches} == {busy_read}
    assert [message for _, messages in batches for message in messages] == bodies
    assert reader.open_fds == []


def test_an_idle_reader_with_a_timeout_yields_empty_batches(pipe: tuple[int, int]) -> None:
    """batches(timeout) yields (-1, []) while nothing arrives, then the data, then ends."""
    read_fd, write_fd = pipe
    with Reader([read_fd]) as reader:
        batches = reader.batches(timeout=0.01)
        assert next(batches) == (-1, [])
        os.write(write_fd, frame(trade(1)))
        batch = next(batches)
        while batch == (-1, []):
            batch = next(batches)
        assert batch == (read_fd, [trade(1)])
        os.close(write_fd)
        rest = list(batches)
    assert all(batch == (-1, []) for batch in rest)


def test_close_closes_the_fds_unless_told_not_to() -> None:
    """A Reader owns its fds by default; closefd=False leaves them to the caller."""
    (owned, owned_write), (kept, kept_write) = os.pipe(), os.pipe()
    with Reader([owned]) as reader:
        reader.close()  # closing twice is harmless
    with Reader([kept], closefd=False):
        pass
    with pytest.raises(OSError):
        os.fstat(owned)
    os.fstat(kept)
    for fd in (kept, kept_write, owned_write):
        os.close(fd)


def test_bad_arguments_are_refused() -> None:
    """No fds, a repeated fd, or a zero buffer are programming errors, refused at once."""
    with pytest.raises(ValueError, match="at least one fd"):
        Reader([])
    with pytest.raises(ValueError, match="twice"):
        Reader([5, 5])
    with pytest.raises(ValueError, match="buffer_size"):
        Reader([5], buffer_size=0)


def test_aread_yields_every_message_of_every_fd_and_restores_blocking_mode() -> None:
    """The asyncio reader gets two children's streams whole and leaves the fds blocking."""
    pipes = [os.pipe(), os.pipe()]
    streams = [[trade(i) for i in range(k, 3000, 2)] for k in range(2)]
    children = [
        copy_in_child(write_fd, b"".join(map(frame, bodies)))
        for (_, write_fd), bodies in zip(pipes, streams, strict=True)
    ]
    read_fds = [read_fd for read_fd, _ in pipes]

    async def collect() -> list[bytes]:
        return [message async for message in aread(read_fds, closefd=False)]

    received = asyncio.run(collect())
    assert all(child.wait() == 0 for child in children)
    assert sorted(received) == sorted(streams[0] + streams[1])
    for bodies in streams:
        mine = set(bodies)
        assert [message for message in received if message in mine] == bodies
    assert all(os.get_blocking(fd) for fd in read_fds)
    for fd in read_fds:
        os.close(fd)


def test_aread_batches_resyncs_and_raises_protocol_errors(pipe: tuple[int, int]) -> None:
    """The asyncio batches skip a partial first message and raise on a corrupt header."""
    read_fd, write_fd = pipe
    stream = frame(trade(1)) + frame(trade(2)) + frame(b"(oops)")
    os.write(write_fd, stream[7:])
    os.close(write_fd)
    skipped: list[bytes] = []
    received: list[bytes] = []

    async def collect() -> None:
        batches = aread_batches(
            [read_fd], on_skip=lambda fd, data: skipped.append(data), closefd=False
        )
        async for _, messages in batches:
            received.extend(messages)

    with pytest.raises(ProtocolError, match="0x28"):
        asyncio.run(collect())
    assert received == [trade(2)]
    assert skipped == [stream[7 : len(frame(trade(1)))]]
    assert os.get_blocking(read_fd)
