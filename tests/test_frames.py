"""Frames read in place: the walk in C against frames.py, the feed with and without it, and
the routing of a run against routing each payload.

The reference everywhere is what websockets' own parser and Splitter.route give, so the
path straight from the buffer can only change speed: the same messages in the same order, the
same pongs, the same close, and the same bytes on each pipe.
"""

from __future__ import annotations

import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_feed import AUTH_OK, CONNECTED, TRADES, Peer, ended, new_feed, subscribed
from test_split import POLYGON_FRAMES, new_out, pipe_events

from tradebalancer import _fastsplit, frames
from tradebalancer.delay import event_time
from tradebalancer.errors import FrameError
from tradebalancer.feed import Feed
from tradebalancer.frames import Deframer, Run, frame_bounds, messages, payloads
from tradebalancer.split import Splitter

MAX_SIZE = 1 << 16


def header(head: int, length: int, *, masked: bool = False, wide: int = 0) -> bytes:
    """A frame header: ``wide`` forces the 2-byte (16) or 8-byte (64) length."""
    mask = 0x80 if masked else 0
    if length < 126 and not wide:
        data = bytes([head, mask | length])
    elif length < 1 << 16 and wide != 64:
        data = bytes([head, mask | 126]) + struct.pack("!H", length)
    else:
        data = bytes([head, mask | 127]) + struct.pack("!Q", length)
    return data + (b"\x01\x02\x03\x04" if masked else b"")


def frame(payload: bytes, head: int = 0x81, **options: object) -> bytes:
    return header(head, len(payload), **options) + payload  # type: ignore[arg-type]


HEADS = st.sampled_from([0x81, 0x82, 0x01, 0x80, 0x89, 0x8A, 0x88, 0xC1, 0x91, 0x83])
PAYLOADS = st.binary(max_size=300) | st.sampled_from(
    [TRADES, b'[{"ev":"status","status":"info"}]', b"", b"x" * 200]
)
WIRE_FRAMES = st.builds(
    lambda head, payload, masked, wide: frame(payload, head, masked=masked, wide=wide),
    HEADS,
    PAYLOADS,
    st.booleans(),
    st.sampled_from([0, 0, 16, 64]),
)


@given(st.lists(WIRE_FRAMES, max_size=8), st.integers(0, 4000), st.integers(0, 400))
@settings(max_examples=600, deadline=None)
def test_the_c_walk_ends_each_run_where_frames_py_does(
    wire: list[bytes], cut: int, max_size: int
) -> None:
    """Any bytes, cut anywhere, from any start: C and Python agree where plain frames stop."""
    data = b"".join(wire)[:cut]
    for start in range(0, len(data) + 1, 7):
        assert _fastsplit.plain_frames(data, start, max_size) == frames._plain_frames(
            data, start, max_size
        )


@pytest.mark.parametrize(
    ("data", "bounds"),
    [
        (frame(b"abc"), (True, 2, 5)),
        (frame(b"abc", 0x82, wide=16), (True, 4, 7)),
        (frame(b"abc", 0x81, wide=64), (True, 10, 13)),
        (frame(b"abc", 0x01), (False, 2, 5)),  # a fragment
        (frame(b"abc", 0x89), (False, 2, 5)),  # a ping
        (frame(b"abc", 0xC1), (False, 2, 5)),  # RSV1: compressed, never negotiated
        (frame(b"abc", masked=True), (False, 6, 9)),
        (frame(b"a" * 70000), (False, 10, 70010)),  # over MAX_SIZE
        (b"\x81", None),
        (b"\x81\x7e\x00", None),
        (b"\x81\x7f" + b"\x00" * 7, None),
        (b"\x81\x7f" + b"\xff" * 8, (False, 10, 10 + (1 << 62))),
    ],
)
def test_frame_bounds(data: bytes, bounds: tuple[bool, int, int] | None) -> None:
    assert frame_bounds(data, 0, MAX_SIZE) == bounds


def test_a_status_message_ends_a_run_for_the_feed_to_read() -> None:
    status = frame(b'[{"ev":"status","status":"success"}]')
    data = frame(TRADES) + status + frame(TRADES)
    assert frames.plain_frames(data, 0, MAX_SIZE) == len(frame(TRADES))
    assert _fastsplit.plain_frames(data, 0, MAX_SIZE) == len(frame(TRADES))


# -- the feed: the same conversation, whatever the reads ------------------------------------


def streaming(feed: Feed) -> Peer:
    peer = Peer(feed)
    peer.send(CONNECTED)
    peer.send(AUTH_OK)
    peer.send(subscribed("T.*"))
    peer.send(subscribed("Q.AAPL"))
    assert feed.streaming
    return peer


