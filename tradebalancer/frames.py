"""Websocket frames from the server, read in place: the receive buffer -> runs of data frames.

Owns where each frame of the stream after the HTTP upgrade begins and ends, and which frames
the balancer routes straight from the receive buffer. A *plain* frame is a whole data frame
as the feed sends its messages: FIN set, RSV bits clear, opcode text or binary, not masked (a
server never masks, RFC 6455 section 5.1), a payload of at most ``max_size`` bytes, and not a
status message (``STATUS`` in its first ``STATUS_WINDOW`` bytes). A run of consecutive plain
frames is handed on as one view of the buffer (``Run``), to be routed in one
pass (split.py, ``Splitter.route_frames``) without a copy of its payloads. Every other frame
goes to websockets' ``ClientProtocol`` whole, or in pieces that end exactly where it ends:
control frames, fragments, a masked or oversized frame, reserved bits. It answers pings, closes,
reassembles or fails the connection as it would without this module, because it sees every
byte of every frame that is not plain, and is never handed part of a frame it did not start.
Must not touch: the socket, the feed's statuses, the routing.

Why: websockets' parser copies each payload about three times and builds a Frame per frame,
about 50 ns a trade of the balancer's 150-250 (``make bench``'s stages), and the run's payloads
are then routed together, one chunk per pipe for the whole read rather than one per frame.

The end of a read usually cuts a frame. Its first part, the *tail*, is kept by the caller at
the front of the receive buffer (``keep``) and the next read lands behind it, so the frame is
read whole in place; a tail longer than ``keep_limit`` (a frame near the receive buffer's size)
goes to websockets instead, in pieces, with what it is still owed counted here. A caller that
does not use ``keep`` (a test handing bytes) gets the tail prepended, copied.

``plain_frames`` has a C twin (``_fastsplit.plain_frames``, the header read in ``_wsframe.h``);
tests compare them on generated streams.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

try:
    from ._fastsplit import plain_frames as _plain_frames_c
except ImportError:  # a source tree whose extension is not built
    _plain_frames_c = None  # type: ignore[assignment]

__all__ = ["Deframer", "Run", "frame_bounds", "messages", "payloads", "plain_frames"]

_PLAIN_HEADS: Final = (0x81, 0x82)  # FIN, no RSV bits, text or binary
# A status message names "status" in its first bytes, in whatever layout: such a frame goes to
# websockets and on to feed.py, which reads the statuses (a data frame with a status event
# further in is routed, and the splitter hands that event back).
STATUS: Final = b'"status"'
STATUS_WINDOW: Final = 64
_HUGE: Final = 1 << 62  # a length past any max_size: websockets refuses it from the header

Buffer = bytes | bytearray | memoryview


class Run:
    """Consecutive whole plain data frames, in the receive buffer: valid until the next read."""

    __slots__ = ("view",)

    def __init__(self, view: memoryview) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)


def frame_bounds(data: Buffer, start: int, max_size: int) -> tuple[bool, int, int] | None:
    """Read the frame header at ``data[start]``: (plain, payload start, end), or None if the
    header is not all there. The end may lie past ``len(data)``: the frame is not whole."""
    size = len(data)
    if size - start < 2:
        return None
    head, second = data[start], data[start + 1]
    length, at = second & 0x7F, start + 2
    if length == 126:
        if size - at < 2:
            return None
        length, at = int.from_bytes(data[at : at + 2], "big"), at + 2
    elif length == 127:
        if size - at < 8:
            return None
        length, at = min(int.from_bytes(data[at : at + 8], "big"), _HUGE), at + 8
    masked = bool(second & 0x80)
    if masked:
        at += 4
    plain = head in _PLAIN_HEADS and not masked and length <= max_size
    return plain, at, at + length


def plain_frames(data: Buffer, start: int, max_size: int) -> int:
    """Where the run of whole plain frames, none a status message, that starts at ``start``
    ends (``start`` if there is none)."""
    if _plain_frames_c is not None:
        return _plain_frames_c(data, start, max_size)
    return _plain_frames(data, start, max_size)


def _plain_frames(data: Buffer, start: int, max_size: int) -> int:
    at = start
    while (bounds := frame_bounds(data, at, max_size)) is not None:
        plain, payload, end = bounds
        if not plain or end > len(data):
            break
        if STATUS in bytes(data[payload : min(payload + STATUS_WINDOW, end)]):
            break
        at = end
    return at


def payloads(data: Buffer) -> Iterator[memoryview]:
    """The payloads of a run of whole plain frames (``data`` is exactly such a run)."""
    view, at = memoryview(data), 0
    while at < len(view):
        bounds = frame_bounds(view, at, _HUGE)
        assert bounds is not None and bounds[2] <= len(view), "not a run of whole frames"
        _plain, payload, at = bounds
        yield view[payload:at]


def messages(received: list[bytes | Run]) -> list[bytes]:
    """Each message's bytes, the runs' payloads copied out: for tests and tools, not the
    hot path."""
    out: list[bytes] = []
    for item in received:
        if isinstance(item, Run):
            out.extend(bytes(payload) for payload in payloads(item.view))
        else:
            out.append(item)
    return out


class Deframer:
    """The stream after the upgrade -> (Run | bytes for websockets) pieces, in stream order."""

    def __init__(self, max_size: int, keep_limit: int) -> None:
        self.max_size = max_size
        self.keep_limit = keep_limit
        self._tail: memoryview | None = None  # a frame's first part, from the last read
        self._kept = 0  # bytes of it the caller moved to the front of its buffer (keep)
        self._owed = 0  # bytes of the frame under way that belong to websockets

    @property
    def buffered(self) -> int:
        """Bytes of a frame begun and not finished: kept here or by the caller."""
        return len(self._tail) if self._tail is not None else self._kept

    def keep(self, buffer: memoryview) -> int:
        """Move the tail to the front of ``buffer`` for the next read to go behind it; return
        the bytes there, the same again until ``split`` takes them (a read that found
        nothing)."""
        if self._tail is not None:
            self._kept = len(self._tail)
            buffer[: self._kept] = self._tail  # memmove: the tail may overlap the front
            self._tail = None
        return self._kept

    def split(self, data: Buffer) -> list[Run | memoryview]:
        """Cut ``data`` (what follows the last call's) into pieces: runs of plain frames, and
        views for websockets, in order. The pieces are valid until the caller's next read."""
        view = memoryview(data)
        if self._tail is not None:  # the caller did not keep it: join, by copy
            view = memoryview(bytes(self._tail) + bytes(view))
            self._tail = None
        self._kept = 0  # data starts with them
        pieces: list[Run | memoryview] = []
        at, size = 0, len(view)
        if self._owed:
            at = min(self._owed, size)
            self._owed -= at
            pieces.append(view[:at])
        while at < size:
            end = plain_frames(view, at, self.max_size)
            if end > at:
                pieces.append(Run(view[at:end]))
                at = end
                continue
            bounds = frame_bounds(view, at, self.max_size)
            if bounds is None or (bounds[0] and size < bounds[2] <= at + self.keep_limit):
                self._tail = view[at:]  # a header, or a plain frame, cut by the read: kept
                break
            # A status message, not plain, or too long to keep: websockets gets it, now and as
            # it comes.
            end = bounds[2]
            pieces.append(view[at : min(end, size)])
            self._owed = max(end - size, 0)
            at = min(end, size)
        return pieces
