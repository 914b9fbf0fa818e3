"""Byte spans of the objects in a JSON array: where each element starts and ends, exactly.

Owns finding, in JSON text that a parser has already accepted as an array of objects, each
object's bytes from its ``{`` to its matching ``}``, whatever the whitespace, nesting, escapes
or braces inside strings, so that split.py can forward every event as it was received. It does
not validate (that is the parser's job) and does no I/O.

Objects are found by jumps, not byte by byte: ``bytes.find`` (memchr) takes an object's first
``}`` as its end when the text has no backslash (so every ``"`` opens or closes a string), no
``{`` comes before that ``}`` and an even number of ``"`` does (the ``}`` is outside strings
and nothing nested is open), which is every object of a feed frame; other objects are matched
by a regex that steps over whole strings, escapes included, and counts brace depth.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["object_spans"]

# One match per brace outside strings: a run of other bytes and whole strings, then the brace.
_BRACE: Final = re.compile(rb'[^"{}]*+(?:"[^"\\]*+(?:\\.[^"\\]*+)*+"[^"{}]*+)*+[{}]', re.DOTALL)
_OPEN_BRACE: Final = ord("{")


def _match_brace(text: bytes, start: int) -> int:
    """Return the offset of the ``}`` closing the object that opens at ``start``, or -1."""
    depth = 0
    for match in _BRACE.finditer(text, start):
        brace = match.end() - 1
        if text[brace] == _OPEN_BRACE:
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return brace
    return -1


def object_spans(text: bytes) -> list[tuple[int, int]]:
    """Return ``(start, end)`` of each top-level object of ``text``, a JSON array of objects.

    ``text[start:end]`` is the object's exact bytes. On text that is not such an array the
    result is meaningless but finite; an object left unclosed ends the list.
    """
    spans: list[tuple[int, int]] = []
    find = text.find
    count = text.count
    plain = b"\\" not in text
    start = find(b"{")
    while start >= 0:
        # Between elements there are only commas and whitespace, so the next "{" opens the
        # next element.
        end = find(b"}", start)
        if end < 0 or not plain or find(b"{", start + 1, end) >= 0 or count(b'"', start, end) % 2:
            end = _match_brace(text, start)
            if end < 0:
                break
        spans.append((start, end + 1))
        start = find(b"{", end + 1)
    return spans
