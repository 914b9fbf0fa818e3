"""A chaos-soak worker: it reads its pipe one message at a time and records each at once.

Run as a tradebalancer worker with one pipe (TRADEBALANCER_FDS) and one argument, the file to
append to: "#start" when it starts, then one line per event, the event's bytes as received.
Reading no more than the message at hand and appending it before the next read means that a
worker killed at any moment loses at most the one message it held, which is what
tests/chaos.py allows for each death.

A predecessor may have died inside a message: until the first boundary, bytes are read one at
a time into the reader's own parser, which skips the rest of that message and stops exactly at
the end of the first whole one. It exits at end of file.
"""

from __future__ import annotations

import os
import struct
import sys

from tradebalancer.reader import MessageParser, fds_from_environment


def read_exactly(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``, or None at end of file."""
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def main() -> None:
    (fd,) = fds_from_environment()
    record = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(record, b"#start\n")  # where a predecessor's life ended
    parser = MessageParser()
    first: list[bytes] = []
    while not first:
        byte = os.read(fd, 1)
        if not byte:
            return
        first = parser.receive_data(byte)
    os.write(record, first[0] + b"\n")
    while True:
        header = read_exactly(fd, 4)
        if header is None:
            return
        body = read_exactly(fd, struct.unpack("<I", header)[0])
        if body is None:
            return
        os.write(record, body + b"\n")


if __name__ == "__main__":
    main()
