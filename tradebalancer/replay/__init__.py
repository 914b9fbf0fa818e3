"""The replay feed: a local stand-in for the Massive feed, for demos, tests and benchmarks.

    options.py     what it serves and how (ReplayOptions), what it counts (ReplayStats)
    server.py      the listening socket and its connections, in a thread of their own
    connection.py  one client: the feed's protocol, pings, pacing, the cut
    stream.py      what it sends: the status messages, frame headers, the stream of frames
    synth.py       synthetic trades and the recording file format
    cli.py         ``tradebalancer replay`` and ``python -m tradebalancer.replay``

Not part of the service: it imports nothing of it but the error tree.
"""

from .options import ReplayOptions, ReplayStats
from .server import ReplayServer

__all__ = ["ReplayOptions", "ReplayServer", "ReplayStats"]
