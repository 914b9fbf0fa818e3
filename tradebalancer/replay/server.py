"""The replay feed: a local stand-in for the Massive websocket feed (demos, tests, benchmarks).

Owns a listening socket and the connections to it, served by one background thread running a
``selectors`` loop. It serves frames from a recording file or from the synthetic generator
(``synth.py``), taken in order from one stream (``stream.py``), to each client connection
(``connection.py``: the feed's protocol, pings, pacing, the cut). Its command line is
``cli.py``.

It never touches anything but its own sockets, and it is not part of the service.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import threading
import time
from types import TracebackType

from ..errors import ConfigError, TransportError
from .connection import Connection, Phase
from .options import ReplayOptions, ReplayStats
from .stream import load_stream

logger = logging.getLogger(__name__)


class ReplayServer:
    """The replay feed on a local port, served by a background thread; a context manager."""

    def __init__(self, options: ReplayOptions) -> None:
        self.options = options
        self.stats = ReplayStats()
        self.sent_frames: list[bytes] = []
        self.finished = threading.Event()  # set when the stream is over and its client gone
        self.error: BaseException | None = None
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
            connection = Connection(
                sock,
                peer,
                now,
                options=self.options,
                stream=self.stream,
                stats=self.stats,
                on_close=self.release,
                sent_frames=self.sent_frames if self.options.keep_sent else None,
            )
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
