"""Frame -> events: exact event bytes, length headers, pipes by route key, status set aside."""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tradebalancer import split
from tradebalancer.errors import EXCERPT_BYTES, FeedError, FrameError, TradeBalancerError
from tradebalancer.pysplit import PythonSplit
from tradebalancer.reader import framing
from tradebalancer.reader.format import LIMIT
from tradebalancer.reader.framing import MessageParser
from tradebalancer.routing import DEFAULT_ROUTE_KEYS, pipe_for
from tradebalancer.split import Splitter

PIPES = 1009  # many pipes, so that routing by a wrong key shows as a wrong pipe

TRADE_TEXTS = [
    b'{"ev":"T","sym":"AAPL","i":"52983525029461","x":4,"p":187.31,"s":100,"c":[14,41],'
    b'"t":1700000000000,"q":1234,"z":3}',
    b'{"ev":"T","sym":"MSFT","i":"7","x":11,"p":370.1,"s":5,"t":1700000000001,"q":1235,"z":3}',
    b'{"ev":"T","sym":"AAPL","i":"8","x":4,"p":187.32,"s":1,"t":1700000000002,"q":1236,"z":3}',
]
TRADES = b"[" + b",".join(TRADE_TEXTS) + b"]"


@pytest.fixture(autouse=True, scope="module", params=["c", "python"])
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs with the C router in front, then with the Python paths alone."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "python":
            patch.setattr(split, "Router", None)
        yield request.param


def new_out(pipes: int) -> list[list[bytes]]:
    """One empty list per pipe."""
    return [[] for _ in range(pipes)]


def events_of(chunks: list[bytes]) -> list[bytes]:
    """The events that a pipe's chunks carry, each checked against its length header."""
    data = b"".join(chunks)
    events = []
    at = 0
    while at < len(data):
        assert at + 4 <= len(data), f"a header cut short at {at}"
        end = at + 4 + int.from_bytes(data[at : at + 4], "little")
        assert end <= len(data), f"an event cut short at {at}"
        events.append(data[at + 4 : end])
        at = end
    return events


def pipe_events(out: list[list[bytes]]) -> list[list[bytes]]:
    """``events_of`` for every pipe."""
    return [events_of(chunks) for chunks in out]


def route(
    frame: bytes, pipes: int = PIPES, **options: Any
) -> tuple[Splitter, list[list[bytes]], list[bytes], int]:
    """Route ``frame`` with a new Splitter; return it, each pipe's events, status and count."""
    splitter = Splitter(pipes, **options)
    out = new_out(pipes)
    status: list[bytes] = []
    count = splitter.route(frame, out, status)
    return splitter, pipe_events(out), status, count


def key_name(event: dict[str, Any]) -> str:
    """The name of the member that routes ``event``: its type's, else the default."""
    event_type = event.get("ev")
    return DEFAULT_ROUTE_KEYS.get(event_type, "sym") if isinstance(event_type, str) else "sym"


def expected_key(event: dict[str, Any]) -> bytes:
    """The route key as specified: the string under the type's key name, as UTF-8, else b''."""
    value = event.get(key_name(event))
    return value.encode() if isinstance(value, str) else b""


def expected_routing(
    events: list[dict[str, Any]], texts: list[bytes], pipes: int
) -> tuple[list[list[bytes]], list[bytes]]:
    """What each pipe's events and the status list must be for these events and their bytes."""
    out = new_out(pipes)
    status = []
    for event, text in zip(events, texts, strict=True):
        if event.get("ev") == "status":
            status.append(text)
        else:
            out[pipe_for(expected_key(event), pipes)].append(text)
    return out, status


def check_routing(
    frame: bytes, events: list[dict[str, Any]], texts: list[bytes], pipes: int = 7
) -> Splitter:
    """Route ``frame`` and check every event's bytes, header, pipe and order."""
    splitter, out, status, count = route(frame, pipes)
    want_out, want_status = expected_routing(events, texts, pipes)
    assert out == want_out
    assert status == want_status
    assert count == len(events) - len(want_status)
    data = [event for event in events if event.get("ev") != "status"]
    for pipe, entries in enumerate(out):
        routed = [event for event in data if pipe_for(expected_key(event), pipes) == pipe]
        assert json.loads(b"[" + b",".join(entries) + b"]") == routed
    unkeyed = [event for event in data if not isinstance(event.get(key_name(event)), str)]
    assert splitter.unkeyed_events == len(unkeyed)
    return splitter


