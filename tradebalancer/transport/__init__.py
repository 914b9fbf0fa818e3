"""The transport: the one owner of the feed's socket, from the connect to the close.

    connector.py   opening a connection without blocking: lookup, TCP, TLS, kernel hand-off
    stream.py      the connected stream: receive straight into a buffer, send, close
    session.py     the TLS client session over memory BIOs, its key log and record counts
    keys.py        TLS secrets -> the kernel's crypto_info (pure computation)
    kernel.py      the kernel's TLS socket interface: the hand-off, control records

Knows nothing of websockets, events or what a trade is; the service drives it from its loop.
"""

from .connector import TLS_MODES, Connector, open_transport
from .stream import Transport

__all__ = ["TLS_MODES", "Connector", "Transport", "open_transport"]
