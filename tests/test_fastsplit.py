"""The C router on its own: what it accepts routes as the exact path does; the rest it declines.

tests/test_split.py runs every Splitter test with the router in front and again without it;
here are the router's own promises: it is built, it takes the feed's frames, it declines (with
nothing appended) what it must leave to Python, and it never reads past a frame.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_split import (
    POLYGON_FRAMES,
    SYMBOLS,
    any_events,
    frames,
    json_values,
    new_out,
    pipe_events,
)

from tradebalancer import _fastsplit, split
from tradebalancer._fastsplit import Router, valid_ascii_json
from tradebalancer.pysplit import PythonSplit
from tradebalancer.reader.format import LIMIT
from tradebalancer.replay import synth
from tradebalancer.routing import DEFAULT_ROUTE_KEYS, pipe_for
from tradebalancer.split import Splitter


def router(pipes: int = 7, **route_keys: str) -> Router:
    """A router with the default route keys, or the ones given."""
    return Router(pipes, route_keys or dict(DEFAULT_ROUTE_KEYS), "sym", LIMIT)


def exact(frame: bytes, pipes: int) -> list[list[bytes]]:
    """Each pipe's events as the exact (slow) path routes ``frame``."""
    out = new_out(pipes)
    PythonSplit(pipes, DEFAULT_ROUTE_KEYS, "sym").route_slow(frame, orjson.loads(frame), out, [])
    return pipe_events(out)


def test_the_splitter_uses_the_router() -> None:
    """The extension is built, and a Splitter puts it in front unless told not to."""
    assert split.Router is Router
    assert Splitter(4).accelerated
    assert not Splitter(4, accelerate=False).accelerated


def test_appends_one_chunk_per_pipe_and_frame() -> None:
    """All of a pipe's events of a frame come as one chunk: header, event, header, event."""
    texts = [b'{"ev":"T","sym":"A","p":1}', b'{"ev":"T","sym":"A","p":2}']
    out = new_out(1)
    assert router(1).route(b"[" + b",".join(texts) + b"]", out) == 2
    assert out == [[b"".join(len(text).to_bytes(4, "little") + text for text in texts)]]


@pytest.mark.parametrize(
    "frame",
    [
        b'[{"ev":"T","sym":"A","p":1}, {"ev":"Q","p":2,"sym":"B"}]',
        b' [ {"p":1 , "sym" : "A", "ev" : "T"} ]\n',
        b'[{"ev":"T","sym":"A","c":[14,41],"n":{"x":[{"y":"}]"}]}}]',
        b'[{"ev":"T","sym":"A","n":'
        + b"[" * 64
        + b"]" * 64
        + b"}]",  # MAX_DEPTH: deeper goes to Python
        b'[{"ev":"T","sym":"A","s":"\\"},{\\"ev\\":\\"T\\""}]',
        b'[{"ev":"T","sym":"A","sym":"B"},{"ev":"LULD","T":"C"},{"ev":"XT","pair":"D"}]',
        b'[{"ev":"T","sym":""},{"ev":"NEW","sym":"E"},{"ev":"","sym":"F"}]',
        b"[]",
    ],
)
def test_takes_any_layout_and_routes_exactly(frame: bytes) -> None:
    """Member order, whitespace, nesting and escapes outside the key are no reason to decline."""
    out = new_out(7)
    assert router().route(frame, out) == len(orjson.loads(frame))
    assert pipe_events(out) == exact(frame, 7)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        ('[{"ev":"T","sym":"Ä"}]'.encode(), "a byte over 0x7F"),
        (b'[{"ev":"status","status":"x"}]', "a status event"),
        (b'[{"ev":"T","p":1}]', "no route key"),
        (b'[{"ev":"T","sym":5}]', "a route key that is not a string"),
        (b'[{"ev":"T","sym":"A","sym":null}]', "the last route key is not a string"),
        (b'[{"sym":"A"}]', "no type"),
        (b'[{"ev":1,"sym":"A"}]', "a type that is not a string"),
        (b'[{"ev":"T","sym":"A\\u0042"}]', "an escape in the key"),
        (b'[{"ev":"\\u0054","sym":"A"}]', "an escape in the type"),
        (b'[{"e\\u0076":"T","sym":"A"}]', "an escape in a member name"),
        (b'[{"ev":"T","sym":"A\x01"}]', "a control byte in the key"),
        (b'[{"ev":"T","n":' + b"[" * 65 + b"]" * 65 + b',"sym":"A"}]', "nesting too deep"),
        (b'[{"ev":"T","sym":"A","n":[}]}]', "brackets that do not match"),
        (b'[{"ev":"T","p":,"sym":"A"}]', "a member without a value"),
        (b'[{"ev":"T","sym":"A"},]', "a trailing comma"),
        (b'[{"ev":"T","sym":"A"}]x', "bytes after the array"),
        (b'[{"ev":"T","sym":"A"}', "no closing bracket"),
        (b'[{"ev":"T","sym":"A}]', "a string that never ends"),
        (b'[{"ev":"T","sym":"A"},"B"]', "an element that is not an object"),
        (b'{"ev":"T","sym":"A"}', "no array"),
        (b"", "nothing"),
    ],
)
def test_declines_with_nothing_appended(frame: bytes, why: str) -> None:
    """What the router cannot route exactly without decoding, it leaves to Python untouched."""
    out = [[b"kept"], [], [], [], [], [], []]
    assert router().route(frame, out) == -1, why
    assert out == [[b"kept"], [], [], [], [], [], []]


