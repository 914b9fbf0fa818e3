"""The pipe framing as a worker sees it: message boundaries, messages, protocol errors.

Owns cutting ``[u32 little-endian length][JSON object]`` messages (format.py) out of one pipe's
byte stream:
finding the first boundary on a pipe a dead worker left mid-message, the messages themselves,
and what makes a stream not this protocol. Sans-I/O: bytes in, messages out, no fds, no clock,
and it never raises (an error is recorded); ``reader`` does the reading and the waiting.

Starting in the middle of a message
-----------------------------------
The balancer keeps every pipe's read end open, so a worker's successor reads on from where the
dead worker stopped, and that may be inside a message. The parser therefore first looks for a
message boundary, skips the bytes before it, counts them (``skipped_bytes``) and hands them
over (``skipped_received``; the Reader's ``on_skip``); from the first boundary on, the stream is
trusted.

Why the rule is exact. A message is ``H J``: ``H`` is 4 bytes, the length ``L`` of ``J`` in
little endian, and the balancer keeps ``L < 0x7B0000``, so ``H[3] == 0`` and ``H[2] <= 0x7A``;
``J`` starts with ``{``, ends with ``}`` and never contains a 0x00 byte (JSON text cannot), and
``L >= 2``. Write ``ok(p)`` for "``d[p+3] == 0``, ``d[p+4] == '{'`` and ``d[p+2] < 0x7B``",
i.e. the 4 bytes at ``p`` read as a length below 0x7B0000 followed by ``{``.

1. At the start of the data, position 0 is a boundary iff ``ok(0)``. At a boundary ``ok`` holds
   by the facts above. Otherwise the data starts at offset ``o`` in ``H J`` with ``1 <= o <=
   L + 3``, and ``d[3]`` is the byte at offset ``o + 3``. If ``o + 3 <= L + 3`` that byte is
   inside ``J`` and non-zero. Otherwise ``o`` is one of the last three bytes of the message,
   and with ``H'`` the next header: ``o = L + 3`` puts ``d[4] = H'[3] = 0``, not ``{``;
   ``o = L + 2`` puts ``d[4] = H'[2] <= 0x7A``, not ``{``; ``o = L + 1`` may well give
   ``d[3] = H'[0] = 0`` and ``d[4] = H'[1] = '{'`` (a next length ``0x7B00 + k * 0x10000``)
   but then ``d[2]`` is the last byte of ``J``, ``}`` = 0x7D, so the length read at 0 is at
   least 0x7D0000 and ``ok(0)`` fails. (This is why the length check is part of the rule:
   ``d[3] == 0 and d[4] == '{'`` alone is fooled.)
2. Otherwise the next boundary is the first ``i >= 1`` with ``d[i-1] == '}'`` and ``ok(i)``.
   The true next boundary ``b`` (the start of the next message, ``b >= 1``) qualifies. A
   position ``i < b`` at offset ``q = o + i`` of ``H J`` does not: if ``q + 3 <= L + 3``,
   ``d[i+3]`` is a byte of ``J``, non-zero; the three last positions fail as in 1, the last of
   them (``q = L + 1``) only through the length: the candidate header straddles ``}`` and the
   next header, so its byte 2 is ``}`` and the length it gives is at least 0x7D0000.
   ``d[i-1] == '}'`` is implied, and kept as a cheap guard.

Protocol errors. After the first boundary a length of 0x7B0000 or more, or a body that does not
start with ``{``, means the pipe does not carry this protocol: the messages before it are
delivered, then ``ProtocolError`` is raised. Bytes of an unfinished message at end of file (the
balancer died mid-write) are skipped and counted like a resync.

The limit is ``format.LIMIT``; a parser may be given a smaller one (tests do, to reach it with
small data): the proof needs only ``LIMIT <= 0x7B0000``.

Speed notes, measured with ``tests/bench_reader.py`` (2-core VM, ~110-byte trades): the C loop
(``_fastread.c``) alone on in-memory data takes 53-55 M messages/s. Per message it checks the
header and makes one ``bytes`` (the only copy of a message); the Python loop, used when the
extension is not built (about 5 M messages/s), does one ``struct.unpack_from`` for the length
and the first body byte together and one slice, and checks no length: the data handed to it is
at most ``LIMIT + 3`` bytes, so a length past the limit can never complete and is checked once,
at the tail. A message cut by a read is finished on its own instead of copying the whole next
read behind it. ``receive_data`` takes a view of a buffer the caller reuses: the C loop cuts the
messages straight out of it.
"""

