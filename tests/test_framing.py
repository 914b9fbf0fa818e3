"""The pipe framing: boundaries from any starting offset, messages, protocol errors."""

from __future__ import annotations

import itertools
import json

import pytest
from framed import frame, sized, trade
from hypothesis import given, settings
from hypothesis import strategies as st

from tradebalancer.reader import _fastread, framing
from tradebalancer.reader.format import LIMIT
from tradebalancer.reader.framing import MessageParser, ProtocolError

pytestmark = pytest.mark.usefixtures("framing_loop")


def test_the_c_loop_is_built_and_used(framing_loop: str) -> None:
    """The extension is built; the parser uses it unless it is absent."""
    assert (framing._parse_in_c is _fastread.parse) == (framing_loop == "c")


def test_the_c_loop_stops_at_what_it_cannot_take() -> None:
    """Complete messages only; a bad header or a short one ends the run, and says which."""
    one, two = b'{"a":1}', b'{"b":[2]}'
    stream = b"".join(len(m).to_bytes(4, "little") + m for m in (one, two))
    for data, end, bad in [
        (stream, len(stream), False),
        (stream[:-1], 4 + len(one), False),  # the second is not complete
        (stream + b"\x05\x00\x00", len(stream), False),  # a partial header
        (stream + b"\x01\x00\x00\x00x", len(stream), True),  # a body that is not an object
        (stream + b"\x00\x00\x7b\x00{", len(stream), True),  # a length at the limit
    ]:
        messages: list[bytes] = []
        assert _fastread.parse(data, 0, messages, LIMIT) == (end, bad)
        assert messages == [one, two][: len(messages)] and len(messages) == (1 if end < 15 else 2)
    with pytest.raises(ValueError, match="outside"):
        _fastread.parse(stream, len(stream) + 1, [], LIMIT)
    with pytest.raises(TypeError):
        _fastread.parse(stream, 0, (), LIMIT)  # type: ignore[arg-type]


def boundaries(bodies: list[bytes]) -> list[int]:
    """The stream offset of every message, and the stream's length last."""
    offsets = [0]
    for body in bodies:
        offsets.append(offsets[-1] + 4 + len(body))
    return offsets


# Events that make resynchronisation hard: nested objects closing with "}}}", and lengths whose
# header bytes look like "}" or "\x00{" (0x7B00 + k * 0x10000 puts "\x00{" in the header itself,
# which matters when such a message follows the offset where reading starts).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)
plain_events = st.dictionaries(st.text(max_size=6), json_values, max_size=4).map(
    lambda event: json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
)
nested_events = st.integers(1, 6).map(lambda depth: b'{"k":' * depth + b"1" + b"}" * depth)
small_lengths = st.sampled_from([2, 3, 4, 0x7B, 0x7D, 0x17B, 0x27D])
large_lengths = st.integers(0, 2).map(lambda k: 0x7B00 + k * 0x10000) | st.just(0x7D7B)


def of_length(length: int) -> bytes:
    """An event of exactly ``length`` bytes (``{}`` padded with spaces when short)."""
    return b"{" + b" " * (length - 2) + b"}" if length < 20 else sized(length)


small_events = plain_events | nested_events | small_lengths.map(of_length)
any_events = small_events | large_lengths.map(of_length)


def resynchronise(stream: bytes, offset: int, split: int) -> tuple[list[bytes], bytes, int]:
    """Parse ``stream[offset:]`` delivered in two reads; return messages, skipped, position."""
    parser = MessageParser()
    data = stream[offset:]
    messages = parser.receive_data(data[:split]) + parser.receive_data(data[split:])
    parser.receive_eof()
    assert parser.error is None
    return messages, b"".join(parser.skipped_received()), parser.position


@settings(max_examples=80, deadline=None)
@given(
    st.lists(small_events, min_size=2, max_size=2),
    st.lists(any_events, min_size=1, max_size=3),
    st.integers(0, 1 << 17),
)
def test_a_stream_entered_anywhere_in_its_first_two_messages_resyncs_at_the_next_boundary(
    first: list[bytes], rest: list[bytes], split: int
) -> None:
    """From every offset of the first two messages the parser skips exactly to the next start."""
    check_every_offset_of_the_first_two_messages(first + rest, split)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(any_events, min_size=1, max_size=6),
    st.integers(0, 40),
    st.lists(st.integers(1, 1 << 17), min_size=1, max_size=12),
)
def test_reads_into_one_reused_buffer_give_messages_of_their_own(
    bodies: list[bytes], offset: int, reads: list[int]
) -> None:
    """The Reader hands the parser views of one buffer it overwrites: nothing may alias it."""
    stream = b"".join(map(frame, bodies))[offset:]
    buffer = bytearray(max(reads))
    parser = MessageParser()
    messages: list[bytes] = []
    position = 0
    for size in itertools.cycle(reads):
        chunk = stream[position : position + size]
        if not chunk:
            break
        position += len(chunk)
        buffer[: len(chunk)] = chunk
        messages += parser.receive_data(memoryview(buffer)[: len(chunk)])
        buffer[:] = b"\xff" * len(buffer)  # the next read lands here
    parser.receive_eof()
    skipped = b"".join(parser.skipped_received())
    assert parser.error is None
    assert all(type(message) is bytes for message in messages)
    assert skipped + b"".join(map(frame, messages)) == stream
    assert messages == bodies[len(bodies) - len(messages) :]