def test_routes_trades_on_the_fast_path() -> None:
    """A frame in the feed's layout is cut into its exact event bytes on the fast path."""
    events = [orjson.loads(text) for text in TRADE_TEXTS]
    splitter = check_routing(TRADES, events, TRADE_TEXTS)
    assert (splitter.fast_frames, splitter.slow_frames, splitter.rejected_frames) == (1, 0, 0)


def test_appends_header_then_event_to_existing_lists() -> None:
    """Each event adds its 4-byte little-endian length, then its bytes, after what is there."""
    splitter = Splitter(1)
    out = [[b"earlier"]]
    assert splitter.route(TRADES, out, []) == 3
    assert out[0][0] == b"earlier"
    assert b"".join(out[0][1:]) == b"".join(
        len(text).to_bytes(4, "little") + text for text in TRADE_TEXTS
    )


def test_status_frame_goes_to_status() -> None:
    """A status frame's events go to the status list, none to a pipe."""
    frame = b'[{"ev":"status","status":"auth_success","message":"authenticated"}]'
    splitter, out, status, count = route(frame)
    assert (count, status, out) == (0, [frame[1:-1]], new_out(PIPES))
    assert splitter.slow_frames == 1


def test_status_events_among_data_keep_their_order() -> None:
    """Status events inside a data frame go to the status list in order; data to pipes."""
    texts = [
        b'{"ev":"status","status":"success","message":"subscribed to: T.*"}',
        b'{"ev":"T","sym":"AAPL","p":1}',
        b'{"ev":"status","status":"x","message":"},{\\"ev\\":\\"T\\"}"}',
    ]
    frame = b"[" + b",".join(texts) + b"]"
    check_routing(frame, [orjson.loads(text) for text in texts], texts)


@pytest.mark.parametrize("frame", [b"[]", b"[ ]", b" \n[\t]\r\n"])
def test_empty_array_is_no_error(frame: bytes) -> None:
    """An empty array routes nothing and is not an error."""
    splitter, out, status, count = route(frame)
    assert (count, out, status, splitter.rejected_frames) == (0, new_out(PIPES), [], 0)


@pytest.mark.parametrize(
    ("event", "key", "unkeyed"),
    [
        (b'{"ev":"T","sym":"A\\u0041PL","p":1}', b"AAPL", 0),
        (b'{"ev":"T","sym":"\\u00dcBER"}', "ÜBER".encode(), 0),
        ('{"ev":"T","sym":"ÜBER"}'.encode(), "ÜBER".encode(), 0),
        (b'{"ev":"T","sym":"\\ud83d\\ude00"}', "\U0001f600".encode(), 0),
        (b'{"ev":"T","x":1}', b"", 1),
        (b'{"ev":"T","sym":5}', b"", 1),
        (b'{"ev":"T","sym":null}', b"", 1),
        (b'{"ev":"T","sym":["AAPL"]}', b"", 1),
        (b'{"ev":"T","sym":""}', b"", 0),
        (b'{"ev":"LULD","T":"MSFT","h":1,"l":2}', b"MSFT", 0),
        (b'{"ev":"NOI","T":"NTEST.Q","t":1}', b"NTEST.Q", 0),
        (b'{"ev":"V","val":3988.5,"T":"I:SPX","t":1}', b"I:SPX", 0),
        (b'{"ev":"FMV","fmv":189.12,"sym":"AAPL","t":1}', b"AAPL", 0),
        (b'{"ev":"XT","pair":"BTC-USD","p":1}', b"BTC-USD", 0),
        (b'{"ev":"XQ","pair":"SHIB-USDT","bp":1}', b"SHIB-USDT", 0),
        (b'{"ev":"C","p":"EUR/USD","a":1,"b":2}', b"EUR/USD", 0),
        (b'{"ev":"CA","pair":"USD/JPY","o":1}', b"USD/JPY", 0),
        (b'{"ev":"NEW","sym":"ZZZ"}', b"ZZZ", 0),
        (b'{"sym":"AAPL","ev":"T"}', b"AAPL", 0),
        (b'{"ev":5,"sym":"AAPL"}', b"AAPL", 0),
        (b'{"ev":["T"],"sym":"AAPL"}', b"AAPL", 0),
        (b'{"ev":"T","sym":"ABCDEFGHIJKLMNOP","p":1}', b"ABCDEFGHIJKLMNOP", 0),
        (b'{"ev":"T","sym":"A","p":1,"sym":"B"}', b"B", 0),
        (b'{"ev":"T","sym":"A","ev":"LULD","T":"B"}', b"B", 0),
        (b'{"ev":"T","sym":"A","sym" :"B"}', b"B", 0),
        (b'{"ev":"T","sym":"A","ev"\t:"LULD","T":"B"}', b"B", 0),
        (b'{"ev":"FMV","fmv":1,"sym":"A","sym"\n:"B"}', b"B", 0),
        (b'{"ev":"T","sym":"A","x":"sym","y":"ev"}', b"A", 0),
        (b'{ "ev" : "T" , "sym" : "AAPL" }', b"AAPL", 0),
    ],
)
def test_route_key(event: bytes, key: bytes, unkeyed: int) -> None:
    """The pipe comes from the decoded string under the type's key name, else from b''."""
    for frame in (b"[" + event + b"]", b"[" + event + b"," + event + b"]"):
        splitter, out, _, count = route(frame)
        assert out[pipe_for(key, PIPES)] == [event] * count
        assert sum(map(len, out)) == count
        assert splitter.unkeyed_events == unkeyed * count


