"""Byte spans of a JSON array's objects: exact, whatever the spacing, nesting and escapes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradebalancer.spans import object_spans


def spans_of(texts: list[bytes], comma: bytes = b",", edge: bytes = b"") -> list[tuple[int, int]]:
    """The spans ``texts`` occupy once joined into an array with ``comma`` and ``edge``."""
    spans = []
    offset = len(edge) + 1
    for text in texts:
        spans.append((offset, offset + len(text)))
        offset += len(text) + len(comma)
    return spans


@pytest.mark.parametrize(
    "texts",
    [
        [],
        [b"{}"],
        [b"{}", b"{ }", b'{"a":{}}'],
        [b'{"ev":"T","sym":"A"}', b'{"ev":"T","sym":"B"}'],
        [b'{"s":"}"}', b'{"s":"{"}', b'{"s":"},{"}'],
        [b'{"s":"\\"}"}', b'{"s":"\\\\"}', b'{"s":"\\\\\\"}{"}'],
        [b'{"n":{"m":{"k":[{"x":"}"}]}}}', b'{"a":[1,[2,{"b":3}]]}'],
        [b'{"u":"\\u007d\\u007b"}', '{"é":"€}"}'.encode()],
        [b'{\n  "a": 1,\n  "b": [\n    2\n  ]\n}', b'{"c" : "d"}'],
    ],
)
@pytest.mark.parametrize(("comma", "edge"), [(b",", b""), (b" ,\n ", b" \t")])
def test_spans_of_tricky_arrays(texts: list[bytes], comma: bytes, edge: bytes) -> None:
    """Every object's span covers exactly its bytes, braces in strings and nesting included."""
    text = edge + b"[" + comma.join(texts) + b"]" + edge
    assert object_spans(text) == spans_of(texts, comma, edge)


@pytest.mark.parametrize("tail", [b'{"b":[1,2', b'{"b":"x\\"', b'{"b":{"c":{}}', b'{"b":"}'])
def test_unclosed_object_ends_the_list(tail: bytes) -> None:
    """On text cut inside an object, the objects before it are still found exactly."""
    assert object_spans(b'[{"a":1},' + tail)[:1] == [(1, 8)]
    assert len(object_spans(b'[{"a":1},' + tail)) <= 2


keys = st.text(max_size=6) | st.sampled_from(["{", "}", '"', "\\", "},{", "\\}"])
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | keys,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
STYLES: list[dict[str, Any]] = [
    {"separators": (",", ":")},
    {"ensure_ascii": False},
    {"indent": 1},
    {"indent": "\t", "ensure_ascii": False},
]


@given(
    st.lists(st.dictionaries(keys, values, max_size=4), max_size=6),
    st.sampled_from(STYLES),
    st.sampled_from([b",", b", ", b"\n,\n"]),
)
def test_spans_of_any_array_of_objects(
    objects: list[dict[str, Any]], style: dict[str, Any], comma: bytes
) -> None:
    """Any array of objects, written in any style, has its objects' exact spans found."""
    texts = [json.dumps(item, allow_nan=False, **style).encode() for item in objects]
    text = b"[" + comma.join(texts) + b"]"
    spans = object_spans(text)
    assert spans == spans_of(texts, comma)
    assert [json.loads(text[start:end]) for start, end in spans] == objects
