"""The replay feed: a local stand-in for the Massive websocket feed (demos, tests, benchmarks).

Owns a listening socket and the connections to it, served by one background thread running a
``selectors`` loop. It serves frames from a recording file or from the synthetic generator
(``synth.py``) and speaks the feed's protocol: on connect ``[{"ev":"status","status":
"connected",...}]``; ``{"action":"auth","params":KEY}`` gets ``auth_success``, or
``auth_failed`` then a close frame (1008); each subscribe parameter gets its own
``subscribed to: PARAM`` status, then data frames flow until the stream is over, which ends
with a clean close (1000). Subscriptions are acknowledged but do not filter the data.

Design notes:

* websockets' sans-I/O ``ServerProtocol`` does the HTTP upgrade, parses the client's (masked)
  frames, answers pings, runs the close handshake and frames the status messages. Data frames
  bypass it: the server frames them itself (unmasked, RFC 6455 5.2) and writes up to 1 MiB of
  joined frames per ``send``: one system call per batch, whatever its number of frames.
* One stream feeds every connection: the events a connection was sent are not sent again to
  the next one. With ``disconnect_after``, the server cuts the connection once, in the middle
  of a frame (a TCP FIN without a close frame and without TLS close_notify), after about that
  many events, and sends that frame again, whole, to the next connection: a client that drops
  incomplete frames and reconnects receives every event exactly once.
* ``rate`` paces events per second on each connection; without it the server writes as fast
  as the client reads. ``events`` ends the stream after exactly that many (the last frame is
  shortened if needed). A synthetic stream without ``events`` loops over a pool of
  ``pool_events`` pre-generated trades.
* Latency: with ``timestamps``, the last event of each frame gets a last field
  ``"lt":<CLOCK_MONOTONIC in ns>`` (``time.monotonic_ns()``), written just before the frame
  goes to the socket. CLOCK_MONOTONIC is shared by the processes of one machine, so a
  worker's ``time.monotonic_ns() - lt`` is the time from the replay's send to the worker. It
  is meaningful only with ``rate``: unpaced, frames wait in socket buffers.

It never touches anything but its own sockets, and it is not part of the service.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import logging
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import orjson
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from . import synth
from .errors import ConfigError, ExitCode, TradeBalancerError, TransportError

logger = logging.getLogger(__name__)
_protocol_logger = logging.getLogger(f"{__name__}.websocket")  # websockets logs here

CONNECTED = b'[{"ev":"status","status":"connected","message":"Connected Successfully"}]'
AUTH_SUCCESS = b'[{"ev":"status","status":"auth_success","message":"authenticated"}]'
AUTH_FAILED = b'[{"ev":"status","status":"auth_failed","message":"authentication failed"}]'
BATCH_BYTES = 1 << 20  # per send: larger gains nothing measurable on loopback, smaller costs
CLOSE_TIMEOUT = 2.0  # seconds to wait for the client's side of a closing handshake
_FLUSH_LIMIT = 16 << 20  # bytes per loop pass and connection, so one client cannot starve others
_RECV_SIZE = 65536


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


def frame_header(length: int, opcode: int = 0x1, fin: bool = True) -> bytes:
    """Return the header of an unmasked websocket frame (RFC 6455 5.2) of ``length`` bytes."""
    first = (0x80 if fin else 0) | opcode
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def status(kind: str, message: str) -> bytes:
    """Return one status message, e.g. ``[{"ev":"status","status":"success",...}]``."""
    return orjson.dumps([{"ev": "status", "status": kind, "message": message}])


class Stream:
    """The frames every connection takes from, in order: a cursor over a list, maybe looped."""

    def __init__(self, frames: list[bytes], counts: list[int], *, loop: bool, limit: int | None):
        self.frames = frames
        self.counts = counts
        self.loop = loop and bool(frames)
        self.limit = limit
        self.position = 0
        self.sent = 0

    @property
    def exhausted(self) -> bool:
        """True once no frame is left to send."""
        if self.limit is not None and self.sent >= self.limit:
            return True
        return not self.loop and self.position >= len(self.frames)

    def peek(self) -> tuple[bytes, int]:
        """Return the next frame and its event count, shortened to the limit if need be."""
        frame, count = self.frames[self.position], self.counts[self.position]
        if self.limit is not None and self.sent + count > self.limit:
            count = self.limit - self.sent
            frame = b"[" + b",".join(synth.split_events(frame)[:count]) + b"]"
        return frame, count

    def advance(self, count: int) -> None:
        """Mark the frame returned by ``peek`` as sent."""
        self.sent += count
        self.position += 1
        if self.loop and self.position >= len(self.frames):
            self.position = 0


class Phase(enum.Enum):
    """Where one client connection stands."""

    TLS = "tls handshake"
    UPGRADE = "http upgrade"
    AUTH = "waiting for auth"
    READY = "authenticated"
    STREAMING = "streaming"
    CLOSING = "closing"  # close frame sent or received; no more data frames
    DRAINING = "draining"  # our side shut down; reading until the client closes
    CLOSED = "closed"


class Connection:
    """One client: its socket, its websocket protocol state and its queue of bytes to send."""

    def __init__(self, server: ReplayServer, sock: socket.socket, peer: str, now: float):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.phase = Phase.TLS if self.tls else Phase.UPGRADE
        self.protocol = ServerProtocol(max_size=1 << 20, logger=_protocol_logger)
        self.outbox: deque[memoryview] = deque()
        self.shut_down_pending = False  # half-close once the outbox is empty
        self.abrupt = False  # ... and without TLS close_notify: the cut
        self.deadline: float | None = now + 10.0  # handshakes must finish in time
        options = server.options
        self.ping_interval = options.ping_interval or None
        self.ping_timeout = options.ping_timeout or self.ping_interval
        self.next_ping = float("inf")
        self.ping_payload: bytes | None = None
        self.ping_sent_at = 0.0
        self.ping_serial = 0
        self.subscriptions: set[str] = set()
        self.started_at = 0.0
        self.events = 0  # sent on this connection, for the rate

    # -- events from the loop ----------------------------------------------------------------

    def on_readable(self, now: float) -> None:
        """Read what the client sent and act on it."""
        if self.phase is Phase.TLS and not self._handshake_tls(now):
            return
        for _ in range(64):  # bounded: a flood of input must not stall the other clients
            try:
                data = self.sock.recv(_RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:  # ssl.SSLError included
                self._drop(f"read failed: {exc}")
                return
            if self.phase is Phase.DRAINING:
                if not data:
                    self._drop(None)
                    return
                continue
            if not data:
                self.protocol.receive_eof()
                self._process(now)
                break
            self.protocol.receive_data(data)
            self._process(now)
            if self.phase is Phase.CLOSED:
                return
        if self.protocol.state is State.CLOSED and self.phase is not Phase.DRAINING:
            self._drop(None)

    def tick(self, now: float) -> None:
        """Run timers (pings, the close timeout, the pace) and write what is due."""
        if self.deadline is not None and now >= self.deadline:
            self._drop(f"timed out while {self.phase.value}")
            return
        if self.phase is Phase.STREAMING or self.phase is Phase.READY:
            if self.ping_payload is not None and now - self.ping_sent_at > (self.ping_timeout or 0):
                logger.info("%s: no pong within %g s", self.peer, self.ping_timeout)
                self.protocol.fail(1011, "keepalive ping timeout")
                self._closing(now)
            elif self.ping_interval is not None and now >= self.next_ping:
                self.ping_serial += 1
                self.ping_payload = self.ping_serial.to_bytes(4, "big")
                self.ping_sent_at = now
                self.next_ping = now + self.ping_interval
                self.protocol.send_ping(self.ping_payload)
                self.server.stats.pings_sent += 1
        self._pull()
        self.flush(now)

    def next_deadline(self) -> float:
        """Return when ``tick`` next has something to do."""
        when = self.deadline if self.deadline is not None else float("inf")
        if self.phase is Phase.STREAMING or self.phase is Phase.READY:
            if self.ping_payload is not None:
                when = min(when, self.ping_sent_at + (self.ping_timeout or 0))
            when = min(when, self.next_ping)
        rate = self.server.options.rate
        if self.phase is Phase.STREAMING and rate and not self.outbox:
            # One event past the deadline, so the pace has something to send when it wakes.
            when = min(when, self.started_at + (self.events + 1) / rate)
        return when

    def wants_write(self) -> bool:
        """True if the socket should be watched for writability."""
        if self.phase is Phase.CLOSED:
            return False
        if self.outbox:
            return True
        return self._may_stream() and self.server.options.rate is None

    def flush(self, now: float) -> None:
        """Write queued bytes, refilling from the stream, until the socket takes no more."""
        written = 0
        while written < _FLUSH_LIMIT and self.phase is not Phase.CLOSED:
            if not self.outbox and (not self._may_stream() or not self._fill(now)):
                break
            chunk = self.outbox[0]
            try:
                sent = self.sock.send(chunk)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
            except OSError as exc:
                self._drop(f"write failed: {exc}")
                return
            written += sent
            if sent < len(chunk):
                self.outbox[0] = chunk[sent:]
                break
            self.outbox.popleft()
        if not self.outbox and self.shut_down_pending:
            self._shut_down(now)

    def close(self) -> None:
        """Close the socket now (server shutdown): a going-away close frame if it fits."""
        if self.phase is Phase.CLOSED:
            return
        if self.protocol.state is State.OPEN and not self.outbox:
            self.protocol.send_close(1001, "replay feed shutting down")
            with contextlib.suppress(OSError):
                self.sock.send(b"".join(d for d in self.protocol.data_to_send() if d))
        self._drop(None)

    # -- internals ---------------------------------------------------------------------------

    def _handshake_tls(self, now: float) -> bool:
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except (OSError, ValueError) as exc:
            self._drop(f"TLS handshake failed: {exc}")
            return False
        self.phase = Phase.UPGRADE
        logger.debug("%s: TLS %s, %s", self.peer, self.sock.version(), self.sock.cipher())
        return True

    def _process(self, now: float) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                response = self.protocol.accept(event)
                self.protocol.send_response(response)
                if response.status_code == 101:
                    self.phase = Phase.AUTH
                    self.deadline = now + 30.0  # the client must authenticate in time
                    if self.ping_interval is not None:
                        self.next_ping = now + self.ping_interval
                    self.protocol.send_text(CONNECTED)
            elif isinstance(event, Frame):
                self._receive_frame(event, now)
        if self.protocol.state in (State.CLOSING, State.CLOSED):
            self._closing(now)
        self._pull()

    def _receive_frame(self, frame: Frame, now: float) -> None:
        if frame.opcode is Opcode.PONG:
            if frame.data == self.ping_payload:
                self.ping_payload = None
                self.server.stats.pongs_received += 1
        elif frame.opcode is Opcode.TEXT and frame.fin and self.protocol.state is State.OPEN:
            self._receive_message(bytes(frame.data), now)
        # Pings are answered by ServerProtocol (RFC 6455 5.5.2); clients send no fragments.

    def _receive_message(self, message: bytes, now: float) -> None:
        try:
            request = orjson.loads(message)
        except orjson.JSONDecodeError:
            request = None
        if not isinstance(request, dict):
            self.protocol.send_text(status("error", "invalid message: not a JSON object"))
            return
        action, params = request.get("action"), request.get("params")
        if not isinstance(params, str):
            params = ""
        if action == "auth":
            if self.phase is not Phase.AUTH:
                self.protocol.send_text(status("error", "already authenticated"))
            elif params and (
                not self.server.options.accept_keys or params in self.server.options.accept_keys
            ):
                self.phase = Phase.READY
                self.deadline = None
                self.protocol.send_text(AUTH_SUCCESS)
            else:
                self.server.stats.auth_failures += 1
                logger.info("%s: API key refused", self.peer)
                self.protocol.send_text(AUTH_FAILED)
                self.protocol.send_close(1008, "authentication failed")
                self._closing(now)
        elif action in ("subscribe", "unsubscribe"):
            if self.phase is Phase.AUTH:
                self.protocol.send_text(status("error", "not authorized"))
                return
            for param in filter(None, (p.strip() for p in params.split(","))):
                if action == "subscribe":
                    self.subscriptions.add(param)
                    self.protocol.send_text(status("success", f"subscribed to: {param}"))
                else:
                    self.subscriptions.discard(param)
                    self.protocol.send_text(status("success", f"unsubscribed to: {param}"))
            if self.subscriptions and self.phase is Phase.READY:
                self.phase = Phase.STREAMING
                self.started_at, self.events = now, 0  # the pace starts over
                logger.info("%s: streaming (subscribed to %s)", self.peer, params)
            elif not self.subscriptions and self.phase is Phase.STREAMING:
                self.phase = Phase.READY
        else:
            self.protocol.send_text(status("error", f"unknown action: {action}"))

    def _may_stream(self) -> bool:
        return self.phase is Phase.STREAMING and not self.shut_down_pending and not self.outbox

    def _fill(self, now: float) -> bool:
        """Queue the frames due now; False if there are none (paced, or the stream ended)."""
        server = self.server
        options = server.options
        stream = server.stream
        if stream.exhausted:
            logger.info("%s: end of the stream after %d events", self.peer, stream.sent)
            self.protocol.send_close(1000, "end of replay")
            self._closing(now)
            self._pull()
            return bool(self.outbox)
        due = float("inf")  # events this fill may send
        if options.rate:
            due = int(options.rate * (now - self.started_at)) - self.events
            if due < 1:
                return False
        pieces: list[bytes] = []
        size = 0
        opcode = 0x2 if options.binary else 0x1
        keep = server.sent_frames if options.keep_sent else None
        while size < BATCH_BYTES and due > 0 and not stream.exhausted:
            frame, count = stream.peek()
            if server.cut_pending and stream.sent + count > (options.disconnect_after or 0):
                # The cut: half a frame, then FIN. The frame stays next in the stream.
                server.cut_pending = False
                server.stats.forced_disconnects += 1
                pieces += (frame_header(len(frame), opcode), frame[: len(frame) // 2])
                self.shut_down_pending = self.abrupt = True
                logger.info("%s: cutting the connection mid-frame as asked", self.peer)
                break
            if options.timestamps and frame.endswith(b"}]"):
                frame = b'%s,"lt":%d}]' % (frame[:-2], time.monotonic_ns())
            if options.fragment and len(frame) >= 3:
                third = len(frame) // 3
                pieces += (
                    frame_header(third, opcode, fin=False),
                    frame[:third],
                    frame_header(third, 0x0, fin=False),
                    frame[third : 2 * third],
                    frame_header(len(frame) - 2 * third, 0x0),
                    frame[2 * third :],
                )
            else:
                pieces += (frame_header(len(frame), opcode), frame)
            if keep is not None:
                keep.append(frame)
            stream.advance(count)
            self.events += count
            due -= count
            size += len(frame)
            server.stats.events_sent += count
            server.stats.frames_sent += 1
        if not pieces:
            return False
        data = b"".join(pieces)
        server.stats.bytes_sent += len(data)
        self.outbox.append(memoryview(data))
        return True

    def _pull(self) -> None:
        """Move the protocol's output to the outbox; its end-of-stream marker means shut down."""
        for data in self.protocol.data_to_send():
            if data:
                self.outbox.append(memoryview(data))
            else:
                self.shut_down_pending = True

    def _closing(self, now: float) -> None:
        if self.phase not in (Phase.CLOSING, Phase.DRAINING, Phase.CLOSED):
            self.phase = Phase.CLOSING
            self.deadline = now + CLOSE_TIMEOUT

    def _shut_down(self, now: float) -> None:
        """Half-close our side with a FIN, then read until the client closes its side."""
        self.shut_down_pending = False
        self.phase = Phase.DRAINING
        self.deadline = now + CLOSE_TIMEOUT
        if self.protocol.close_rcvd is not None and self.protocol.close_sent is not None:
            self.server.stats.clean_closes += 1
        if self.tls and not self.abrupt:
            # close_notify (RFC 8446 6.1); unwrap then waits for the client's, which a
            # non-blocking socket reports as SSLWantReadError: the alert is on its way.
            with contextlib.suppress(OSError, ValueError):
                self.sock.unwrap()  # type: ignore[attr-defined]
        try:
            # Reading on until the client's FIN, rather than closing now, keeps the kernel
            # from answering the client's last bytes with a RST that could destroy data we
            # sent and it has not read yet. SSLSocket.shutdown drops the TLS layer.
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(None)

    def _drop(self, reason: str | None) -> None:
        if self.phase is Phase.CLOSED:
            return
        if reason:
            logger.info("%s: connection dropped: %s", self.peer, reason)
        self.phase = Phase.CLOSED
        self.server.release(self)


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
        self.stream = _load_stream(options)
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