def test_route_key_names_that_are_not_alphanumeric(implementation: str) -> None:
    """A key name the Python fast path cannot spell still routes: in C, or on the exact path."""
    texts = [b'{"ev":"T","s-y":"A"}', b'{"ev":"T","s-y":"B","p":1}']
    splitter, out, _, _ = route(b"[" + b",".join(texts) + b"]", route_keys={"T": "s-y"})
    assert out[pipe_for(b"A", PIPES)][0] == texts[0]
    assert out[pipe_for(b"B", PIPES)][-1] == texts[1]
    assert (splitter.fast_frames, splitter.slow_frames) == (
        (1, 0) if implementation == "c" else (0, 1)
    )


def test_many_event_types_route_correctly() -> None:
    """Thousands of distinct event types, as a hostile feed could send, all route exactly."""
    splitter = Splitter(4)
    for number in range(5000):
        event = {"ev": f"E{number}", "sym": f"S{number % 7}"}
        out = new_out(4)
        splitter.route(orjson.dumps([event]), out, [])
        assert pipe_events(out) == expected_routing([event], [orjson.dumps(event)], 4)[0]
    assert splitter.fast_frames == 5000


def test_custom_route_keys() -> None:
    """Types route by the configured member, other types by the configured default."""
    texts = [b'{"ev":"T","sym":"A","tk":"B"}', b'{"ev":"Z","sym":"C","k":"D"}']
    _, out, _, _ = route(b"[" + b",".join(texts) + b"]", route_keys={"T": "tk"}, default_key="k")
    assert out[pipe_for(b"B", PIPES)][0] == texts[0]
    assert out[pipe_for(b"D", PIPES)][-1] == texts[1]