def check_every_offset_of_the_first_two_messages(bodies: list[bytes], split: int) -> None:
    stream = b"".join(map(frame, bodies))
    starts = boundaries(bodies)
    for offset in range(starts[2]):
        boundary = next(start for start in starts if start >= offset)
        expected = bodies[starts.index(boundary) :]
        messages, skipped, position = resynchronise(stream, offset, split)
        assert messages == expected, offset
        assert skipped == stream[offset:boundary], offset
        assert position == len(stream) - offset


def test_every_offset_of_a_0x7b00_long_message_resyncs_after_it() -> None:
    """Reading may start anywhere in a message whose own header holds the bytes 0x00 '{'."""
    bodies = [b'{"a":{"b":{"c":{}}}}', sized(0x7B00), trade(1)]
    check_every_offset_of_the_first_two_messages(bodies, 1000)


@pytest.mark.parametrize("k", [0, 1, 2, 0x7A])
def test_every_offset_before_a_0x7b00_plus_k_0x10000_message_resyncs_at_it(k: int) -> None:
    """A next header holding 0x00 '{' (length 0x7B00 + k * 0x10000) fools no starting offset."""
    bodies = [b'{"a":{"b":{"c":{}}}}', b'{"k":{"k":{}}}', sized(0x7B00 + k * 0x10000), trade(1)]
    check_every_offset_of_the_first_two_messages(bodies, 7)


def test_the_straddling_candidate_before_a_0x7b00_header_is_rejected() -> None:
    """Starting 3 bytes before a body's end, where "\\x00{" follows, is not taken for a start."""
    bodies = [b'{"a":{"b":{}}}', sized(0x7B00), trade(3)]
    stream = b"".join(map(frame, bodies))
    offset = 4 + len(bodies[0]) - 3  # data: '}', '}', '}', 0x00, '{', 0x00, 0x00 ...
    assert stream[offset : offset + 5] == b"}}}\x00{"
    messages, skipped, _ = resynchronise(stream, offset, 1)
    assert messages == bodies[1:]
    assert skipped == b"}}}"


def test_a_stream_that_starts_at_a_boundary_skips_nothing() -> None:
    """A header at offset 0 whose length bytes hold "}" and "\\x00{" is still a start."""
    bodies = [sized(0x7B00 + 0x7D), trade(1)]
    parser = MessageParser()
    assert parser.receive_data(b"".join(map(frame, bodies))) == bodies
    assert parser.skipped_bytes == 0


def test_protocol_errors_are_found_in_reads_larger_than_the_limit() -> None:
    """After a near-limit message the checked path still rejects a bad header behind it."""
    parser = MessageParser()
    big = sized(LIMIT - 1)
    data = frame(big) + frame(trade(1)) + (LIMIT + 5).to_bytes(4, "little") + b"{" * 9
    assert parser.receive_data(data) == [big, trade(1)]
    assert isinstance(parser.error, ProtocolError)
    assert parser.error.offset == len(frame(big)) + len(frame(trade(1)))
    assert parser.receive_data(frame(trade(2))) == []


def test_a_read_larger_than_the_limit_keeps_its_unfinished_tail() -> None:
    """The checked path hands back complete messages and completes the cut one later."""
    parser = MessageParser()
    big, last = sized(LIMIT - 1), trade(9)
    data = frame(big) + frame(trade(1)) + frame(last)
    assert parser.receive_data(data[:-10]) == [big, trade(1)]
    assert parser.receive_data(data[-10:]) == [last]
    assert parser.error is None
    assert parser.position == len(data)


def test_an_oversized_length_in_a_partial_header_is_caught_when_it_completes() -> None:
    """A bad header split across reads is reported once its fifth byte arrives."""
    parser = MessageParser()
    bad = (LIMIT + 1).to_bytes(4, "little") + b"{"
    assert parser.receive_data(frame(b"{}") + bad[:2]) == [b"{}"]
    assert parser.error is None
    assert parser.receive_data(bad[2:]) == []
    assert isinstance(parser.error, ProtocolError)
    assert parser.error.offset == 6
