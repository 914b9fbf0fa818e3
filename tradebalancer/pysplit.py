"""The split in Python: the reference the C router is held to, and its fallback.

Owns the two Python paths of split.py's ``Splitter``, for every frame the C router declines
(``_fastsplit.c``) or every frame when it is not built: each frame is parsed by
``orjson.loads`` first (nothing invalid is cut), then cut by the fast path if it is in the
feed's layout, else by the slow path. Same contract as the C router: for each event its 4-byte
length then its exact bytes on its pipe's list, status events on their own list, FrameError
with nothing appended for a frame that is not a JSON array of objects. No I/O, no clock.

Python fast path. The feed writes ``[{"ev":"T","sym":"AAPL",...},{"ev":"T","sym":"MSFT",...}]``:
compact, ``ev`` first, the key second. Such a frame is cut with a few C-level passes (split,
join, memchr) and one dict lookup per event, keyed on the event's first bytes, if:

1. it is ASCII, has no backslash, starts with ``[{"ev":"`` and ends with ``}]``;
2. the first event's type and its route key name R are alphanumeric, the type not status;
3. cut on a separator S, no piece holds ``{`` or ``}``. Layout path (first and last events
   start alike): S is ``},`` and the first event's head ``{"ev":"T","sym":"``, a piece is the
   rest of an event. Mixed path (other frames): S is ``},{"ev":"``, a piece starts at the type;
4. no piece has a member named ``ev``; none has one named R (layout path), or each has one
   (mixed path): quoted names are counted where no colon comes right before them;
5. each type maps to R, whose value is a string without control bytes, then ``,`` or ``}``:
   checked when an event head is first seen, its pipe then cached by the head's bytes.

Why the cut is exact for a frame that passes and is valid JSON: with no backslash every ``"``
opens or closes a string. In S the ``"`` after ``{`` opens one (``ev`` cannot follow a closing
quote), so S's ``},{`` is outside strings: an object ends, a comma, an object starts. By check
3 every ``{`` is at offset 1 or in an S, right after ``},``. A nested object would start after
``:``, after ``[``, or after ``},`` behind an earlier element of a nested array whose first
object follows ``[`` or a non-object: impossible, so events hold no objects and each S parts
two top-level elements. A non-object element would put a ``{`` after a ``,`` without ``}``, and
``}]`` closes an object, so the elements are exactly the pieces rewrapped. By check 4 the
head's ``ev`` and key are the only ones (names are matched without their colon, which may
follow whitespace), and ASCII without escapes is its own decoded UTF-8.

Every frame is valid JSON before the fast path sees it (orjson.loads has parsed it), so its
checks only find where the events are; an event over 16 KiB (no feed event comes near) sends
its frame to the slow path.

Slow path: the parsed items give each event's type and key, spans.py each object's bytes.

Measured by tests/bench_split.py (300 trades a frame, 4,000 symbols, CPython 3.11, this 2-core
machine), ns per event: layout path 265-305, mixed 335-410, the same after orjson.loads (the
Python paths now) 720-810, slow path 1,420-1,640; ``orjson.loads`` alone 450-500. Most of the
fast path is two allocations per event (the piece from split, the event from join) and four
list operations; the benchmark's docstring lists the designs compared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import orjson

from .errors import EXCERPT_BYTES, FrameError
from .reader import format
from .routing import PipeMap
from .spans import object_spans

__all__ = ["CACHE_LIMIT", "PythonSplit"]

_FRAME_HEAD: Final = b'[{"ev":"'
_FRAME_TAIL: Final = b"}]"
_SEPARATOR: Final = b'},{"ev":"'
_EVENT_PAIR: Final = (b'{"ev":"', b"}")  # piece.join(pair) == b'{"ev":"' + piece + b"}"
_STATUS: Final = b"status"
_EV_NAME: Final = b'"ev"'  # no colon: whitespace may come before it
_EV_LETTERS: Final = (b"e", b"v")
_AFTER_VALUE: Final = (b",", b"")  # what may follow a route key's closing quote in a piece

# Pipe caches keyed by an event's first bytes, so the hot loop slices once and looks up once
# instead of searching for the key's closing quote (about 50 ns less per event, measured).
# Layout path: the key and its closing quote, for keys of up to 7 bytes ("AAPL","i" for a
# trade); mixed path: the type and key name too ('T","sym":"AAPL","i"'). Longer keys are
# looked up by their exact bytes instead. The windows are short enough that the bytes after
# the key are still member names, not changing values, so a symbol fills only a few entries.
_KEY_WINDOW: Final = slice(0, 8)
_HEAD_WINDOW: Final = slice(0, 18)
_HEAD_LIMIT: Final = 1 << 12  # distinct event types remembered
# A live feed fills each pipe cache with a few entries per symbol (tens of thousands); a hostile
# one could send a new symbol in every event. At this many entries (about 25 MB each) a cache
# is dropped and refills from the symbols still flowing.
CACHE_LIMIT: Final = 1 << 18

# Prebuilt length headers (format.py): a fast-path event longer than the table sends its frame
# to the slow path, which also checks the pipe format's limit.
_HEADERS: Final = format.headers()

_KINDS: Final = {dict: "an object", list: "an array", str: "a string", type(None): "null"}


class _NotFast(Exception):
    """The fast path cannot take this frame; the slow path decides."""


class _Head:
    """What the fast path needs for events of one type: its head bytes and route key name."""

    def __init__(self, event_type: bytes, key: bytes) -> None:
        """Prepare the byte strings for type ``event_type`` routed by member ``key``."""
        self.key = key
        self.head = b'{"ev":"' + event_type + b'","' + key + b'":"'
        self.prefix = b"[" + self.head
        self.separator = b"}," + self.head
        self.pair = (self.head, b"}")
        self.name = b'"' + key + b'"'  # the member name (a colon may follow after whitespace)
        self.string_member = self.name + b':"'  # the member, written compactly, with a string
        self.value = key + b'":"'  # the second member, after the '","' that ends the type
        self.letters = tuple(bytes((letter,)) for letter in sorted(set(key)))


def _names(data: bytes, name: bytes) -> int:
    """Count the quoted ``name`` in ``data`` where it is no value (no colon right before it)."""
    count = data.count(name)
    return count - data.count(b":" + name) if count else 0


def _lacks(data: bytes, letters: tuple[bytes, ...], name: bytes) -> bool:
    """Return whether no member of ``data`` is named ``name``, by memchr for a letter first."""
    # A letter of the name that never occurs proves the name absent in about 1 ns per event;
    # only when all occur does the full count (50 ns per event) run.
    for letter in letters:
        if letter not in data:
            return True
    return _names(data, name) == 0


def _describe(value: object) -> str:
    """Name the JSON kind of a parsed value, for a FrameError's reason."""
    return _KINDS.get(type(value), "a boolean" if isinstance(value, bool) else "a number")