@pytest.mark.parametrize(
    "texts",
    [
        [
            b'{"ev":"T","sym":"A","n":"},{\\"ev\\":\\"T\\",\\"sym\\":\\"B\\"}"}',
            b'{"ev":"T","sym":"C"}',
        ],
        [
            b'{"ev":"T","sym":"A","n":[{"ev":"T","sym":"B"},{"ev":"T","sym":"C"}]}',
            b'{"ev":"T","sym":"D"}',
        ],
        [b'{"ev":"T","sym":"A","n":{"x":[1,{"y":"}"}]},"m":"{"}', b'{"ev":"T","sym":"E"}'],
        [b'{"ev":"T","sym":"A","n":"[ ] { } \\\\"}', b'{"ev":"T","sym":"B","z":"\\\\\\""}'],
        [b'{"ev":"T","sym":"A","s":"},{\\"ev\\":\\""}', b'{"ev":"T","sym":"A}","s":"x"}'],
        ['{"ev":"T","sym":"Ä","s":"é"}'.encode(), b'{"ev":"T","sym":"B"}'],
        [b'{"ev":"T","sym":"A","c":[14,41]}', b'{"ev":"Q","sym":"B","i":[604]}'],
        [b'{"ev":"T","sym":"A","sym":"B"}', b'{"ev":"T","sym":"C"}'],
        [b'{"ev":"T","sym":"A","x":"\\"sym\\":"}', b'{"ev":"T","sym":"C","ev":"T"}'],
        [b'{"ev":"T","sym":"A"}', b'{"ev":"status","status":"x"}', b'{"ev":"T","sym":"B"}'],
        [b'{"ev":"T","sym":"A"}', b'{"ev":"LULD","T":"B"}'],
        [
            b'{"ev":"T","sym":"A","p":1}',
            b'{"ev":"T","sym":"B","p":2}',
            b'{"ev":"T","sym":"A","p":3}',
        ],
    ],
)
@pytest.mark.parametrize("comma", [b",", b" , ", b",\n  "])
def test_tricky_valid_frames_route_exactly(texts: list[bytes], comma: bytes) -> None:
    """Braces, brackets and separators inside strings, nesting and escapes never mislead."""
    for frame in (b"[" + comma.join(texts) + b"]", b" [ " + comma.join(texts) + b" ] "):
        check_routing(frame, [orjson.loads(text) for text in texts], texts)


def test_layout_and_mixed_frames_take_the_fast_path() -> None:
    """One-type frames, mixed-type frames and keys past the second member all go fast."""
    frames = [
        TRADES,
        b'[{"ev":"T","sym":"A","p":1},{"ev":"Q","sym":"B","bp":2},{"ev":"AM","sym":"C","v":3}]',
        b'[{"ev":"FMV","fmv":1,"sym":"A"},{"ev":"FMV","fmv":2,"sym":"B"}]',
        b'[{"ev":"XT","pair":"BTC-USD","p":1},{"ev":"XQ","pair":"ETH-USD","bp":2}]',
        b'[{"ev":"T","sym":"ABCDEFGHIJKLMNOPQRSTUVWXYZ","p":1}]',
        b'[{"ev":"LULD","T":"T","h":1},{"ev":"LULD","T":":","x":"T","y":"ev"}]',
        b'[{"ev":"LULD","T":"T"},{"ev":"NOI","T":"T","x":"T","y":"ev"}]',
    ]
    for frame in frames:
        events = orjson.loads(frame)
        texts = [orjson.dumps(event) for event in events]  # compact, as the feed writes
        assert frame == b"[" + b",".join(texts) + b"]"
        splitter = check_routing(frame, events, texts)
        assert (splitter.fast_frames, splitter.slow_frames) == (1, 0)


def test_long_event_is_routed_exactly() -> None:
    """An event too long for the prebuilt headers still gets its exact length header."""
    texts = [b'{"ev":"T","sym":"A"}', b'{"ev":"T","sym":"B","n":"' + b"x" * 70000 + b'"}']
    frame = b"[" + b",".join(texts) + b"]"
    check_routing(frame, [orjson.loads(text) for text in texts], texts)


MALFORMED = [
    b"",
    b" ",
    b"{}",
    b'{"ev":"T","sym":"AAPL"}',
    b"1",
    b'"[]"',
    b"null",
    b"[1]",
    b"[[]]",
    b'["x"]',
    b"[null]",
    b"[true]",
    b'[{"ev":"T"},false]',
    b'[{"ev":"T","sym":"A"},2]',
    b'[{"ev":"T","sym":"A"},[{"ev":"T","sym":"B"}]]',
    b'[{"ev":"T","sym":"A"},]',
    b'[{"ev":"T","sym":"A"}}]',
    b'[{"ev":"T","sym":"A"}]]',
    b'[{"ev":"T","sym":"A"}][{"ev":"T","sym":"B"}]',
    b'[{"ev":"T","sym":"A"}{"ev":"T","sym":"B"}]',
    b'[{"ev":"T","sym":"A"},,{"ev":"T","sym":"B"}]',
    b'[{"ev":"T","sym":"A"}x{"ev":"T","sym":"B"}]',
    b'x[{"ev":"T","sym":"A"}]',
    b'[{"ev":"T","sym":"A"}]x',
    b'[{"ev":"T","sym":"A"B","p":1}]',
    b'[{"ev":"T","sym":"A","p":1},{"ev":"T","sym":"B"x,"p":2}]',
    b'[{"ev":"T","sym":"\xff"}]',
    b'[{"ev":"T","sym":"\xc0\x80"}]',
    b'[{"ev":"T","sym":"A\x01"}]',
    b'[{"ev":"T","sym":"\x00","p":1}]',
    b'\xef\xbb\xbf[{"ev":"T","sym":"A"}]',
]


