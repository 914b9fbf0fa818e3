"""The pipe format, the one contract between the balancer and its workers: both sides import it.

Each pipe carries messages, one per event, back to back::

    [u32 little-endian length L][L bytes: the event's JSON object, exactly as the feed sent it]

and a worker finds its pipes' read ends at descriptors ``FIRST_FD``, ``FIRST_FD + 1``, ... in
pipe order (the C original's contract), their numbers also listed in the environment variable
``FDS_VARIABLE`` (and, with ``pass_fds = "append"``, after its arguments).

``LIMIT`` bounds L: the balancer never writes an event of ``LIMIT`` bytes or more (it counts
and logs it as refused instead), so a header's byte 3 is always 0 and its byte 2 below ``{``.
The reader's resynchronisation (framing.py) rests on exactly that, so the writer
(split.py, _fastsplit.c) and the reader (framing.py, _fastread.c) take it from here.

A remote partition (reader/jetstream.py) travels through NATS JetStream as messages of such
framed events, a batch each, on subject ``PREFIX.PARTITION``; the header ``EVENT_HEADER`` of a
message gives the number of its last event in its partition. Numbers run on from batch to batch
and from one balancer run to the next; a jump is events lost before they were stored (a bridge
killed with SIGKILL), which the balancer counts as not delivered (ledger.py).

Nothing here does I/O; nothing here imports anything outside the standard library.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = [
    "EVENT_HEADER",
    "FDS_VARIABLE",
    "FIRST_FD",
    "HEADER",
    "HEADER_SIZE",
    "LIMIT",
    "fits",
    "header",
]

FIRST_FD: Final = 3  # pipes start right after stdin, stdout and stderr
FDS_VARIABLE: Final = "TRADEBALANCER_FDS"  # "3,4,5": the worker's pipe fds, in pipe order
HEADER: Final = struct.Struct("<I")  # the length, little-endian
HEADER_SIZE: Final = HEADER.size
EVENT_HEADER: Final = "Tradebalancer-Last-Event"  # a JetStream batch's last event's number
LIMIT: Final = 0x7B0000  # events are shorter: header byte 3 is 0 and byte 2 is below "{" (0x7B)

# Prebuilt headers for the common sizes: a list index costs 18 ns, struct.pack 35 ns
# (measured on CPython 3.11). Feed events are a few hundred bytes.
_HEADERS: Final = [n.to_bytes(HEADER_SIZE, "little") for n in range(1 << 14)]
_pack = HEADER.pack


def fits(length: int) -> bool:
    """Whether an event of ``length`` bytes may be written to a pipe."""
    return length < LIMIT


def header(length: int) -> bytes:
    """The 4-byte header of an event of ``length`` bytes (the caller checked ``fits``)."""
    return _HEADERS[length] if length < len(_HEADERS) else _pack(length)


def headers() -> list[bytes]:
    """The prebuilt headers by length, for a hot loop that indexes the list itself."""
    return _HEADERS
