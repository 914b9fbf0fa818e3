"""What the replay feed serves and how (ReplayOptions), and what it counts (ReplayStats).

Plain data: every option has a usable default; ``cli.py`` fills them from the command line
and checks them, ``server.py`` and the parts it builds read them.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from . import synth


@dataclass(frozen=True)
class ReplayOptions:
    """What the replay feed serves and how; every field has a usable default."""

    host: str = "127.0.0.1"
    port: int = 0
    certfile: str | None = None  # with keyfile: serve wss:// (TLS 1.2 and 1.3)
    keyfile: str | None = None
    tls_max_version: ssl.TLSVersion | None = None  # e.g. TLSv1_2 to test a TLS 1.2 client
    accept_keys: frozenset[str] = frozenset()  # empty: accept any non-empty key
    source: str | None = None  # a recording file; None: synthetic trades
    rate: float | None = None  # events per second per connection; None: as fast as possible
    events: int | None = None  # end the stream after this many events
    loop: bool = False  # start a recording again at its end
    ping_interval: float | None = 20.0  # None or 0: no pings
    ping_timeout: float | None = None  # None: the ping interval
    seed: int = synth.DEFAULT_SEED
    symbols: int = synth.DEFAULT_SYMBOLS
    min_batch: int = 50
    max_batch: int = 500
    pool_events: int = 200_000  # synthetic trades generated when ``events`` is None
    disconnect_after: int | None = None  # cut one connection mid-frame after about N events
    timestamps: bool = False  # add "lt" to the last event of each frame
    delay: float | None = None  # stamp the last event's "t" with the wall clock minus this
    fragment: bool = False  # send each data message as three frames (RFC 6455 5.4)
    binary: bool = False  # send data messages as binary instead of text
    keep_sent: bool = False  # keep every frame sent in ReplayServer.sent_frames (tests)


@dataclass
class ReplayStats:
    """Counters of the replay feed since it started; written by its thread only."""

    connections: int = 0
    auth_failures: int = 0
    events_sent: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    pings_sent: int = 0
    pongs_received: int = 0
    forced_disconnects: int = 0
    clean_closes: int = 0
    # every subscribe and unsubscribe message, in order: (connection number, action, params)
    subscription_actions: list[tuple[int, str, str]] = field(default_factory=list)