@pytest.mark.parametrize("frame", MALFORMED)
def test_malformed_frame_is_rejected_untouched(frame: bytes) -> None:
    """A frame that is not a JSON array of objects raises FrameError and appends nothing."""
    splitter = Splitter(4)
    out = [[b"kept"], [], [b"a", b"b"], []]
    status = [b"old"]
    with pytest.raises(FrameError) as caught:
        splitter.route(frame, out, status)
    assert out == [[b"kept"], [], [b"a", b"b"], []] and status == [b"old"]
    assert (splitter.rejected_frames, splitter.fast_frames, splitter.slow_frames) == (1, 0, 0)
    assert caught.value.excerpt == frame[:EXCERPT_BYTES] and caught.value.reason


@pytest.mark.parametrize("frame", [TRADES, json.dumps(orjson.loads(TRADES), indent=1).encode()])
def test_every_truncation_is_rejected_untouched(frame: bytes) -> None:
    """A frame cut short at any byte raises FrameError and appends nothing."""
    splitter = Splitter(4)
    for length in range(len(frame)):
        out = new_out(4)
        status: list[bytes] = []
        with pytest.raises(FrameError):
            splitter.route(frame[:length], out, status)
        assert out == new_out(4) and status == []
    assert splitter.rejected_frames == len(frame)


def test_frame_error_is_bounded_and_a_feed_error() -> None:
    """FrameError keeps a reason and at most 200 bytes of the frame; it is a FeedError."""
    frame = b"[" + b'{"ev":"T","sym":"A"},' * 100 + b"1]"
    with pytest.raises(FrameError) as caught:
        Splitter(4).route(frame, new_out(4), [])
    error = caught.value
    assert isinstance(error, FeedError) and isinstance(error, TradeBalancerError)
    assert error.reason == "element 100 is a number, not an object"
    assert error.excerpt == frame[:200] and len(error.excerpt) == EXCERPT_BYTES
    assert "element 100" in str(error) and f"{len(frame)}-byte" in str(error)


@pytest.mark.parametrize(
    "broken",
    [
        b'{"ev":"T","sym":"A","p":18x7}',
        b'{"ev":"T","sym":"A","p":NaN}',
        b'{"ev":"T","sym":"A","p":1e400}',
        b'{"ev":"T","sym":"A","p":1,,"s":2}',
        b'{"ev":"T","sym":"A","i":"1\x00"}',
        b'{"ev":"T","sym":"A","s":tru}',
        b'{"ev":"T","sym":"A","p":1,}',
        b'{"ev":"T","sym":"A","x":"a\x01b"}',
        b'{"ev":"T","sym":"A",x:1}',
        b'{"ev":"T","sym":"A","x":"\\x41"}',
        b'{"ev":"T","sym":"A","x":"\\ud800"}',
        b'{"ev":"T","sym":"A","p":01}',
        b'{"ev":"T","sym":"A","p":1.}',
        b'{"ev":"T","sym":"A","p":-}',
        b'{"ev":"T","sym":"A","c":[1,2,]}',
    ],
)
def test_a_frame_with_one_broken_event_is_rejected_whole(broken: bytes) -> None:
    """Invalid JSON anywhere (a number, a literal, a comma, a control byte) drops the frame.

    The fast paths used to forward such an event as it came, and its valid sibling with it.
    """
    texts = [broken, b'{"ev":"T","sym":"B","p":1}']
    frame = b"[" + b",".join(texts) + b"]"
    splitter = Splitter(1)
    out = [[b"kept"]]
    with pytest.raises(FrameError, match="not valid JSON"):
        splitter.route(frame, out, [])
    assert out == [[b"kept"]]
    assert splitter.rejected_frames == 1