def _emit(
    pieces: list[bytes],
    pair: tuple[bytes, bytes],
    window: slice,
    cache: dict[bytes, int],
    resolve: Callable[[bytes, _Head], int],
    head: _Head,
    out: list[list[bytes]],
    headers: list[bytes],
    counts: list[int],
) -> bool:
    """Append header and event for each piece to its pipe's list and count it in ``counts``;
    on failure undo and say so.

    ``headers`` is indexed by event length; an event too long for it fails the piece.
    """
    get = cache.get
    try:
        for piece in pieces:
            pipe = get(piece[window])
            if pipe is None:
                pipe = resolve(piece, head)
            event = piece.join(pair)
            target = out[pipe]
            target.append(headers[len(event)])
            target.append(event)
            counts[pipe] += 1
    except (_NotFast, IndexError):
        # Undo in reverse order: the two last entries of each pipe's list are then always the
        # ones this piece added. Identical pieces fail alike, so index() finds the failed one.
        failed = pieces.index(piece)
        for done in reversed(pieces[:failed]):
            pipe = get(done[window])
            if pipe is None:
                pipe = resolve(done, head)
            del out[pipe][-2:]
            counts[pipe] -= 1
        return False
    return True


class PythonSplit:
    """The Python paths: a frame parsed, then cut by the fast path or the slow path."""

    def __init__(
        self,
        pipes: int,
        route_keys: Mapping[str, str],
        default_key: str,
        *,
        cache_limit: int = CACHE_LIMIT,
        limit: int = format.LIMIT,
    ) -> None:
        """Route over ``pipes`` pipes as split.py's Splitter says; ``limit`` bounds events."""
        self._pipe_map = PipeMap(pipes, cache_limit)
        self._route_keys = dict(route_keys)
        self._default_key = default_key
        self._limit = limit
        # The fast path's header table, no longer than the limit allows: a longer event fails
        # its piece and the frame goes to the slow path, which refuses it.
        self._headers = _HEADERS[:limit]
        self._cache_limit = cache_limit
        self.fast_frames = 0
        self.slow_frames = 0
        self.rejected_frames = 0
        self.unkeyed_events = 0
        self.refused_events = 0  # of limit bytes or more: the pipe format cannot carry them
        self.last_refused: tuple[int, bytes] | None = None  # the last one's size and first bytes
        self.pipe_events = [0] * pipes  # routed, per pipe
        self._heads: dict[bytes, _Head | None] = {}
        self._key_pipes: dict[bytes, int] = {}
        self._head_pipes: dict[bytes, dict[bytes, int]] = {}

    def route(self, frame: bytes, out: list[list[bytes]], status: list[bytes]) -> int:
        """Route ``frame`` as ``Splitter.route`` does, by the Python paths alone."""
        try:
            items = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            self.rejected_frames += 1
            raise FrameError(f"not valid JSON: {exc}", frame) from exc
        routed = self.route_fast(frame, out)
        if routed >= 0:
            self.fast_frames += 1
            return routed
        try:
            routed = self.route_slow(frame, items, out, status)
        except FrameError:
            self.rejected_frames += 1
            raise
        self.slow_frames += 1
        return routed

    @property
    def cache_entries(self) -> int:
        """Return how many entries the pipe caches hold now, each cache at most cache_limit."""
        heads = sum(len(cache) for cache in self._head_pipes.values())
        return len(self._pipe_map) + len(self._key_pipes) + heads

    def _head_of(self, event_type: bytes) -> _Head | None:
        """Return the fast path's data for ``event_type``, or None if it must go slow."""
        try:
            return self._heads[event_type]
        except KeyError:
            pass
        head = None
        if event_type.isalnum() and event_type != _STATUS:
            name = self._route_keys.get(event_type.decode("ascii"), self._default_key)
            key = name.encode("utf-8", "replace")
            if key.isalnum():
                head = _Head(event_type, key)
        if len(self._heads) >= _HEAD_LIMIT:
            self._heads.clear()
        self._heads[event_type] = head
        return head

    def route_fast(self, frame: bytes, out: list[list[bytes]]) -> int:
        """Route a frame in the feed's usual layout and return its event count, else -1."""
        if (
            not frame.startswith(_FRAME_HEAD)
            or not frame.endswith(_FRAME_TAIL)
            or b"\\" in frame
            or not frame.isascii()
        ):
            return -1
        type_end = frame.find(b'"', len(_FRAME_HEAD))
        head = self._head_of(frame[len(_FRAME_HEAD) : type_end]) if type_end > 0 else None
        if head is None:
            return -1
        if frame.startswith(head.prefix):
            last = frame.rfind(_SEPARATOR)
            if last < 0 or frame.startswith(head.head, last + 2):
                routed = self._route_layout(frame, head, out)
                if routed >= 0:
                    return routed
        return self._route_mixed(frame, head, out)

    def _route_layout(self, frame: bytes, head: _Head, out: list[list[bytes]]) -> int:
        """Route a frame whose events all start with ``head``; return the count, else -1."""
        pieces = frame[len(head.prefix) : -len(_FRAME_TAIL)].split(head.separator)
        rests = b"\0".join(pieces)  # NUL, so that no name forms across two pieces
        if (
            b"{" in rests
            or b"}" in rests
            or not _lacks(rests, _EV_LETTERS, _EV_NAME)
            or not _lacks(rests, head.letters, head.name)
        ):
            return -1
        if not _emit(
            pieces,
            head.pair,
            _KEY_WINDOW,
            self._key_pipes,
            self._resolve_key,
            head,
            out,
            self._headers,
            self.pipe_events,
        ):
            return -1
        return len(pieces)

    def _route_mixed(self, frame: bytes, head: _Head, out: list[list[bytes]]) -> int:
        """Route a frame of events of types that share ``head``'s route key, else return -1."""
        pieces = frame[len(_FRAME_HEAD) : -len(_FRAME_TAIL)].split(_SEPARATOR)
        joined = b"\0".join(pieces)
        names = joined.count(head.name)
        if (
            b"{" in joined
            or b"}" in joined
            or not _lacks(joined, _EV_LETTERS, _EV_NAME)
            or (names != len(pieces) and _names(joined, head.name) != len(pieces))
        ):
            return -1
        cache = self._head_pipes.setdefault(head.key, {})
        if not _emit(
            pieces,
            _EVENT_PAIR,
            _HEAD_WINDOW,
            cache,
            self._resolve_head,
            head,
            out,
            self._headers,
            self.pipe_events,
        ):
            return -1
        return len(pieces)

    def _remember(self, cache: dict[bytes, int], window: bytes, pipe: int) -> None:
        """Cache ``pipe`` for ``window``, dropping the cache first when it is full."""
        if len(cache) >= self._cache_limit:
            cache.clear()
        cache[window] = pipe

    def _pipe_of(self, key: bytes) -> int:
        """Return the pipe of a key read raw from a string, which JSON forbids control bytes in."""
        if key and min(key) < 0x20:
            raise _NotFast
        return self._pipe_map.pipe(key)

    def _resolve_key(self, piece: bytes, head: _Head) -> int:
        """Return the pipe of a layout-path piece (key, quote, rest) and cache it by window."""
        end = piece.find(b'"')
        if end < 0 or piece[end + 1 : end + 2] not in _AFTER_VALUE:
            raise _NotFast
        pipe = self._pipe_of(piece[:end])
        if end < _KEY_WINDOW.stop:
            self._remember(self._key_pipes, piece[_KEY_WINDOW], pipe)
        return pipe

    def _resolve_head(self, piece: bytes, head: _Head) -> int:
        """Return the pipe of a mixed-path piece (type, members) and cache it when it can."""
        end = piece.find(b'"')
        own = self._head_of(piece[:end]) if end > 0 else None
        if own is None or own.key != head.key or not piece.startswith(b'","', end):
            raise _NotFast
        start = end + 3
        window = piece.startswith(own.value, start)
        if window:  # the key is the second member: its pipe can be cached by the window
            start += len(own.value)
        else:  # elsewhere: the frame's count says one member of this piece is named R
            start = piece.find(own.string_member)
            if start < 0:
                raise _NotFast
            start += len(own.string_member)
        end = piece.find(b'"', start)
        if end < 0 or piece[end + 1 : end + 2] not in _AFTER_VALUE:
            raise _NotFast
        pipe = self._pipe_of(piece[start:end])
        if window and end < _HEAD_WINDOW.stop:
            self._remember(self._head_pipes[head.key], piece[_HEAD_WINDOW], pipe)
        return pipe

    def route_slow(
        self, frame: bytes, items: object, out: list[list[bytes]], status: list[bytes]
    ) -> int:
        """Route a frame parsed as ``items`` exactly, or raise FrameError, appending nothing."""
        if not isinstance(items, list):
            raise FrameError(f"{_describe(items)}, not an array", frame, "not_an_array")
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise FrameError(
                    f"element {index} is {_describe(item)}, not an object", frame, "not_an_object"
                )
        spans = object_spans(frame)
        if len(spans) != len(items):  # cannot happen for valid JSON; never forward a guess
            raise FrameError(
                f"found {len(spans)} objects, the parser {len(items)}", frame, "parse_mismatch"
            )
        routes: list[tuple[int, bytes]] = []
        statuses: list[bytes] = []
        unkeyed = refused = 0
        limit = self._limit
        for (start, end), item in zip(spans, items, strict=True):
            event_type = item.get("ev")
            if event_type == "status":
                statuses.append(frame[start:end])
                continue
            if end - start >= limit:
                refused += 1
                self.last_refused = (end - start, bytes(frame[start : start + EXCERPT_BYTES]))
                continue
            if isinstance(event_type, str):
                name = self._route_keys.get(event_type, self._default_key)
            else:
                name = self._default_key
            value = item.get(name)
            if isinstance(value, str):
                key = value.encode("utf-8")
            else:
                key = b""
                unkeyed += 1
            routes.append((self._pipe_map.pipe(key), frame[start:end]))
        header = format.header
        counts = self.pipe_events
        for pipe, event in routes:
            target = out[pipe]
            target.append(header(len(event)))
            target.append(event)
            counts[pipe] += 1
        status.extend(statuses)
        self.unkeyed_events += unkeyed
        self.refused_events += refused
        return len(routes)