from __future__ import annotations

import struct

from .format import LIMIT

try:
    from ._fastread import parse as _parse_in_c
except ImportError:  # a source tree whose extension is not built: the Python loop alone
    _parse_in_c = None  # type: ignore[assignment]

OPEN_BRACE = 0x7B  # b"{"[0]
CLOSE_BRACE = 0x7D  # b"}"[0]
_HEADER_AND_FIRST = struct.Struct("<IB")  # the length and the first body byte in one call
_MARK = b"\x00{"  # header byte 3 and the body's first byte: where every message body begins


class ReaderError(Exception):
    """The root of every error the worker library raises on purpose."""


class ProtocolError(ReaderError):
    """A pipe carried bytes that are not the balancer's framing, after its first boundary."""

    def __init__(self, fd: int, offset: int, message: str) -> None:
        super().__init__(fd, offset, message)
        self.fd = fd
        self.offset = offset
        self.message = message

    def __str__(self) -> str:
        return (
            f"pipe fd {self.fd}, byte {self.offset}: {self.message}; this is not the "
            "tradebalancer framing (is the fd a tradebalancer pipe?)"
        )


class MessageParser:
    """One pipe's bytes in, its messages out: sans-I/O, no clock, and it never raises.

    ``receive_data`` returns the complete messages; bytes skipped while finding the first
    boundary (or left unfinished at end of file) are drained with ``skipped_received``; a
    protocol error is recorded in ``error`` and everything after it is ignored.
    """

    def __init__(self, fd: int = -1, *, limit: int = LIMIT) -> None:
        if not 5 <= limit <= LIMIT:
            raise ValueError(f"limit must be from 5 to {LIMIT:#x}, got {limit}")
        self.fd = fd
        self.limit = limit
        self.synchronised = False
        self.error: ProtocolError | None = None
        self.skipped_bytes = 0
        self.position = 0  # stream offset of the first pending byte
        self._at_start = True
        self._pending: list[bytes] = []  # bytes received and not parsed yet, in order
        self._pending_size = 0
        self._needed = 0  # parse again once this many bytes are pending
        self._skipped: list[bytes] = []

    def receive_data(self, data: bytes | memoryview) -> list[bytes]:
        """Take the next bytes of the pipe; return the messages they complete.

        ``data`` may be a view of a buffer the caller reuses: nothing of it is kept past the
        call (what it leaves unfinished is copied), and the messages are ``bytes`` of their own.
        """
        if self.error is not None or not data:
            return []
        if _parse_in_c is None and not isinstance(data, bytes):
            data = bytes(data)  # the Python loop slices its messages out of ``data``
        messages: list[bytes] = []
        begin = 0
        if self._pending:
            pending_size = self._pending_size + len(data)
            if pending_size < self._needed:
                self._pending.append(bytes(data))
                self._pending_size = pending_size
                return messages
            if self.synchronised and self._pending_size >= 5:
                # Finish the pending message on its own rather than copy all of ``data`` behind
                # it: its header was checked when it was kept.
                begin = self._needed - self._pending_size
                messages.append(b"".join([*self._pending, data[:begin]])[4:])
                self.position += self._needed
            else:
                data = b"".join([*self._pending, data])
            self._pending.clear()
            self._pending_size = 0
        if not self.synchronised:
            boundary = self._synchronise(bytes(data))
            if boundary is None:
                return messages
            begin = boundary
        end = self._parse(data, begin, messages)
        if self.error is None and end < len(data):
            self._keep(data[end:] if end else data)
        return messages

    def receive_eof(self) -> None:
        """The pipe reached end of file: an unfinished message left is skipped and counted."""
        if self._pending and self.error is None:
            self._skip(b"".join(self._pending))
        self._pending.clear()
        self._pending_size = 0

    def skipped_received(self) -> list[bytes]:
        """Return (and forget) the byte runs skipped since the last call, in stream order."""
        skipped, self._skipped = self._skipped, []
        return skipped

    def _keep(self, rest: bytes | memoryview) -> None:
        """Hold ``rest`` (it starts the next message, or is still being searched) for later."""
        if not self.synchronised:
            needed = len(rest) + 1
        elif len(rest) < 5:
            needed = 5
        else:
            length, first = _HEADER_AND_FIRST.unpack_from(rest)
            if not self._check(length, first, self.position):
                return
            needed = 4 + length
        self._pending.append(bytes(rest))  # no copy of a bytes object; a view is copied
        self._pending_size = len(rest)
        self._needed = needed

    def _skip(self, data: bytes) -> None:
        self.skipped_bytes += len(data)
        self.position += len(data)
        self._skipped.append(data)

    def _check(self, length: int, first: int, offset: int) -> bool:
        """Return whether a header is sound; if not, record the error at stream ``offset``."""
        if length >= self.limit:
            message = f"length {length:#x} is not below the limit {self.limit:#x}"
        elif first != OPEN_BRACE:
            message = f"the body starts with {first:#04x}, not '{{'"
        else:
            return True
        self.error = ProtocolError(self.fd, offset, message)
        self._pending.clear()
        self._pending_size = 0
        return False

    def _synchronise(self, data: bytes) -> int | None:
        """Return where the first boundary in ``data`` is, skipping what precedes it."""
        if self._at_start:
            if len(data) < 5:
                self._keep(data)
                return None
            self._at_start = False
            if data[3] == 0 and data[4] == OPEN_BRACE and data[2] < OPEN_BRACE:
                self.synchronised = True
                return 0
        # i is a boundary iff d[i-1] == '}' and ok(i); see the module docstring for the proof.
        mark = data.find(_MARK, 4)
        while mark != -1:
            i = mark - 3
            if data[i - 1] == CLOSE_BRACE and data[i + 2] < OPEN_BRACE:
                self.synchronised = True
                self._skip(data[:i])
                return i
            mark = data.find(_MARK, mark + 1)
        # Candidates i >= len - 4 are still unchecked and need d[i-1]: keep the last 5 bytes.
        if len(data) > 5:
            self._skip(data[:-5])
            data = data[-5:]
        self._keep(data)
        return None

    def _parse(self, data: bytes | memoryview, begin: int, messages: list[bytes]) -> int:
        """Append the messages of ``data[begin:]`` (begin is a boundary); return where they end.

        The hot loop: one unpack for the length and the first body byte together, one slice.
        """
        size = len(data)
        base = self.position - begin  # the stream offset of data[0]
        if _parse_in_c is not None:  # the same loop in C, with every header checked
            position, bad = _parse_in_c(data, begin, messages, self.limit)
            if bad:
                length, first = _HEADER_AND_FIRST.unpack_from(data, position)
                self._check(length, first, base + position)
                return position
            self.position = base + position
            return position
        assert isinstance(data, bytes)  # receive_data copies a view when there is no C loop
        if size - begin > self.limit + 3:  # a length past the limit could complete: check each
            return self._parse_checked(data, begin, messages)
        unpack = _HEADER_AND_FIRST.unpack_from
        position = start = begin
        last = size - 5  # a header and a first body byte must be there to look at
        while position <= last:
            length, first = unpack(data, position)
            if first != OPEN_BRACE:
                self._check(length, first, base + position)
                return position
            start = position + 4
            position = start + length
            messages.append(data[start:position])
        if position > size:  # the last message is not complete yet
            messages.pop()
            position = start - 4
        self.position = base + position
        return position

    def _parse_checked(self, data: bytes, begin: int, messages: list[bytes]) -> int:
        """``_parse`` for data longer than the limit: every header's length is checked too."""
        base = self.position - begin
        unpack = _HEADER_AND_FIRST.unpack_from
        position = begin
        size = len(data)
        while position <= size - 5:
            length, first = unpack(data, position)
            if not self._check(length, first, base + position):
                return position
            if position + 4 + length > size:
                break
            messages.append(data[position + 4 : position + 4 + length])
            position += 4 + length
        self.position = base + position
        return position
