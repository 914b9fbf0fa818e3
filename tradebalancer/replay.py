"""The replay feed: a local stand-in for the Massive websocket feed (demos, tests, benchmarks).

Owns a listening socket and the connections to it, served by one background thread running a
``selectors`` loop, and the ``tradebalancer replay`` command line. It serves frames from a
recording file or from the synthetic generator (``synth.py``), taken in order from one stream
(``replay_frames.py``), to each client connection (``replay_connection.py``: the feed's
protocol, pings, pacing, the cut).

It never touches anything but its own sockets, and it is not part of the service.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from . import synth
from .errors import ConfigError, ExitCode, TradeBalancerError, TransportError
from .replay_connection import Connection, Phase
from .replay_frames import load_stream, record

logger = logging.getLogger(__name__)


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


class ReplayServer:
    """The replay feed on a local port, served by a background thread; a context manager."""

    def __init__(self, options: ReplayOptions) -> None:
        self.options = options
        self.stats = ReplayStats()
        self.sent_frames: list[bytes] = []
        self.finished = threading.Event()  # set when the stream is over and its client gone
        self.error: BaseException | None = None
        self.cut_pending = options.disconnect_after is not None
        self.tls_context = _tls_context(options) if options.certfile else None
        self.stream = load_stream(options)
        self.port = options.port
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._connections: dict[int, Connection] = {}
        self._thread: threading.Thread | None = None
        self._running = False
        self._stopped = False
        self._wake_r, self._wake_w = socket.socketpair()

    @property
    def url(self) -> str:
        """The URL clients connect to, e.g. ``ws://127.0.0.1:PORT/stocks``."""
        scheme = "wss" if self.tls_context else "ws"
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return f"{scheme}://{host}:{self.port}/stocks"

    def start(self) -> None:
        """Bind, listen and start serving in a background thread."""
        address = f"{self.options.host}:{self.options.port}"
        try:
            info = socket.getaddrinfo(self.options.host, self.options.port, type=socket.SOCK_STREAM)
            listener = socket.socket(info[0][0], socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(info[0][4])
            listener.listen(64)
        except OSError as exc:
            self.stop()
            raise TransportError(address, f"cannot listen: {exc.strerror or exc}") from exc
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="replay", daemon=True)
        self._thread.start()
        logger.info("replay feed listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving, close every connection and the listener; wait for the thread."""
        if self._stopped:
            return
        self._stopped = True
        self._running = False
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()

    def __enter__(self) -> ReplayServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def release(self, connection: Connection) -> None:
        """Forget a connection and close its socket (called by the connection itself)."""
        if self._connections.pop(connection.sock.fileno(), None) is not None:
            self._selector.unregister(connection.sock)
        connection.sock.close()
        if self.stream.exhausted and not self._connections:
            self.finished.set()

    def _serve(self) -> None:
        try:
            while self._running:
                now = time.monotonic()
                timeout = min((c.next_deadline() for c in self._connections.values()), default=1)
                for key, mask in self._selector.select(max(0.0, min(timeout - now, 1.0))):
                    now = time.monotonic()
                    if key.fileobj is self._listener:
                        self._accept(now)
                    elif key.fileobj is self._wake_r:
                        self._wake_r.recv(64)
                    else:
                        connection = self._connections.get(key.fd)
                        if connection is not None and mask & selectors.EVENT_READ:
                            connection.on_readable(now)
                now = time.monotonic()
                for connection in list(self._connections.values()):
                    connection.tick(now)
                    if connection.phase is not Phase.CLOSED:
                        events = selectors.EVENT_READ
                        if connection.wants_write():
                            events |= selectors.EVENT_WRITE
                        self._selector.modify(connection.sock, events)
        except Exception as exc:
            logger.exception("replay feed failed")
            self.error = exc
        finally:
            for connection in list(self._connections.values()):
                connection.close()
            if self._listener is not None:
                self._listener.close()
            self.finished.set()

    def _accept(self, now: float) -> None:
        assert self._listener is not None
        for _ in range(16):
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_context is not None:
                sock = self.tls_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            peer = f"{address[0]}:{address[1]}"
            self.stats.connections += 1
            logger.info("%s: connected", peer)
            connection = Connection(self, sock, peer, now)
            self._connections[sock.fileno()] = connection
            self._selector.register(sock, selectors.EVENT_READ)
            if connection.tls:
                connection.on_readable(now)  # nothing to read yet: starts the handshake


def _tls_context(options: ReplayOptions) -> ssl.SSLContext:
    """A server context with the certificate chain: TLS 1.2 and 1.3 (or up to the maximum)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.tls_max_version is not None:
        context.maximum_version = options.tls_max_version
    try:
        context.load_cert_chain(options.certfile or "", options.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "replay.certfile",
            f"cannot load the certificate {options.certfile} and key {options.keyfile}: {exc}",
        ) from exc
    return context


# -- command line ----------------------------------------------------------------------------


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the replay feed's options to ``parser`` (``tradebalancer replay``) and return it."""
    d = ReplayOptions()
    add = parser.add_argument
    add("--host", default=d.host, help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=9943, help="port, 0 for any free one (default: %(default)s)")
    add("--certfile", metavar="PEM", help="certificate chain: serve wss:// (TLS 1.2 and 1.3)")
    add("--keyfile", metavar="PEM", help="its private key (default: in the certificate file)")
    add("--accept-key", action="append", default=[], metavar="KEY", help=_ACCEPT_KEY_HELP)
    add("--source", metavar="FILE", help="a recording to serve (default: synthetic trades)")
    add("--rate", type=float, metavar="N", help="events per second (default: as fast as read)")
    add("--events", type=int, metavar="N", help="end the stream after N events (default: never)")
    add("--loop", action="store_true", help="start the recording again at its end")
    add("--ping-interval", type=float, default=d.ping_interval, metavar="S", help=_PING_HELP)
    add("--seed", type=int, default=d.seed, metavar="N", help="synthetic: the random seed")
    add("--symbols", type=int, default=d.symbols, metavar="N", help="synthetic: symbol count")
    add(
        "--min-batch",
        type=int,
        default=d.min_batch,
        metavar="N",
        help="synthetic: fewest events a frame",
    )
    add(
        "--max-batch",
        type=int,
        default=d.max_batch,
        metavar="N",
        help="synthetic: most events a frame",
    )
    add("--disconnect-after", type=int, metavar="N", help=_DISCONNECT_HELP)
    add("--timestamps", action="store_true", help=_TIMESTAMPS_HELP)
    add("--fragment", action="store_true", help="send each message as three frames")
    add("--binary", action="store_true", help="send data messages as binary frames")
    add("--record-to", metavar="FILE", help=_RECORD_HELP)
    return parser


_ACCEPT_KEY_HELP = "an API key to accept; repeatable (default: any non-empty key)"
_PING_HELP = "seconds between websocket pings, 0 for none (default: %(default)s)"
_DISCONNECT_HELP = "cut the first connection mid-frame after about N events (reconnect tests)"
_TIMESTAMPS_HELP = 'end each frame\'s last event with "lt": CLOCK_MONOTONIC ns (use with --rate)'
_RECORD_HELP = (
    "write the source (default: 100,000 synthetic trades) to a recording and exit; "
    "gzip if FILE ends in .gz"
)


def options_from(args: argparse.Namespace) -> ReplayOptions:
    """Return the ReplayOptions the parsed command line asks for."""
    for name in ("rate", "events", "disconnect_after"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}", f"must be positive, got {value}")
    return ReplayOptions(
        host=args.host,
        port=args.port,
        certfile=args.certfile,
        keyfile=args.keyfile,
        accept_keys=frozenset(args.accept_key),
        source=args.source,
        rate=args.rate,
        events=args.events,
        loop=args.loop,
        ping_interval=args.ping_interval or None,
        seed=args.seed,
        symbols=args.symbols,
        min_batch=args.min_batch,
        max_batch=args.max_batch,
        disconnect_after=args.disconnect_after,
        timestamps=args.timestamps,
        fragment=args.fragment,
        binary=args.binary,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, or until the stream is over; or write a recording."""
    options = options_from(args)
    if args.record_to:
        return record(options, args.record_to)
    server = ReplayServer(options)
    server.start()
    # The URL on stdout, alone on its line, for scripts that asked for port 0.
    sys.stdout.write(server.url + "\n")
    sys.stdout.flush()
    stopping = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set()) if in_main else None
    try:
        while not stopping.is_set() and not server.finished.is_set():
            stopping.wait(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    logger.info(
        "replay feed stopped: %d connections, %d events in %d frames",
        server.stats.connections,
        server.stats.events_sent,
        server.stats.frames_sent,
    )
    return int(ExitCode.FAILURE if server.error else ExitCode.OK)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tradebalancer.replay``: the same as ``tradebalancer replay``."""
    summary = (__doc__ or "").split("\n\n")[0]
    parser = build_parser(argparse.ArgumentParser(prog="tradebalancer replay", description=summary))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return run(args)
    except TradeBalancerError as exc:
        sys.stderr.write(f"tradebalancer replay: {exc}\n")
        return int(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