def _load_stream(options: ReplayOptions) -> Stream:
    """Read the recording, or generate the synthetic trades, into memory."""
    started = time.monotonic()
    frames: list[bytes] = []
    counts: list[int] = []
    if options.source is not None:
        for frame, count in synth.read_recording_events(options.source):
            frames.append(frame)
            counts.append(count)
        loop = options.loop
        what = options.source
    else:
        total = options.events if options.events is not None else options.pool_events
        for frame in synth.generate_frames(
            options.seed, options.symbols, total, options.min_batch, options.max_batch
        ):
            frames.append(frame)
            counts.append(frame.count(b'{"ev":'))
        loop = options.loop or options.events is None  # an endless stream loops over its pool
        what = f"synthetic trades (seed {options.seed}, {options.symbols} symbols)"
    logger.info(
        "replay source: %d events in %d frames from %s, loaded in %.1f s",
        sum(counts),
        len(frames),
        what,
        time.monotonic() - started,
    )
    return Stream(frames, counts, loop=loop, limit=options.events)


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


def record(options: ReplayOptions, path: str) -> int:
    """Write the source the options name (synthetic by default) to a recording file."""
    if options.source is not None:
        frames = synth.read_recording(options.source)
        what = f"the frames of {options.source}"
    else:
        events = options.events if options.events is not None else 100_000
        frames = synth.generate_frames(
            options.seed, options.symbols, events, options.min_batch, options.max_batch
        )
        what = f"{events} synthetic trades, seed {options.seed}, {options.symbols} symbols"
    try:
        written = synth.write_recording(path, frames, comment=f"tradebalancer replay: {what}")
    except OSError as exc:
        raise ConfigError("--record-to", f"cannot write {path}: {exc.strerror or exc}") from exc
    logger.info("wrote %d frames (%s) to %s", written, what, path)
    return int(ExitCode.OK)


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