SERVER_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.sampled_from([TRADES, TRADES[::-1], b"[]"])),
        st.tuples(st.just("binary"), st.just(TRADES)),
        st.tuples(st.just("ping"), st.binary(max_size=8)),
        st.tuples(st.just("fragments"), st.integers(1, len(TRADES) - 1)),
        st.tuples(st.just("status"), st.just(b'[{"ev":"status","status":"info","message":"x"}]')),
        st.tuples(st.just("big"), st.integers(300, 2000)),
    ),
    max_size=12,
)


def play(
    steps: list[tuple[str, object]], reads: list[int], *, keep: bool
) -> tuple[list[bytes], list[bytes], str]:
    """The messages, the pongs and how it ended when a server's frames reach a streaming feed
    in reads of the given sizes, through a buffer with ``keep`` (as the service reads) or as
    bytes."""
    feed = new_feed(keep_limit=256)
    peer = streaming(feed)
    server = peer.server
    for kind, value in steps:
        if kind == "text" or kind == "status":
            server.send_text(value)  # type: ignore[arg-type]
        elif kind == "binary":
            server.send_binary(value)  # type: ignore[arg-type]
        elif kind == "ping":
            server.send_ping(value)  # type: ignore[arg-type]
        elif kind == "fragments":
            server.send_text(TRADES[:value], fin=False)  # type: ignore[misc]
            server.send_continuation(TRADES[value:], fin=True)  # type: ignore[misc]
        elif kind == "big":
            message = orjson.dumps([{"ev": "T", "sym": "X", "pad": "p" * int(value)}])  # type: ignore[call-overload]
            server.send_text(message)
    server.send_close(1000, "bye")
    wire = b"".join(server.data_to_send())
    buffer = memoryview(bytearray(1024))
    got: list[bytes] = []
    at = 0
    sizes = iter(reads)
    while at < len(wire) and not feed.closed:
        size = max(1, next(sizes, 97))
        if keep:
            kept = feed.keep(buffer)
            size = min(size, len(buffer) - kept, len(wire) - at)
            buffer[kept : kept + size] = wire[at : at + size]
            feed.receive_data(buffer[: kept + size], 0.0)
        else:
            feed.receive_data(wire[at : at + size], 0.0)
        at += size
        got.extend(messages(feed.messages_received()))  # before the next read reuses the buffer
    peer.pump(0.0)
    return got, peer.pongs, str(ended(feed).error)


@given(SERVER_STEPS, st.lists(st.integers(1, 700), max_size=40))
@settings(max_examples=300, deadline=None)
def test_any_frames_cut_anywhere_give_websockets_own_conversation(
    steps: list[tuple[str, object]], reads: list[int]
) -> None:
    """Data, binary, fragmented, status, ping and frames longer than the keep limit, in reads
    of any size: the messages, pongs and close are those of one read of everything, with the
    buffer kept or bytes handed over."""
    reference = play(steps, [1 << 20], keep=False)
    assert play(steps, reads, keep=True) == reference
    assert play(steps, reads, keep=False) == reference
    data = [m for m in reference[0]]
    assert len(data) == sum(kind != "ping" and kind != "status" for kind, _ in steps)


def test_the_kept_frame_survives_a_read_that_found_nothing() -> None:
    """keep() twice without a split between (the read raised BlockingIOError): same bytes."""
    deframer = Deframer(MAX_SIZE, 1024)
    buffer = memoryview(bytearray(64))
    wire = frame(b"x" * 40)
    buffer[:20] = wire[:20]
    assert deframer.split(buffer[:20]) == []
    assert deframer.keep(buffer) == 20
    assert deframer.keep(buffer) == 20
    buffer[20 : len(wire)] = wire[20:]
    pieces = deframer.split(buffer[: len(wire)])
    assert [bytes(p.view) for p in pieces if isinstance(p, Run)] == [wire]


def test_a_frame_longer_than_the_keep_limit_goes_to_websockets_in_pieces() -> None:
    deframer = Deframer(MAX_SIZE, 16)
    wire = frame(b"y" * 100) + frame(b"z")
    first = deframer.split(wire[:30])
    assert [bytes(p) for p in first] == [wire[:30]]  # not kept: owed to websockets
    rest = deframer.split(wire[30:])
    assert bytes(rest[0]) == wire[30:102]  # exactly to the frame's end
    assert isinstance(rest[1], Run) and bytes(rest[1].view) == frame(b"z")


