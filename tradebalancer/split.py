"""Feed frame -> events: each event's exact bytes, length-prefixed, on the list of its pipe.

Owns the balancer's hot path. A frame (one websocket message) is a JSON array of events; for
each the splitter appends to its pipe's list (routing.py) the event's 4-byte little-endian
length, then its bytes exactly as received, ``{`` to matching ``}``: it never re-serialises
(the pipe format is reader/format.py's, the one the workers' reader imports too). Status
events go to a list of their own for the feed. No I/O, no clock, no logging; a frame that is
not a JSON array of objects raises FrameError with nothing appended.

An event of ``format.LIMIT`` bytes or more (7.7 MiB; ``max_message_size`` lets frames of 16 MiB
through) cannot be framed for a worker: it is refused, never written, counted in
``refused_events`` with its size and first bytes in ``last_refused`` for the log, and the
other events of its frame go on.

Route key: the member named ``route_keys[ev]``, else ``default_key``, if its value is a string;
the bytes hashed are that string decoded, as UTF-8 (``"A\\u0041PL"`` routes as ``AAPL``). An
event without one routes with key ``b""`` and counts in ``unkeyed_events``. A repeated name
counts by its last value, as in orjson and json (RFC 8259 section 4 leaves it to the receiver),
so a worker that parses the event sees the key it was routed by.

C router. ``_fastsplit.c`` takes every frame first: a one-pass scanner that finds each event's
exact bytes, its type and its key (last value of a repeated name, as above), hashes the key
and writes each pipe's share of the frame as one chunk. Events in the feed's layout (type
first, key second) are cut sixteen bytes at a step, strings found by the parity of quotes;
others token by token. It declines, appending nothing, what
would need decoding or is not plainly an array of objects (non-ASCII bytes, escapes in a
name, the type or the key, a status event, a missing or non-string type or key, deep
nesting); the Python paths below then decide, so the C router changes speed, never results.
tests/test_split.py runs every test with it and without it.

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

Validity. Nothing that is not valid JSON (RFC 8259, UTF-8) reaches a worker: the C router
validates every frame it takes in full (valid_frame in _fastsplit.c) and declines the rest;
every frame the Python paths see is parsed by ``orjson.loads`` first, which rejects it whole
(FrameError) unless it is valid; so a frame ``[{..."p":18x7},{"ev":"T","sym":"IBM","p":2}]``
is dropped with both its events, counted and logged, never cut. The fast path's checks then
only find where the events are; an event over 16 KiB (no feed event comes near) sends its frame
to the slow path.

Slow path: the parsed items give each event's type and key, spans.py each object's bytes.

Runs. ``route_frames`` takes a run of whole plain websocket frames in the receive buffer
(frames.py) rather than one message: the C router validates, cuts and routes each payload in
place, all of the run's events behind each other in one chunk per pipe, and a frame it declines
is copied out for the Python paths; tests/test_frames.py checks that a run routes as its
payloads one by one.

Measured by tests/bench_split.py (300 trades a frame, 4,000 symbols, CPython 3.11, this 2-core
machine), ns per event, before the C router validated the frame: C router 54-59; Python
layout path 265-305, mixed 335-410, the same after orjson.loads (the Python paths now) 720-810,
slow path 1,420-1,640; ``orjson.loads`` alone 450-500. The C router's JSON check adds 49-58 ns
(``make bench``'s stages, and alternating pairs; 158-172 before its 64-byte pass). Most of the
Python fast path
is two allocations per event (the piece from split, the event from join) and four list
operations; the benchmark's docstring lists the designs compared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import orjson

from .delay import event_time
from .errors import EXCERPT_BYTES, FrameError
from .frames import frame_bounds
from .reader import format
from .routing import DEFAULT_ROUTE_KEYS, PipeMap
from .spans import object_spans

try:
    from ._fastsplit import Router
except ImportError:  # a source tree whose extension is not built: the Python paths alone
    Router = None  # type: ignore[assignment,misc]

__all__ = ["CACHE_LIMIT", "Splitter", "accelerated"]


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


def accelerated() -> bool:
    """Whether the C router is built (without it, events are split in Python alone)."""
    return Router is not None


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


class Splitter:
    """Cuts frames into events and appends each, length-prefixed, to its pipe's list."""

    def __init__(
        self,
        pipes: int,
        route_keys: Mapping[str, str] = DEFAULT_ROUTE_KEYS,
        default_key: str = "sym",
        *,
        cache_limit: int = CACHE_LIMIT,
        accelerate: bool = True,
        limit: int = format.LIMIT,
    ) -> None:
        """Split over ``pipes`` pipes, routing each event type by its member in ``route_keys``.

        Types not in ``route_keys`` route by ``default_key``. Each pipe cache is dropped when it
        reaches
        ``cache_limit`` entries. With ``accelerate`` (and the extension built) the C router
        takes every frame it can before the Python paths see it. ``limit`` (the pipe format's,
        smaller in tests) bounds the events written.
        """
        if not 3 <= limit <= format.LIMIT:
            raise ValueError(f"limit must be from 3 to {format.LIMIT:#x}, got {limit}")
        self._pipe_map = PipeMap(pipes, cache_limit)
        self.pipes = pipes
        # Fixed for the splitter's life: the caches below and the C router's tables depend on them.
        self._route_keys = dict(route_keys)
        self._default_key = default_key
        use_router = accelerate and Router is not None
        self._router = Router(pipes, self._route_keys, default_key, limit) if use_router else None
        self._limit = limit
        # The fast path's header table, no longer than the limit allows: a longer event fails
        # its piece and the frame goes to the slow path, which refuses it.
        self._headers = _HEADERS[:limit]
        # Whether the C router runs first (False only if the extension is not built).
        self.accelerated = self._router is not None
        self._cache_limit = cache_limit
        self.fast_frames = 0
        self.slow_frames = 0
        self.rejected_frames = 0
        self.unkeyed_events = 0
        self.refused_events = 0  # of limit bytes or more: the pipe format cannot carry them
        self.last_refused: tuple[int, bytes] | None = None  # the last one's size and first bytes
        self._pipe_events = [0] * pipes  # routed by the Python paths, per pipe
        self._heads: dict[bytes, _Head | None] = {}
        self._key_pipes: dict[bytes, int] = {}
        self._head_pipes: dict[bytes, dict[bytes, int]] = {}

    def route(self, frame: bytes, out: list[list[bytes]], status: list[bytes]) -> int:
        """Route every event of ``frame`` and return how many went to pipes.

        For each event other than a status event, appends to ``out[pipe]`` its 4-byte
        little-endian length and then its exact bytes, so that ``b"".join(out[pipe])`` is what
        the pipe gets (the C router appends one chunk per pipe and frame, the Python paths two
        per event: only the join is the contract); appends each status event's exact bytes to
        ``status``. Raises FrameError, with ``out`` and ``status`` untouched, if the frame is
        not a JSON array of objects, and ValueError if ``out`` does not hold one list per pipe.
        """
        if len(out) != self.pipes:
            raise ValueError(f"out must hold one list per pipe ({self.pipes}), got {len(out)}")
        if self._router is not None:
            routed = self._router.route(frame, out)  # validates; declines what is not valid
            if routed >= 0:
                self.fast_frames += 1
                return routed
        return self._route_python(frame, out, status)

    def route_frames(
        self,
        run: memoryview,
        max_size: int,
        out: list[list[bytes]],
        status: list[bytes],
        stamps: list[float],
    ) -> tuple[int, int, list[FrameError]]:
        """Route each frame of ``run`` (whole plain websocket frames, frames.py) as ``route``
        does its payload; return (frames, events, the FrameError of each frame rejected).

        The C router takes the run in one pass, straight from the buffer, each pipe's share of
        all its frames as one chunk, until a frame it declines, which the Python paths take,
        copied; then it goes on. Each routed frame's ``event_time`` goes to ``stamps``.
        """
        frames = events = 0
        rejected: list[FrameError] = []
        at, size, router = 0, len(run), self._router
        while at < size:
            if router is not None:
                at, fast, routed = router.route_frames(run, at, max_size, out, stamps)
                frames, events = frames + fast, events + routed
                self.fast_frames += fast
                if at >= size:
                    break
            bounds = frame_bounds(run, at, max_size)
            assert bounds is not None and bounds[0], "route_frames takes whole plain frames"
            _plain, payload, at = bounds
            frames += 1
            try:
                events += self.route_message(bytes(run[payload:at]), out, status, stamps)
            except FrameError as exc:
                rejected.append(exc)
        return frames, events, rejected

    def route_message(
        self, message: bytes, out: list[list[bytes]], status: list[bytes], stamps: list[float]
    ) -> int:
        """``route`` one message, and put its ``event_time`` in ``stamps`` once it is routed
        (a rejected frame has no sample): what ``route_frames`` does for each of a run's."""
        routed = self.route(message, out, status)
        if (stamp := event_time(message)) is not None:
            stamps.append(stamp)
        return routed

    def _route_python(self, frame: bytes, out: list[list[bytes]], status: list[bytes]) -> int:
        try:
            items = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            self.rejected_frames += 1
            raise FrameError(f"not valid JSON: {exc}", frame) from exc
        routed = self._route_fast(frame, out)
        if routed >= 0:
            self.fast_frames += 1
            return routed
        try:
            routed = self._route_slow(frame, items, out, status)
        except FrameError:
            self.rejected_frames += 1
            raise
        self.slow_frames += 1
        return routed

    def pipe_events(self) -> list[int]:
        """The events routed to each pipe so far, by the C router and the Python paths."""
        if self._router is None:
            return list(self._pipe_events)
        return [a + b for a, b in zip(self._router.pipe_events(), self._pipe_events, strict=True)]

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

    def _route_fast(self, frame: bytes, out: list[list[bytes]]) -> int:
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
            self._pipe_events,
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
            self._pipe_events,
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

    def _route_slow(
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
        counts = self._pipe_events
        for pipe, event in routes:
            target = out[pipe]
            target.append(header(len(event)))
            target.append(event)
            counts[pipe] += 1
        status.extend(statuses)
        self.unkeyed_events += unkeyed
        self.refused_events += refused
        return len(routes)
