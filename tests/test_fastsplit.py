"""The C router on its own: what it accepts routes as the exact path does; the rest it declines.

tests/test_split.py runs every Splitter test with the router in front and again without it;
here are the router's own promises: it is built, it takes the feed's frames, it declines (with
nothing appended) what it must leave to Python, and it never reads past a frame.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_split import POLYGON_FRAMES, any_events, frames, new_out, pipe_events

from tradebalancer import split
from tradebalancer._fastsplit import Router
from tradebalancer.routing import pipe_for
from tradebalancer.split import DEFAULT_ROUTE_KEYS, Splitter


def router(pipes: int = 7, **route_keys: str) -> Router:
    """A router with the default route keys, or the ones given."""
    return Router(pipes, route_keys or dict(DEFAULT_ROUTE_KEYS), "sym")


def exact(frame: bytes, pipes: int) -> list[list[bytes]]:
    """Each pipe's events as the exact (slow) path routes ``frame``."""
    out = new_out(pipes)
    Splitter(pipes, accelerate=False)._route_slow(frame, out, [])
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
        (b'[{"ev":"T","sym":"A","n":' + b"[" * 65 + b"]" * 65 + b"}]", "nesting too deep"),
        (b'[{"ev":"T","sym":"A","n":[}]}]', "brackets that do not match"),
        (b'[{"ev":"T","sym":"A","p":}]', "a member without a value"),
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
    assert Router(101, {"T": "tk"}, "k").route(b"[" + b",".join(texts) + b"]", out) == 2
    events = pipe_events(out)
    assert events[pipe_for(b"B", 101)][0] == texts[0]
    assert events[pipe_for(b"D", 101)][-1] == texts[1]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ((0, {}, "sym"), ValueError, "pipes must be at least 1"),
        ((4, {"T": 1}, "sym"), TypeError, "map str to str"),
        ((4, [], "sym"), TypeError, "dict"),
        ((4, {}, b"sym"), TypeError, "str"),
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
        used.__init__(3, {}, "sym")  # type: ignore[misc]


@given(POLYGON_FRAMES, st.sampled_from([1, 4, 15, 16]))
def test_takes_every_feed_frame(frame: bytes, pipes: int) -> None:
    """Every frame in the feed's layouts is the router's, routed as the exact path does."""
    out = new_out(pipes)
    assert router(pipes).route(frame, out) == len(orjson.loads(frame))
    assert pipe_events(out) == exact(frame, pipes)


@given(frames(any_events()))
@settings(max_examples=300)
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
def test_any_bytes_are_routed_or_declined(frame: bytes) -> None:
    """Any bytes at all, a cut frame included: a count or -1 with nothing appended, no crash."""
    out = new_out(3)
    count = router(3).route(frame, out)
    assert count >= -1
    if count == -1:
        assert out == new_out(3)
    else:
        assert sum(map(len, pipe_events(out))) == count