def test_the_upgrade_response_and_the_first_frames_in_one_read() -> None:
    """The head's end found across reads of one byte, then frames.py's from the next byte on."""
    feed = new_feed()
    peer = Peer.__new__(Peer)
    peer.feed, peer.received, peer.pings, peer.pongs = feed, [], [], []
    from websockets.server import ServerProtocol

    peer.server = ServerProtocol(max_size=None)
    for data in feed.data_to_send():
        peer.server.receive_data(data)
    request = peer.server.events_received()[0]
    peer.server.send_response(peer.server.accept(request))  # type: ignore[arg-type]
    peer.server.send_text(CONNECTED)
    wire = b"".join(peer.server.data_to_send())
    for index in range(len(wire)):
        feed.receive_data(wire[index : index + 1], 0.0)
    peer.pump(0.0)
    assert orjson.loads(peer.received[-1]) == {"action": "auth", "params": "sekrit-key"}


def test_a_refused_upgrade_with_a_body_is_read_by_websockets() -> None:
    feed = new_feed()
    feed.data_to_send()
    feed.receive_data(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 5\r\n\r\nno\r\n\r", 0.0)
    assert "401" in str(ended(feed).error)


# -- the run routed at once against each payload routed alone --------------------------------

RUN_PAYLOADS = st.lists(
    POLYGON_FRAMES
    | st.sampled_from(
        [
            b'[{"ev":"T","sym":"A","p":1},{"ev":"status","status":"x"}]',  # a status inside
            b'[{"ev":"T","sym":"A","p":18x7}]',  # not JSON: rejected
            '[{"ev":"T","sym":"Ä","t":1700000000000}]'.encode(),  # non-ASCII: Python's
            b'[{"ev":"T","sym":"B","t":1700000000000123456}]',
            b'[{"ev":"T","sym":"B","t": 1700000000 }]',
            b'[{"ev":"T","sym":"B","t":17000000000000000001}]',
            b"[]",
        ]
    ),
    max_size=10,
)


@given(RUN_PAYLOADS, st.sampled_from([1, 4, 16]))
@settings(max_examples=300, deadline=None)
def test_a_run_routes_as_each_payload_alone(payloads_: list[bytes], pipes: int) -> None:
    """The same events on the same pipes in the same order, the same statuses, the same
    rejections, and each routed frame's event_time, in the C router's one pass or not."""
    run = memoryview(b"".join(frame(p) for p in payloads_))
    reference, status, stamps, rejected = new_out(pipes), [], [], 0
    alone = Splitter(pipes)
    for payload in payloads_:
        try:
            alone.route(payload, reference, status)
        except FrameError:
            rejected += 1
            continue
        if (stamp := event_time(payload)) is not None:
            stamps.append(stamp)
    for accelerate in (True, False):
        out, got_status, got_stamps = new_out(pipes), [], []  # type: ignore[var-annotated]
        count, events, errors = Splitter(pipes, accelerate=accelerate).route_frames(
            run, MAX_SIZE, out, got_status, got_stamps
        )
        assert count == len(payloads_)
        assert len(errors) == rejected
        assert pipe_events(out) == pipe_events(reference)
        assert events == sum(map(len, pipe_events(reference)))
        assert got_status == status
        assert got_stamps == stamps


def test_a_run_of_feed_frames_is_one_chunk_per_pipe() -> None:
    run = memoryview(frame(TRADES) * 3)
    out = new_out(4)
    Splitter(4).route_frames(run, MAX_SIZE, out, [], [])
    assert all(len(chunks) <= 1 for chunks in out)
    assert list(payloads(run)) == [TRADES] * 3


@given(
    st.integers(0, 10**21),
    st.sampled_from(["", " ", "\n\t"]),
    st.sampled_from(["", " "]),
    st.sampled_from(["}", ",", ".5}", "e3}", " x}"]),
    st.integers(0, 600),
)
@settings(max_examples=500, deadline=None)
def test_the_c_timestamp_is_event_times(
    value: int, before: str, after: str, end: str, pad: int
) -> None:
    """Digits, whitespace, fractions, exponents, 20 digits and more, far from the end."""
    event = f'{{"ev":"T","sym":"A","t":{before}{value}{after}{end}'
    if not event.endswith("}"):
        event += "}"
    payload = f'[{{"ev":"T","sym":"A","x":"{"y" * pad}"}},{event}]'.encode()
    try:
        orjson.loads(payload)
    except orjson.JSONDecodeError:
        return  # the router declines what is not JSON: no stamp of its own
    stamps: list[float] = []
    Splitter(4).route_frames(
        memoryview(frame(payload, masked=False)), MAX_SIZE, new_out(4), [], stamps
    )
    expected = event_time(payload)
    assert stamps == ([] if expected is None else [expected])
