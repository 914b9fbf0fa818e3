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
nesting); the Python paths then decide, so the C router changes speed, never results.
tests/test_split.py runs every test with it and without it.

Python paths (pysplit.py). Every frame the C router declines, or every frame without it, is
parsed by ``orjson.loads`` first, then cut by the Python fast path if it is in the feed's
layout, else by the slow path: the reference the C router is tested against, and the
fallback.

Validity. Nothing that is not valid JSON (RFC 8259, UTF-8) reaches a worker: the C router
validates every frame it takes in full (valid_frame in _fastsplit.c) and declines the rest;
every frame the Python paths see is parsed by ``orjson.loads`` first, which rejects it whole
(FrameError) unless it is valid; so a frame ``[{..."p":18x7},{"ev":"T","sym":"IBM","p":2}]``
is dropped with both its events, counted and logged, never cut.

Runs. ``route_frames`` takes a run of whole plain websocket frames in the receive buffer
(frames.py) rather than one message: the C router validates, cuts and routes each payload in
place, all of the run's events behind each other in one chunk per pipe, and a frame it declines
is copied out for the Python paths; tests/test_frames.py checks that a run routes as its
payloads one by one.

Measured by tests/bench_split.py (300 trades a frame, 4,000 symbols, CPython 3.11, this 2-core
machine), ns per event: the C router 54-59 before it validated the frame; its JSON check adds
49-58 (``make bench``'s stages, and alternating pairs; 158-172 before its 64-byte pass). The
Python paths' figures are pysplit.py's.
"""

from __future__ import annotations

from collections.abc import Mapping

from .delay import event_time
from .errors import FrameError
from .frames import frame_bounds
from .pysplit import CACHE_LIMIT, PythonSplit
from .reader import format
from .routing import DEFAULT_ROUTE_KEYS

try:
    from ._fastsplit import Router
except ImportError:  # a source tree whose extension is not built: the Python paths alone
    Router = None  # type: ignore[assignment,misc]

__all__ = ["CACHE_LIMIT", "Splitter", "accelerated"]


def accelerated() -> bool:
    """Whether the C router is built (without it, events are split in Python alone)."""
    return Router is not None


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

        Types not in ``route_keys`` route by ``default_key``. Each of the Python paths' pipe
        caches is dropped when it reaches ``cache_limit`` entries. With ``accelerate`` (and the
        extension built) the C router takes every frame it can before the Python paths see
        it. ``limit`` (the pipe format's, smaller in tests) bounds the events written.
        """
        if not 3 <= limit <= format.LIMIT:
            raise ValueError(f"limit must be from 3 to {format.LIMIT:#x}, got {limit}")
        self.pipes = pipes
        route_keys = dict(route_keys)
        use_router = accelerate and Router is not None
        self._router = Router(pipes, route_keys, default_key, limit) if use_router else None
        # Whether the C router runs first (False only if the extension is not built).
        self.accelerated = self._router is not None
        self._router_frames = 0  # frames the C router cut
        self._python = PythonSplit(
            pipes, route_keys, default_key, cache_limit=cache_limit, limit=limit
        )

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
                self._router_frames += 1
                return routed
        return self._python.route(frame, out, status)

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
                self._router_frames += fast
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

    def pipe_events(self) -> list[int]:
        """The events routed to each pipe so far, by the C router and the Python paths."""
        python = self._python.pipe_events
        if self._router is None:
            return list(python)
        return [a + b for a, b in zip(self._router.pipe_events(), python, strict=True)]

    @property
    def fast_frames(self) -> int:
        """Frames the C router or the Python fast path cut."""
        return self._router_frames + self._python.fast_frames

    @property
    def slow_frames(self) -> int:
        """Frames the slow path cut."""
        return self._python.slow_frames

    @property
    def rejected_frames(self) -> int:
        """Frames that are not a JSON array of objects, dropped whole."""
        return self._python.rejected_frames

    @property
    def unkeyed_events(self) -> int:
        """Events without a route key that is a string (routed with the empty key)."""
        return self._python.unkeyed_events

    @property
    def refused_events(self) -> int:
        """Events of ``limit`` bytes or more: the pipe format cannot carry them."""
        return self._python.refused_events

    @property
    def last_refused(self) -> tuple[int, bytes] | None:
        """The last refused event's size and first bytes."""
        return self._python.last_refused

    @property
    def cache_entries(self) -> int:
        """Return how many entries the Python paths' pipe caches hold now."""
        return self._python.cache_entries