def test_out_must_have_one_list_per_pipe() -> None:
    """Routing into the wrong number of lists is a programming error, not a frame error."""
    with pytest.raises(ValueError, match="one list per pipe"):
        Splitter(4).route(TRADES, new_out(3), [])


def test_caches_stay_bounded() -> None:
    """A feed of ever new symbols never grows the pipe caches past their limit."""
    splitter = Splitter(4, cache_limit=50, accelerate=False)
    for batch in range(80):
        types = ["T"] if batch % 2 else ["T", "Q", "AM"]  # the layout path, then the mixed one
        symbols = [f"S{batch}X{n}" for n in range(25)]
        events = [{"ev": types[n % len(types)], "sym": s, "p": n} for n, s in enumerate(symbols)]
        out = new_out(4)
        splitter.route(orjson.dumps(events), out, [])
        assert pipe_events(out) == expected_routing(events, list(map(orjson.dumps, events)), 4)[0]
        assert splitter.cache_entries <= 3 * 50
    assert splitter.fast_frames == 80


# Property tests -----------------------------------------------------------------------------

TRICKY = [
    '},{"ev":"T","sym":"X"',
    '},{"ev":"',
    "[",
    "]",
    "{",
    "}",
    '"',
    "\\",
    '\\"',
    "Ü",
    "€",
    "😀",
    "\u2028",
    "ev",
    '"ev":',
    '"sym":"',
    ",",
    ":",
    " ",
    "\n",
    "\x00",
    "\x1f",
]
texts = (
    st.text(max_size=8)
    | st.sampled_from(TRICKY)
    | st.lists(st.sampled_from(TRICKY), max_size=4).map("".join)
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
TYPES = [
    "T",
    "Q",
    "A",
    "AM",
    "FMV",
    "LULD",
    "NOI",
    "V",
    "XT",
    "XQ",
    "C",
    "CA",
    "status",
    "NEW",
    "",
    "t 1",
]


@st.composite
def any_events(draw: st.DrawFn) -> dict[str, Any]:
    """Any event object: any type, key present or not, any field order and values."""
    event_type = draw(st.sampled_from(TYPES) | texts | st.integers())
    name = DEFAULT_ROUTE_KEYS.get(event_type, "sym") if isinstance(event_type, str) else "sym"
    fields = draw(
        st.dictionaries(texts.filter(lambda k: k not in ("ev", name)), json_values, max_size=4)
    )
    items = [("ev", event_type), *fields.items()]
    choice = draw(st.sampled_from(["symbol", "text", "other", "absent"]))
    if choice == "symbol":
        items.insert(1, (name, draw(st.text(string.ascii_uppercase + ".:-/", max_size=12))))
    elif choice == "text":
        items.append((name, draw(texts)))
    elif choice == "other":
        items.append((name, draw(json_values.filter(lambda value: not isinstance(value, str)))))
    if draw(st.booleans()):
        items = draw(st.permutations(items))
    return dict(items)


STYLES: list[dict[str, Any]] = [
    {"separators": (",", ":")},
    {"separators": (",", ":"), "ensure_ascii": False},
    {},
    {"indent": 2, "ensure_ascii": False},
    {"separators": (" , ", " : ")},
]
blanks = st.sampled_from(["", " ", "\n", "\t", "\r\n  "]).map(str.encode)


@st.composite
def frames(
    draw: st.DrawFn, events: st.SearchStrategy[dict[str, Any]]
) -> tuple[bytes, list[dict[str, Any]], list[bytes]]:
    """A frame of drawn events in a drawn JSON style, with its events' exact bytes."""
    drawn = draw(st.lists(events, max_size=6))
    style = draw(st.sampled_from(STYLES))
    event_texts = [json.dumps(event, allow_nan=False, **style).encode() for event in drawn]
    comma = draw(blanks) + b"," + draw(blanks)
    frame = (
        draw(blanks)
        + b"["
        + draw(blanks)
        + comma.join(event_texts)
        + draw(blanks)
        + b"]"
        + draw(blanks)
    )
    return frame, drawn, event_texts


@given(frames(any_events()))
@settings(max_examples=300)
def test_any_valid_frame_routes_exactly(
    case: tuple[bytes, list[dict[str, Any]], list[bytes]],
) -> None:
    """Any JSON array of objects, in any style, routes each event's exact bytes to its pipe."""
    check_routing(*case)


SYMBOLS = st.text(string.ascii_uppercase + ".-:/", min_size=1, max_size=12)
FIELDS = st.sampled_from(
    ["i", "x", "p", "s", "c", "t", "q", "z", "trfi", "bx", "ap", "v", "av", "e", "otc"]
)
MEMBERS = (
    st.integers(min_value=0, max_value=10**15)
    | st.floats(min_value=0, max_value=1e6)
    | st.lists(st.integers(min_value=0, max_value=99), max_size=4)
    | st.text(string.ascii_letters + string.digits + " .,:-[]", max_size=10)
    | st.booleans()
)


@st.composite
def feed_events(draw: st.DrawFn, types: list[str], key_second: bool = True) -> dict[str, Any]:
    """An event as the feed writes it: ev first, its key second (or later), then plain fields."""
    event_type = draw(st.sampled_from(types))
    name = DEFAULT_ROUTE_KEYS.get(event_type, "sym")
    fields = draw(st.dictionaries(FIELDS.filter(lambda field: field != name), MEMBERS, max_size=8))
    items = list(fields.items())
    items.insert(0 if key_second else draw(st.integers(0, len(items))), (name, draw(SYMBOLS)))
    return dict([("ev", event_type), *items])


def feed_frames(events: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    """Compact frames of one to 40 events, as the feed sends them."""
    return st.lists(events, min_size=1, max_size=40).map(orjson.dumps)


POLYGON_FRAMES = st.one_of(
    feed_frames(feed_events(["T"])),
    feed_frames(feed_events(["T", "Q", "A", "AM"])),
    feed_frames(feed_events(["XT", "XQ", "XA"])),
    feed_frames(feed_events(["LULD", "NOI"])),
    feed_frames(feed_events(["FMV", "T"], key_second=False)),
)


@given(POLYGON_FRAMES, st.sampled_from([1, 4, 16]))
def test_fast_path_matches_slow_path(frame: bytes, pipes: int) -> None:
    """On feed-layout frames the fast path gives byte for byte what the exact path gives."""
    fast, out, status, count = route(frame, pipes)
    assert fast.fast_frames == 1
    exact = PythonSplit(pipes, DEFAULT_ROUTE_KEYS, "sym")
    exact_out = new_out(pipes)
    exact_status: list[bytes] = []
    slow = exact.route_slow(frame, orjson.loads(frame), exact_out, exact_status)
    assert slow == count  # the exact path alone
    assert (out, status) == (pipe_events(exact_out), exact_status)
    events = orjson.loads(frame)
    check_routing(frame, events, [orjson.dumps(event) for event in events], pipes)


@given(
    POLYGON_FRAMES,
    st.integers(min_value=0),
    st.sampled_from(["delete", "insert", "replace"]),
    st.binary(min_size=1, max_size=1),
)
def test_damaged_frames_are_rejected_or_cut_exactly(
    frame: bytes, where: int, how: str, byte: bytes
) -> None:
    """A frame with one byte damaged is rejected untouched, or cut into its exact events."""
    at = where % (len(frame) + 1)
    damaged = {
        "delete": frame[:at] + frame[at + 1 :],
        "insert": frame[:at] + byte + frame[at:],
        "replace": frame[:at] + byte + frame[at + 1 :],
    }[how]
    try:
        valid = isinstance(orjson.loads(damaged), list)
    except orjson.JSONDecodeError:
        valid = False
    splitter = Splitter(1)
    out = [[b"kept"]]
    status = [b"old"]
    try:
        splitter.route(damaged, out, status)
    except FrameError:
        assert out == [[b"kept"]] and status == [b"old"]
        assert not (valid and all(isinstance(e, dict) for e in orjson.loads(damaged)))
        return
    assert valid, "a frame that does not parse was forwarded"
    exact_out = [[b"kept"]]
    exact_status = [b"old"]
    PythonSplit(1, DEFAULT_ROUTE_KEYS, "sym").route_slow(
        damaged, orjson.loads(damaged), exact_out, exact_status
    )
    assert (b"".join(out[0]), status) == (b"".join(exact_out[0]), exact_status)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_never_raise_anything_else(frame: bytes) -> None:
    """Any bytes either route or raise FrameError with nothing appended."""
    splitter = Splitter(1)
    out = new_out(1)
    try:
        splitter.route(frame, out, [])
    except FrameError:
        assert out == new_out(1)
    else:
        assert isinstance(orjson.loads(frame), list) or splitter.fast_frames == 1


# -- the pipe format's limit: what the splitter writes, the reader reads back ----------------


def test_an_event_the_reader_could_not_frame_is_refused_and_the_rest_delivered() -> None:
    """An event of LIMIT bytes or more is refused and counted; its frame's other events go on.

    It used to be written with a header the reader cannot take (0x7B001E): the reader then
    called the pipe "not the tradebalancer framing", or skipped the event as a resync.
    """
    big = b'{"ev":"T","sym":"AAPL","x":"' + b"a" * LIMIT + b'"}'
    splitter = Splitter(PIPES)
    out = new_out(PIPES)
    assert splitter.route(b"[" + big + b"]", out, []) == 0
    assert out == new_out(PIPES)
    assert splitter.refused_events == 1
    assert splitter.last_refused is not None
    assert splitter.last_refused[0] == len(big) and big.startswith(splitter.last_refused[1])
    small = TRADE_TEXTS[1]
    assert splitter.route(b"[" + big + b"," + small + b"]", out, []) == 1
    assert splitter.refused_events == 2
    parser = MessageParser()
    assert parser.receive_data(b"".join(out[pipe_for(b"MSFT", PIPES)])) == [small]
    assert parser.error is None


def test_an_event_just_under_the_limit_is_delivered() -> None:
    """An event of LIMIT - 1 bytes is written, and the reader reads it whole."""
    head = b'{"ev":"T","sym":"AAPL","x":"'
    event = head + b"a" * (LIMIT - 1 - len(head) - 2) + b'"}'
    assert len(event) == LIMIT - 1
    out = new_out(PIPES)
    assert Splitter(PIPES).route(b"[" + event + b"]", out, []) == 1
    assert MessageParser().receive_data(b"".join(out[pipe_for(b"AAPL", PIPES)])) == [event]


SMALL_LIMIT = 120  # the same rule at a size hypothesis reaches


def _read_back(data: bytes, loop: str) -> list[bytes]:
    with pytest.MonkeyPatch.context() as patch:
        if loop == "python":
            patch.setattr(framing, "_parse_in_c", None)
        parser = MessageParser(limit=SMALL_LIMIT)
        messages = parser.receive_data(data)
        parser.receive_eof()
        assert parser.error is None and parser.skipped_bytes == 0
    return messages


LAYOUT_CASES = st.lists(feed_events(["T", "Q", "XT", "LULD"]), min_size=1, max_size=40).map(
    lambda events: (orjson.dumps(events), events, [orjson.dumps(event) for event in events])
)


@given(frames(any_events()) | LAYOUT_CASES, st.sampled_from(["c", "python"]))
@settings(max_examples=300)
def test_whatever_the_splitter_writes_the_reader_reads_back(
    case: tuple[bytes, list[dict[str, Any]], list[bytes]], loop: str
) -> None:
    """Every event the splitter writes reads back exactly, in order; the rest is counted."""
    frame, drawn, texts = case
    splitter = Splitter(PIPES, limit=SMALL_LIMIT)
    out = new_out(PIPES)
    splitter.route(frame, out, [])
    expected: dict[int, list[bytes]] = {}
    oversized = 0
    for event, text in zip(drawn, texts, strict=True):
        if event.get("ev") == "status":
            continue
        if len(text) >= SMALL_LIMIT:
            oversized += 1
            continue
        expected.setdefault(pipe_for(expected_key(event), PIPES), []).append(text)
    assert splitter.refused_events == oversized
    for pipe, chunks in enumerate(out):
        assert _read_back(b"".join(chunks), loop) == expected.get(pipe, [])
