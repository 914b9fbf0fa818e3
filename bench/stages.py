"""The balancer's hot path, stage by stage, in one process: CPU nanoseconds per trade.

Owns a measurement that the machine's other load disturbs little: the service's own objects,
driven the way ``FeedConnection.receive`` and ``Forwarder.forward`` drive them, on the feed's
bytes as the socket hands them over (reads of what the 1 MiB buffer takes behind the frame the
last read cut, so cut anywhere), each stage timed on its own:

* ``websocket``: ``Feed.receive_data`` and ``messages_received`` (frames.py: the frame
  headers walked in the receive buffer, the frame a read cut kept at its front; websockets'
  parser only for what is not a plain data frame);
* ``split``: ``Splitter.route_frames`` of each run of frames into the per-pipe lists (the C
  router, straight from the buffer);
* ``join``: the ``b"".join`` of each pipe's list, once per batch;
* ``write``: one ``os.write`` per pipe per batch into real pipes of the service's size, no
  reader waiting on them (the pipes are drained between batches, untimed), so a sink's
  wake-up is not in it.

Beside the stages, ``split_python`` times the same routing with the C router off (the Python
fast path the service falls back to when the extension is not built), for the ratio, and
``validate`` the router's JSON check on its own (``valid_ascii_json`` over every message): the
part of ``split`` that keeps invalid JSON from the workers.

The sum is a floor for the service's CPU per trade; what the service spends above it goes to
the event loop, ``recv_into``, waking the workers, page faults and caches shared with the
other processes. The Feed is taken through the feed's handshake first, by bytes from
websockets' ``ServerProtocol``, so it is in the state it streams in.
"""

from __future__ import annotations

import bisect
import fcntl
import os
import time
from dataclasses import dataclass

from websockets.http11 import Request
from websockets.server import ServerProtocol

from tradebalancer._fastsplit import valid_ascii_json
from tradebalancer.feed import Feed
from tradebalancer.frames import Run
from tradebalancer.frames import messages as frame_messages
from tradebalancer.pipes import pipe_max_size
from tradebalancer.replay.stream import AUTH_SUCCESS, CONNECTED, frame_header, status
from tradebalancer.split import Splitter

from .source import Pool

F_SETPIPE_SZ = 1031
BATCH_BYTES = 1 << 20  # the service's default batch_bytes
STAGES = ("websocket", "split", "join", "write")
SAMPLE_TRADES = 300_000  # enough for the symbol caches to be warm most of the time


@dataclass(frozen=True)
class StageCost:
    """CPU nanoseconds per trade of each stage, for one pipe count."""

    pipes: int
    trades: int
    ns_per_trade: dict[str, float]
    split_python: float  # ns per trade of the split stage without the C router
    validate: float  # ns per trade of the router's JSON check alone (part of split)

    @property
    def total(self) -> float:
        """The sum of the stages."""
        return sum(self.ns_per_trade.values())


def streaming_feed() -> Feed:
    """Return a Feed that went through the upgrade, auth and subscription: streaming."""
    feed = Feed("ws://127.0.0.1:1/stocks", "key", ["T.*"], now=0.0)
    server = ServerProtocol()
    server.receive_data(b"".join(feed.data_to_send()))
    for event in server.events_received():
        if isinstance(event, Request):
            server.send_response(server.accept(event))
    server.send_text(CONNECTED)
    server.send_text(AUTH_SUCCESS)
    server.send_text(status("success", "subscribed to: T.*"))
    feed.receive_data(b"".join(server.data_to_send()), 0.0)
    feed.data_to_send()  # auth and subscribe: nobody to send them to
    if not feed.streaming:
        raise RuntimeError(f"the feed did not reach streaming: {feed.phase}, {feed.outcome(0.0)}")
    return feed


@dataclass(frozen=True)
class Wire:
    """The first frames of a pool as the socket sends them, and their trade count."""

    stream: bytes  # unmasked websocket frames, joined: read in pieces of what the buffer takes
    trades: int


def wire_batches(pool: Pool, trades: int = SAMPLE_TRADES) -> Wire:
    """Return the first frames of the pool with ``trades`` trades or more, as the wire has them."""
    end = pool.boundary(min(trades, pool.events))
    frames = pool.frames[: bisect.bisect_left(pool.cumulative, end) + 1]
    return Wire(b"".join(frame_header(len(frame)) + frame for frame in frames), end)


def measure(wire: Wire, pipes: int) -> StageCost:
    """Time each stage over ``wire`` once; return ns per trade by stage."""
    feed = streaming_feed()
    splitter = Splitter(pipes)
    if not splitter.accelerated:
        raise RuntimeError("the C router is not built: pip install -e . builds it")
    python = Splitter(pipes, accelerate=False)
    python_spent = validate_spent = 0
    out: list[list[bytes]] = [[] for _ in range(pipes)]
    status_events: list[bytes] = []
    stamps: list[float] = []
    ends = [os.pipe() for _ in range(pipes)]
    size = pipe_max_size()
    for read_fd, write_fd in ends:
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, size)
        os.set_blocking(read_fd, False)
    spent = dict.fromkeys(STAGES, 0)
    clock = time.process_time_ns
    trades = 0
    buffer = memoryview(bytearray(BATCH_BYTES))
    stream, at = memoryview(wire.stream), 0
    max_size = 16 << 20
    try:
        while at < len(stream):
            # The read, untimed: the kernel's copy, behind the frame the last read cut.
            kept = feed.keep(buffer)
            count = min(len(buffer) - kept, len(stream) - at)
            buffer[kept : kept + count] = stream[at : at + count]
            at += count
            started = clock()
            feed.receive_data(buffer[: kept + count], 0.0)
            messages = feed.messages_received()
            parsed = clock()
            for message in messages:
                if type(message) is Run:
                    trades += splitter.route_frames(
                        message.view, max_size, out, status_events, stamps
                    )[1]
                else:
                    trades += splitter.route(message, out, status_events)
            routed = clock()
            joined = []
            for chunks in out:
                joined.append(b"".join(chunks))
                chunks.clear()
            done_joining = clock()
            for (_, write_fd), data in zip(ends, joined, strict=True):
                if data:
                    os.write(write_fd, data)
            written = clock()
            spent["websocket"] += parsed - started
            spent["split"] += routed - parsed
            spent["join"] += done_joining - routed
            spent["write"] += written - done_joining
            payloads = frame_messages(messages)  # copied out, untimed: for the two below
            started = clock()
            for message in payloads:
                python.route(message, out, status_events)
            python_spent += clock() - started
            started = clock()
            for message in payloads:
                if not valid_ascii_json(message):
                    raise RuntimeError(f"the feed's own frame fails the check: {message[:80]!r}")
            validate_spent += clock() - started
            for chunks in out:
                chunks.clear()
            stamps.clear()
            for read_fd, _ in ends:  # untimed: the sinks' part
                while True:
                    try:
                        if not os.read(read_fd, size):
                            break
                    except BlockingIOError:
                        break
    finally:
        for read_fd, write_fd in ends:
            os.close(read_fd)
            os.close(write_fd)
    if trades != wire.trades:
        raise RuntimeError(f"routed {trades} trades of {wire.trades}")
    return StageCost(
        pipes,
        trades,
        {stage: spent[stage] / trades for stage in STAGES},
        python_spent / trades,
        validate_spent / trades,
    )