def test_routes_by_the_configured_keys() -> None:
    """Types route by their configured member; other types by the default."""
    texts = [b'{"ev":"T","sym":"A","tk":"B"}', b'{"ev":"Z","sym":"C","k":"D"}']
    out = new_out(101)
    assert Router(101, {"T": "tk"}, "k", LIMIT).route(b"[" + b",".join(texts) + b"]", out) == 2
    events = pipe_events(out)
    assert events[pipe_for(b"B", 101)][0] == texts[0]
    assert events[pipe_for(b"D", 101)][-1] == texts[1]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ((0, {}, "sym", LIMIT), ValueError, "pipes must be at least 1"),
        ((4, {"T": 1}, "sym", LIMIT), TypeError, "map str to str"),
        ((4, [], "sym", LIMIT), TypeError, "dict"),
        ((4, {}, b"sym", LIMIT), TypeError, "str"),
        ((4, {}, "sym", 2), ValueError, "limit must be at least 3"),
    ],
)
def test_bad_arguments_raise(
    arguments: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    """Construction checks its arguments."""
    with pytest.raises(error, match=message):
        Router(*arguments)


def test_out_must_be_one_list_per_pipe() -> None:
    """A wrong ``out`` is a programming error, raised before anything is routed."""
    frame = b'[{"ev":"T","sym":"A"}]'
    with pytest.raises(ValueError, match="one list per pipe"):
        router(4).route(frame, new_out(3))
    with pytest.raises(TypeError, match="hold lists"):
        router(2).route(frame, [[], ()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="two arguments"):
        router(2).route(frame)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        router(2).route("[]", new_out(2))  # type: ignore[arg-type]


def test_initialised_once() -> None:
    """Calling __init__ again cannot swap the tables under a router in use."""
    used = router(4)
    with pytest.raises(RuntimeError, match="once"):
        used.__init__(3, {}, "sym", LIMIT)  # type: ignore[misc]


@given(POLYGON_FRAMES, st.sampled_from([1, 4, 15, 16]))
@settings(deadline=None)
def test_takes_every_feed_frame(frame: bytes, pipes: int) -> None:
    """Every frame in the feed's layouts is the router's, routed as the exact path does."""
    out = new_out(pipes)
    routing = router(pipes)
    assert routing.route(frame, out) == len(orjson.loads(frame))
    assert pipe_events(out) == exact(frame, pipes)


def test_the_feed_layout_takes_the_sixteen_byte_path() -> None:
    """Trades as the feed writes them go by layout_event, not the token-by-token scan."""
    texts = [
        b'{"ev":"T","sym":"AAPL","i":"52983525029461","x":4,"p":187.31,"s":100,"c":[14,41],'
        b'"t":1700000000000,"q":1234,"z":3}',
        b'{"ev":"T","sym":"A","p":1}',  # short: the next event starts in the same 16 bytes
        b'{"ev":"T","sym":"MSFT","i":"7","x":11,"p":370.1,"s":5,"t":1700000000001,"q":1,"z":3}',
        b'{"ev":"LULD","T":"MSFT","h":1,"l":2,"i":[17],"t":1700000000001}',
    ]
    routing = router()
    out = new_out(7)
    frame = b"[" + b",".join(texts) + b"]"
    assert routing.route(frame, out) == 4
    assert routing.layout_events == 4
    assert pipe_events(out) == exact(frame, 7)


@pytest.mark.parametrize(
    ("tail", "layout"),
    [
        (b',"n":"}{]["', True),  # braces inside a string
        (b',"n":"' + b"x" * 40 + b'","k":"' + b"}" * 20 + b'"', True),  # strings across blocks
        (b',"n":{"m":1}', False),  # a nested object
        (b',"n":[{"m":1}]', False),  # one inside an array
        (b',"n":"a\\"}"', False),  # an escape
        (b',"ev":"LULD","T":"B"', False),  # a second type
        (b',"sym":"B"', False),  # a second key
        (b',"prev":1', False),  # v" without being "ev": a false alarm, still exact
    ],
)
def test_the_layout_path_leaves_what_it_cannot_prove_to_the_scan(tail: bytes, layout: bool) -> None:
    """Nested objects, escapes and names that might repeat the type or key go token by token."""
    frame = b'[{"ev":"T","sym":"A"' + tail + b'},{"ev":"T","sym":"C"}]'
    routing = router()
    out = new_out(7)
    assert routing.route(frame, out) == 2
    assert routing.layout_events == (2 if layout else 1)
    assert pipe_events(out) == exact(frame, 7)


TAIL_NAMES = st.sampled_from(["i", "x", "p", "ev", "sym", "T", "pair", "n", "v", "prev", "sy"])


@st.composite
def layout_frames(draw: st.DrawFn) -> bytes:
    """Frames whose events start as the feed's (type, then key) with anything after, repeats too."""
    texts = []
    for _ in range(draw(st.integers(1, 6))):
        event_type = draw(st.sampled_from(["T", "Q", "LULD", "XT", "C", "NEW"]))
        key = DEFAULT_ROUTE_KEYS.get(event_type, "sym")
        head = {"ev": event_type, key: draw(SYMBOLS)}
        text = orjson.dumps(head)[:-1]
        for name, value in draw(st.lists(st.tuples(TAIL_NAMES, json_values), max_size=5)):
            text += b"," + orjson.dumps(name) + b":" + orjson.dumps(value)
        texts.append(text + b"}")
    return b"[" + b",".join(texts) + b"]"


@given(layout_frames())
@settings(max_examples=400, deadline=None)
def test_layout_frames_with_any_tail_route_exactly(frame: bytes) -> None:
    """Repeated names, nesting, braces, quotes and escapes after the key: exact, or declined."""
    out = new_out(7)
    count = router().route(frame, out)
    if count < 0:  # non-ASCII, a key repeated as a non-string: the Python paths decide
        assert out == new_out(7)
    else:
        assert pipe_events(out) == exact(frame, 7)


@given(frames(any_events()))
@settings(max_examples=300, deadline=None)
def test_any_valid_frame_is_routed_exactly_or_declined(
    case: tuple[bytes, list[dict[str, Any]], list[bytes]],
) -> None:
    """On any valid frame the router routes exactly as the exact path, or appends nothing."""
    frame = case[0]
    out = new_out(7)
    count = router().route(frame, out)
    if count < 0:
        assert out == new_out(7)
    else:
        assert pipe_events(out) == exact(frame, 7)


@given(st.binary(max_size=200) | POLYGON_FRAMES.flatmap(lambda f: st.just(f[: len(f) // 2])))
@settings(deadline=None)
def test_any_bytes_are_routed_or_declined(frame: bytes) -> None:
    """Any bytes at all, a cut frame included: a count or -1 with nothing appended, no crash."""
    out = new_out(3)
    count = router(3).route(frame, out)
    assert count >= -1
    if count == -1:
        assert out == new_out(3)
    else:
        assert sum(map(len, pipe_events(out))) == count


JSONISH = st.text(alphabet='0123456789+-.eE"\\/nrtbfu ufalsNaI{}[],:x\x00\x01\x1f\x7f', max_size=14)


@given(JSONISH, st.booleans())
@settings(max_examples=2000)
def test_the_c_router_takes_only_frames_orjson_takes(value: str, layout: bool) -> None:
    """Whatever member value (numbers, literals, strings, escapes, junk): valid JSON or declined."""
    member = b'"v":' + value.encode()
    head = b'{"ev":"T","sym":"A",' if layout else b'{"v0":1,"sym":"A","ev":"T",'
    frame = b"[" + head + member + b"}]"
    out: list[list[bytes]] = [[] for _ in range(4)]
    routed = router(4).route(frame, out)
    try:
        parsed = orjson.loads(frame)
    except orjson.JSONDecodeError:
        parsed = None
    if routed >= 0:
        assert isinstance(parsed, list) and all(isinstance(event, dict) for event in parsed)
        assert routed == len(parsed)
    else:
        assert out == [[] for _ in range(4)]


def orjson_takes(text: bytes) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


def left_to_orjson(text: str) -> bool:
    """What the C check leaves to orjson on purpose: a surrogate escape, a number past 1e308."""

    def huge(value: object) -> bool:
        if isinstance(value, list):
            return any(map(huge, value))
        if isinstance(value, dict):
            return any(map(huge, value.values()))
        return isinstance(value, int | float) and abs(value) >= 1e308

    surrogate = re.search(r"\\u[dD][89a-fA-F]", text) is not None
    return surrogate or huge(orjson.loads(text))


@given(JSONISH | json_values.map(lambda value: orjson.dumps(value).decode()))
@settings(max_examples=3000)
def test_the_c_check_is_orjsons_on_ascii(text: str) -> None:
    """The router's check alone, on ASCII text: valid exactly where orjson parses, but for what
    it leaves to orjson on purpose; its token-by-token reader alone too."""
    data = text.encode()
    for check in (valid_ascii_json, tokens):
        if check(data):
            assert orjson_takes(data)
        elif orjson_takes(data) and data.isascii():
            assert left_to_orjson(text), text


def test_the_c_check_refuses_each_kind_of_invalid_json() -> None:
    """One of each kind the feed-edges issue found forwarded byte for byte: alone, and as a
    member of an event in the feed's layout (the block reader's), by each reader."""
    for text in (
        b"18x7",
        b"tru",
        b'{"a":1,}',
        b'"\x00"',
        b'"a\x01"',
        b"{a:1}",
        b'"\\x41"',
        b"NaN",
        b"[1 2]",
        b"01",
        b"-",
        b"1.",
        b".5",
        b"[",
        b'"\\ud800"',
        b"",
    ):
        for check in CHECKS:
            assert not check(text), (check, text)
            assert not check(in_event(text)), (check, text)
    for text in (b"0", b"-0.5e-3", b'"\\u00e9"', b" [ {} , [] , null ] ", b'{"a":[true,false]}'):
        for check in (valid_ascii_json, tokens):
            assert check(text), (check, text)
            assert check(in_event(text)), (check, text)


# valid_ascii_json's two readers: token by token (any frame; the only one without SSE2), and
# sixty-four bytes a step (the feed's layout; True only for valid JSON, False for the rest).
tokens = _fastsplit._valid_json_tokens
blocks = getattr(_fastsplit, "_valid_json_blocks", None)
blocks_sse2 = getattr(_fastsplit, "_valid_json_blocks_sse2", None)  # the same, 16 bytes a load
CHECKS = [check for check in (valid_ascii_json, tokens, blocks, blocks_sse2) if check is not None]
needs_blocks = pytest.mark.skipif(blocks is None, reason="built without SSE2: one reader")


def in_event(value: bytes, at: int = 0) -> bytes:
    """value as a member of a trade in the feed's layout, ``at`` bytes further in."""
    return b'[{"ev":"T","sym":"A","i":"' + b"x" * at + b'","p":' + value + b',"z":1}]'


def agree(data: bytes) -> None:
    """The readers give valid_ascii_json's answer, the block reader True only if valid."""
    valid = valid_ascii_json(data)
    assert tokens(data) == valid, data
    if blocks is not None and blocks_sse2 is not None:
        assert not blocks(data) or valid, data
        assert blocks(data) == blocks_sse2(data), data  # the AVX2 build is the SSE2 one's twin
    if valid:
        assert orjson_takes(data), data


@needs_blocks
def test_the_feed_takes_the_block_reader() -> None:
    """The replayed feed's frames, and the layouts it writes, go sixty-four bytes a step."""
    assert blocks is not None
    feed = list(synth.generate_frames(count_events=3000))
    assert feed
    for frame in [*feed, b"[]", b"{}", b'[{"ev":"T","c":[],"n":{"a":[-0.5,0,10]}}]']:
        assert blocks(frame), frame[:100]
        assert blocks_sse2 is not None and blocks_sse2(frame), frame[:100]
        assert valid_ascii_json(frame)


@needs_blocks
def test_the_router_uses_the_widest_build_this_cpu_has() -> None:
    """AVX2 where /proc/cpuinfo lists it (x86-64-v3), the SSE2 build elsewhere."""
    with open("/proc/cpuinfo") as cpuinfo:
        avx2 = " avx2" in cpuinfo.read()
    assert _fastsplit.block_reader == ("avx2" if avx2 else "sse2")


@needs_blocks
@pytest.mark.parametrize(
    "frame",
    [
        b' [{"ev":"T"}]',  # whitespace
        b'[{"ev": "T"}]',
        b'[{"ev":"T","n":"a b"}]',  # a space, in a string even
        b'[{"ev":"T","n":"\\n"}]',  # an escape
        b'[{"ev":"T","n":true}]',  # a literal
        b'[{"ev":"T","n":1e5}]',  # an exponent
        b'[{"ev":"T","n":' + b"9" * 200 + b"}]",  # a digit run that fills a block
        b'"a"',  # no array or object outside
        b"1",
    ],
)
def test_the_block_reader_leaves_the_rest_to_the_token_reader(frame: bytes) -> None:
    """Whatever the feed does not write is the token reader's, valid or not."""
    assert blocks is not None and blocks_sse2 is not None
    assert not blocks(frame) and not blocks_sse2(frame)
    assert valid_ascii_json(frame) == tokens(frame) == orjson_takes(frame)


@pytest.mark.parametrize("depth", [1, 65, 66, 67, 100])
def test_each_reader_nests_as_deep_as_the_other(depth: int) -> None:
    """The frame's array and an event's object, then MAX_DEPTH (64) levels inside, no deeper."""
    for frame in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        for check in CHECKS:
            assert check(frame) == (depth <= 66), (check, depth)


@pytest.mark.parametrize(
    "value",
    [
        b"0",
        b"-0",
        b"7.47",
        b"-0.001",
        b"1704205800000",
        b"12345678.12345678",
        b"01",
        b"-01",
        b"00",
        b"1.",
        b".5",
        b"-",
        b"--1",
        b"1-2",
        b"1.2.3",
        b"1..2",
        b"-.5",
        b'"x"',
        b'""',
        b"[]",
        b"{}",
        b"[1,2]",
        b'{"a":1}',
        b'{"a":[{"b":{}}]}',
        b'"a","b":1',
        b'"a":',
        b"1,",
        b",1",
        b"[1,]",
        b"[,1]",
        b'{"a"}',
        b'{"a":1,}',
        b"{1:2}",
        b'{"a":1 "b":2}',
        b'{"a"::1}',
        b"[}",
        b"{]",
        b"1]",
        b"[[1]",
        b'"a"1',
        b'1"a"',
    ],
)
def test_each_reader_across_block_and_word_boundaries(value: bytes) -> None:
    """Each value (valid or not) at every offset across the first block's end, and the SWAR
    steps of eight: the readers agree, and with orjson."""
    for at in range(40, 80):
        agree(in_event(value, at))
    for data in (value, b"[" + value + b"]", b"[" + b" " * 7 + value + b"]"):
        agree(data)


@pytest.mark.parametrize("size", [*range(1, 20), 63, 64, 65, 126, 127, 128, 308, 309, 310])
def test_digit_runs_of_every_length(size: int) -> None:
    """Integers and fractions of any length, at the end of the buffer or before more; 309
    integer digits reach 1e308, which the check leaves to orjson."""
    digits = b"1" + b"0" * (size - 1)
    for number in (digits, b"-" + digits, b"0." + digits, digits + b".5"):
        for data in (number, b"[" + number + b"]", in_event(number), in_event(number, size)):
            agree(data)
            assert valid_ascii_json(data) == (size < 309 or number.startswith(b"0.")), data


@pytest.mark.parametrize("size", [0, 1, 6, 7, 8, 9, 15, 16, 17, 62, 63, 64, 65])
def test_strings_that_end_at_the_end_of_the_buffer(size: int) -> None:
    """A string cut by the buffer's end, or closed by its last byte, or with a byte that is
    not ASCII, at every length across a step of eight."""
    text = b"a" * size
    for data in (b'"' + text, b'"' + text + b'"', b'"' + text + b"\\", b'"' + text + b'\xc3\xa9"'):
        agree(data)
    assert valid_ascii_json(b'"' + text + b'"')
    assert not valid_ascii_json(b'"' + text)
    for data in (in_event(b'"' + text + b"\x80" + b'"'), b"[" + text + b"\xff]"):
        assert not any(check(data) for check in CHECKS), data


EDITS = st.sampled_from(list(b'{}[]":,.-0123456789 etx\\\x00\x80'))


@given(
    st.sampled_from(list(synth.generate_frames(count_events=400, min_batch=1, max_batch=6))),
    st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "insert", "delete"]), EDITS),
        max_size=3,
    ),
)
@settings(max_examples=1500, deadline=None)
def test_the_readers_agree_on_edited_feed_frames(frame: bytes, edits: list[Any]) -> None:
    """A feed frame with a few bytes set, inserted or deleted: one answer from both readers,
    and the block reader's True only for valid JSON."""
    data = bytearray(frame)
    for at, edit, byte in edits:
        at %= len(data) + 1
        if edit == "insert":
            data[at:at] = bytes([byte])
        elif at < len(data):
            if edit == "set":
                data[at] = byte
            else:
                del data[at]
    agree(bytes(data))
