"""The replay feed: a local stand-in for the Massive websocket feed (demos, tests, benchmarks).

Owns a listening socket and the connections to it, served by one background thread running a
``selectors`` loop. It serves frames from a recording file or from the synthetic generator
(``synth.py``), taken in order from one stream (``stream.py``), to each client connection
(``connection.py``: the feed's protocol, pings, pacing, the cut). Its command line is
``cli.py``.

Design notes:

* The loop sleeps in ``select`` until a socket is ready or the earliest connection timer is
  due (``Connection.next_deadline``, an absolute ``time.monotonic()``), and at most
  ``IDLE_WAIT`` seconds: an idle feed wakes about once a second. A new client wakes it through
  the listener and ``stop`` through a socket pair, so neither waits for the timeout.
* Options it cannot use (a certificate that does not load, an address it cannot listen on)
  raise ``ConfigError`` whose key path is the ``ReplayOptions`` field at fault, so the command
  line can name its option.

It never touches anything but its own sockets, and it is not part of the service.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
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

IDLE_WAIT = 1.0  # seconds: the longest the loop sleeps when no timer is due


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
        try:
            listener = _listen(self.options.host, self.options.port)
        except (ConfigError, TransportError):
            self.stop()
            raise
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
                # Deadlines are absolute, on the monotonic clock; select takes a wait relative
                # to now. Without a connection there is no deadline (infinity), not one at 1 s
                # of the clock: that instant is long past, so the wait was 0 and an idle feed
                # spun at 30,000 passes a second.
                deadline = min(
                    (c.next_deadline() for c in self._connections.values()), default=math.inf
                )
                for key, mask in self._selector.select(max(0.0, min(deadline - now, IDLE_WAIT))):
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


_ANY_ADDRESS = "give an address of this machine, such as 127.0.0.1, ::1 or 0.0.0.0 (all)"
_OTHER_PORT = "choose another port, or 0 for any free one"


def _listen(host: str, port: int) -> socket.socket:
    """Return a socket listening on ``host``:``port``; ConfigError names the option at fault."""
    # getaddrinfo takes the port as a string, and the C library keeps its low 16 bits: 99999
    # would listen on 34463.
    if not 0 <= port <= 65535:
        raise ConfigError("port", f"must be an integer from 0 to 65535, got {port}; {_OTHER_PORT}")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(
            "host", f"cannot resolve {host!r} ({exc.strerror}); {_ANY_ADDRESS}"
        ) from exc
    family, _, _, _, sockaddr = info[0]
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportError(address, f"cannot listen: {exc.strerror or exc}") from exc
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(sockaddr)
        listener.listen(64)
    except OSError as exc:
        listener.close()
        raise _listen_error(host, port, address, exc) from exc
    return listener


def _listen_error(host: str, port: int, address: str, exc: OSError) -> Exception:
    """The error to raise when ``bind`` or ``listen`` failed: the option at fault if known."""
    if exc.errno == errno.EADDRINUSE:
        return ConfigError("port", f"{address} is already in use; {_OTHER_PORT}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError("host", f"{host} is not an address of this machine; {_ANY_ADDRESS}")
    if exc.errno == errno.EACCES:
        return ConfigError(
            "port",
            f"no permission to listen on port {port} (below 1024 needs the "
            "CAP_NET_BIND_SERVICE capability); choose one from 1024 up, or 0 for any free one",
        )
    return TransportError(address, f"cannot listen: {exc.strerror or exc}")


def _tls_context(options: ReplayOptions) -> ssl.SSLContext:
    """A server context with the certificate chain: TLS 1.2 and 1.3 (or up to the maximum)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if options.tls_max_version is not None:
        context.maximum_version = options.tls_max_version
    try:
        context.load_cert_chain(options.certfile or "", options.keyfile)
    except (OSError, ssl.SSLError) as exc:
        key = f"the key {options.keyfile}" if options.keyfile else "its key (in the same file)"
        raise ConfigError(
            "certfile",
            f"cannot load the certificate {options.certfile} and {key}: {exc}; give a PEM "
            "certificate chain and its private key",
        ) from exc
    return context
