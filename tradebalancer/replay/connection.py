"""One client of the replay feed: its socket, its websocket state and the feed's protocol.

Speaks the feed's protocol: on connect ``[{"ev":"status","status":"connected",...}]``;
``{"action":"auth","params":KEY}`` gets ``auth_success``, or ``auth_failed`` then a close
frame (1008); each subscribe parameter gets its own ``subscribed to: PARAM`` status, then data
frames flow until the stream is over, which ends with a clean close (1000). Subscriptions are
acknowledged but do not filter the data.

Design notes:

* websockets' sans-I/O ``ServerProtocol`` does the HTTP upgrade, parses the client's (masked)
  frames, answers pings, runs the close handshake and frames the status messages. Data frames
  bypass it: the server frames them itself (unmasked, RFC 6455 5.2) and writes up to 1 MiB of
  joined frames per ``send``: one system call per batch, whatever its number of frames.
* With ``disconnect_after``, the server cuts the connection once, in the middle of a frame (a
  TCP FIN without a close frame and without TLS close_notify), after about that many events,
  and sends that frame again, whole, to the next connection: a client that drops incomplete
  frames and reconnects receives every event exactly once.
* ``rate`` paces events per second on each connection; without it the server writes as fast
  as the client reads.
* Latency: with ``timestamps``, the last event of each frame gets a last field
  ``"lt":<CLOCK_MONOTONIC in ns>`` (``time.monotonic_ns()``), written just before the frame
  goes to the socket. CLOCK_MONOTONIC is shared by the processes of one machine, so a
  worker's ``time.monotonic_ns() - lt`` is the time from the replay's send to the worker. It
  is meaningful only with ``rate``: unpaced, frames wait in socket buffers.
* The delay behind the market: with ``delay``, the last event's ``"t"`` of each frame becomes
  the wall clock minus that many seconds (in ms), written as the frame is sent: what the
  balancer's delay histogram and warning measure (the recorded timestamps are years old).

It touches only the one socket the server (``server.py``) accepted for it, and takes its data
frames from the stream all connections share (``stream.py``); it never listens or accepts, and
knows the server only as the ``on_close`` callback it calls when it is done.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable

import orjson
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from .options import ReplayOptions, ReplayStats
from .stream import AUTH_FAILED, AUTH_SUCCESS, CONNECTED, Stream, frame_header, restamp, status

logger = logging.getLogger(__name__)
_protocol_logger = logging.getLogger(f"{__name__}.websocket")  # websockets logs here

BATCH_BYTES = 1 << 20  # per send: larger gains nothing measurable on loopback, smaller costs
CLOSE_TIMEOUT = 2.0  # seconds to wait for the client's side of a closing handshake
_FLUSH_LIMIT = 16 << 20  # bytes per loop pass and connection, so one client cannot starve others
_RECV_SIZE = 65536


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

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        now: float,
        *,
        options: ReplayOptions,
        stream: Stream,
        stats: ReplayStats,
        on_close: Callable[[Connection], None],
        sent_frames: list[bytes] | None = None,
    ) -> None:
        self.options = options
        self.stream = stream
        self.stats = stats
        self._on_close = on_close
        self._sent_frames = sent_frames  # every frame sent, for tests (options.keep_sent)
        self.sock = sock
        self.peer = peer
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.phase = Phase.TLS if self.tls else Phase.UPGRADE
        self.protocol = ServerProtocol(max_size=1 << 20, logger=_protocol_logger)
        self.outbox: deque[memoryview] = deque()
        self.shut_down_pending = False  # half-close once the outbox is empty
        self.abrupt = False  # ... and without TLS close_notify: the cut
        self.deadline: float | None = now + 10.0  # handshakes must finish in time
        self.ping_interval = options.ping_interval or None
        self.ping_timeout = options.ping_timeout or self.ping_interval
        self.next_ping = float("inf")
        self.ping_payload: bytes | None = None
        self.ping_sent_at = 0.0
        self.ping_serial = 0
        self.subscriptions: set[str] = set()
        self.number = stats.connections  # the server counted it as it accepted
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
                self.stats.pings_sent += 1
        self._pull()
        self.flush(now)

    def next_deadline(self) -> float:
        """Return when ``tick`` next has something to do."""
        when = self.deadline if self.deadline is not None else float("inf")
        if self.phase is Phase.STREAMING or self.phase is Phase.READY:
            if self.ping_payload is not None:
                when = min(when, self.ping_sent_at + (self.ping_timeout or 0))
            when = min(when, self.next_ping)
        rate = self.options.rate
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
        return self._may_stream() and self.options.rate is None

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
                self.stats.pongs_received += 1
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
            elif params and (not self.options.accept_keys or params in self.options.accept_keys):
                self.phase = Phase.READY
                self.deadline = None
                self.protocol.send_text(AUTH_SUCCESS)
            else:
                self.stats.auth_failures += 1
                logger.info("%s: API key refused", self.peer)
                self.protocol.send_text(AUTH_FAILED)
                self.protocol.send_close(1008, "authentication failed")
                self._closing(now)
        elif action in ("subscribe", "unsubscribe"):
            if self.phase is Phase.AUTH:
                self.protocol.send_text(status("error", "not authorized"))
                return
            self.stats.subscription_actions.append((self.number, action, params))
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
        options = self.options
        stream = self.stream
        stats = self.stats
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
        keep = self._sent_frames
        while size < BATCH_BYTES and due > 0 and not stream.exhausted:
            frame, count = stream.peek()
            if stream.take_cut(count):
                # The cut: half a frame, then FIN. The frame stays next in the stream.
                stats.forced_disconnects += 1
                pieces += (frame_header(len(frame), opcode), frame[: len(frame) // 2])
                self.shut_down_pending = self.abrupt = True
                logger.info("%s: cutting the connection mid-frame as asked", self.peer)
                break
            if options.delay is not None:
                frame = restamp(frame, time.time() - options.delay)
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
            stats.events_sent += count
            stats.frames_sent += 1
        if not pieces:
            return False
        data = b"".join(pieces)
        stats.bytes_sent += len(data)
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
            self.stats.clean_closes += 1
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
        self._on_close(self)
