"""What the replay feed sends, as bytes, before any socket: its messages and its stream.

Owns the feed's status messages (``CONNECTED``, ``AUTH_SUCCESS``, ``AUTH_FAILED``, ``status``),
the header of an unmasked websocket frame (RFC 6455 5.2), and the stream every connection takes
its data frames from: the frames of the source the replay options name, loaded into memory (a
recording file, read by ``synth.read_recording_events``, or synthetic trades from
``synth.generate_frames``), with a cursor over them; and writing that source to a recording
file (``--record-to``).

Design notes:

* One stream feeds every connection: the events a connection was sent are not sent again to
  the next one.
* ``events`` ends the stream after exactly that many (the last frame is shortened if needed).
* ``disconnect_after``: the stream says (``take_cut``) when to cut a connection, once, so the
  cut is the stream's state, whichever connection is sending then.
  A synthetic stream without ``events`` loops over a pool of ``pool_events`` pre-generated
  trades.

It does no networking and keeps no connection's state; the recording format and the generator
belong to ``synth.py``.
"""

from __future__ import annotations

import logging
import time

import orjson

from ..errors import ConfigError, ExitCode
from . import synth
from .options import ReplayOptions

logger = logging.getLogger(__name__)

CONNECTED = b'[{"ev":"status","status":"connected","message":"Connected Successfully"}]'
AUTH_SUCCESS = b'[{"ev":"status","status":"auth_success","message":"authenticated"}]'
AUTH_FAILED = b'[{"ev":"status","status":"auth_failed","message":"authentication failed"}]'


def frame_header(length: int, opcode: int = 0x1, fin: bool = True) -> bytes:
    """Return the header of an unmasked websocket frame (RFC 6455 5.2) of ``length`` bytes."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def restamp(frame: bytes, seconds: float) -> bytes:
    """``frame`` with its last event's ``"t"`` set to ``seconds`` since the epoch, in ms."""
    at = frame.rfind(b'"t":')
    if at < 0:
        return frame
    start = end = at + 4
    while end < len(frame) and frame[end] in _DIGITS:
        end += 1
    return b"%s%d%s" % (frame[:start], int(seconds * 1000), frame[end:])


_DIGITS = frozenset(b"0123456789")


def status(kind: str, message: str) -> bytes:
    """Return one status message, e.g. ``[{"ev":"status","status":"success",...}]``."""
    return orjson.dumps([{"ev": "status", "status": kind, "message": message}])


class Stream:
    """The frames every connection takes from, in order: a cursor over a list, maybe looped."""

    def __init__(
        self,
        frames: list[bytes],
        counts: list[int],
        *,
        loop: bool,
        limit: int | None,
        cut_after: int | None = None,
    ) -> None:
        self.frames = frames
        self.counts = counts
        self.loop = loop and bool(frames)
        self.limit = limit
        self.position = 0
        self.sent = 0
        self._cut_after = cut_after  # cut one connection once past this many events sent

    def take_cut(self, count: int) -> bool:
        """True, once, when sending the next frame (``count`` events) would pass the cut."""
        if self._cut_after is None or self.sent + count <= self._cut_after:
            return False
        self._cut_after = None
        return True

    @property
    def exhausted(self) -> bool:
        """True once no frame is left to send."""
        if self.limit is not None and self.sent >= self.limit:
            return True
        return not self.loop and self.position >= len(self.frames)

    def peek(self) -> tuple[bytes, int]:
        """Return the next frame and its event count, shortened to the limit if need be."""
        frame, count = self.frames[self.position], self.counts[self.position]
        if self.limit is not None and self.sent + count > self.limit:
            count = self.limit - self.sent
            frame = b"[" + b",".join(synth.split_events(frame)[:count]) + b"]"
        return frame, count

    def advance(self, count: int) -> None:
        """Mark the frame returned by ``peek`` as sent."""
        self.sent += count
        self.position += 1
        if self.loop and self.position >= len(self.frames):
            self.position = 0


def load_stream(options: ReplayOptions) -> Stream:
    """Read the recording, or generate the synthetic trades, into memory."""
    started = time.monotonic()
    frames: list[bytes] = []
    counts: list[int] = []
    if options.source is not None:
        for frame, count in synth.read_recording_events(options.source):
            frames.append(frame)
            counts.append(count)
        loop = options.loop
        what = options.source
    else:
        total = options.events if options.events is not None else options.pool_events
        for frame in synth.generate_frames(
            options.seed, options.symbols, total, options.min_batch, options.max_batch
        ):
            frames.append(frame)
            counts.append(frame.count(b'{"ev":'))
        loop = options.loop or options.events is None  # an endless stream loops over its pool
        what = f"synthetic trades (seed {options.seed}, {options.symbols} symbols)"
    logger.info(
        "replay source: %d events in %d frames from %s, loaded in %.1f s",
        sum(counts),
        len(frames),
        what,
        time.monotonic() - started,
    )
    return Stream(
        frames, counts, loop=loop, limit=options.events, cut_after=options.disconnect_after
    )


def record(options: ReplayOptions, path: str) -> int:
    """Write the source the options name (synthetic by default) to a recording file."""
    if options.source is not None:
        frames = synth.read_recording(options.source)
        what = f"the frames of {options.source}"
    else:
        events = options.events if options.events is not None else 100_000
        frames = synth.generate_frames(
            options.seed, options.symbols, events, options.min_batch, options.max_batch
        )
        what = f"{events} synthetic trades, seed {options.seed}, {options.symbols} symbols"
    try:
        written = synth.write_recording(path, frames, comment=f"tradebalancer replay: {what}")
    except OSError as exc:
        raise ConfigError(
            "--record-to",
            f"cannot write {path} ({exc.strerror or exc}); give a file in a writable directory",
        ) from exc
    logger.info("wrote %d frames (%s) to %s", written, what, path)
    return int(ExitCode.OK)
