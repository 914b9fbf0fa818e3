"""The websocket under the feed, sans-I/O: the upgrade, the frames, the keepalive.

Owns one client websocket from the HTTP upgrade to the close: websockets' sans-I/O
``ClientProtocol`` for the upgrade, control frames and anything unusual; from the end of the
upgrade response's head on, frames.py walks the receive buffer, and runs of plain data frames
come out as ``Run`` views, uncopied, while websockets sees every other frame whole (status
messages, fragments, pings, the close). Fragmented messages are put back together here, pings
are sent and their pongs matched. It never reads the clock and never raises on bad input from
the peer: what ended the websocket (an upgrade refused, a protocol error, the peer's close or
end of stream) is kept in ``ended`` (a ``FeedError`` and a kind), for the feed to take.
Must not touch: what the messages mean (the feed's statuses, the handshake, the
subscriptions: feed.py), the socket, the routing.

Why apart from feed.py: the framing and the conversation change for different reasons (a
faster path through the frames, a new kind of status) and are tested apart: this module in
test_websocket.py against websockets' server, the frame walk in test_frames.py, the
conversation in test_feed.py.
"""

from __future__ import annotations

from typing import NamedTuple, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import WebSocketURI

from .errors import FeedError
from .frames import Deframer, Run

__all__ = ["Ended", "Message", "Websocket"]


class Ended(NamedTuple):
    """Why the websocket is over."""

    error: FeedError
    kind: str  # the Outcome kind: upgrade_refused, protocol_error, feed_closed


# What a read completes: a message's bytes, or a run of plain frames whose payloads are
# messages, still in the caller's buffer (valid until its next read).
Message = bytes | Run

_HEAD_END = b"\r\n\r\n"  # the end of the upgrade response's head (RFC 9112 section 2.1)


class Websocket:
    """One client websocket: bytes in, messages out, bytes to send, and why it ended."""

    def __init__(
        self,
        uri: WebSocketURI,
        *,
        now: float,
        user_agent: str,
        max_message_size: int,
        keep_limit: int,
        ping_interval: float,
        ping_timeout: float,
    ) -> None:
        self._protocol = ClientProtocol(uri, max_size=max_message_size)
        request = self._protocol.connect()
        request.headers["User-Agent"] = user_agent
        self._protocol.send_request(request)
        self.upgraded = False  # the server switched protocols (101)
        self.ended: Ended | None = None
        self._messages: list[Message] = []
        self._fragments: list[bytes] = []
        # Until the upgrade response's head ends, the last bytes seen (a head whose end spans
        # two reads); from there frames.py cuts the stream.
        self._head_seen = b""
        self._deframer: Deframer | None = None
        self._max_size, self._keep_limit = max_message_size, keep_limit
        self._ping_interval, self._ping_timeout = ping_interval, ping_timeout
        self._last_ping_at = now
        self._ping_payload: bytes | None = None  # of the ping awaiting its pong
        self._ping_serial = 0

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Take bytes read from the transport; return the messages they completed, in order.

        Runs of plain data frames come out as ``Run`` views of ``data``, valid until the
        caller's next read, which must first ``keep`` the frame this one cut.
        """
        if self.ended is not None:
            return []
        if self._deframer is None:
            rest = self._receive_head(memoryview(data))
            if rest is None or not rest or self._deframer is None:
                return self._take()
            data = rest
        # Frames websockets must see are handed over together when they come together, as a
        # status and a close frame read at once. The whole read is framed before the feed
        # looks at any message: a close frame read behind a status is known first, and the
        # feed's answer to that status is then not sent (the websocket is closing).
        pending: list[memoryview] = []
        for piece in self._deframer.split(data):
            if type(piece) is Run:
                if pending and not self._hand_over(pending):
                    return self._take()  # it ended: the rest of the read is not looked at
                if not self._fragments:
                    self._messages.append(piece)
                    continue
                # A data frame inside a fragmented message: websockets says it is an error.
                piece = piece.view
            pending.append(cast(memoryview, piece))
        if pending:
            self._hand_over(pending)
        return self._take()

    def receive_eof(self) -> list[Message]:
        """The transport reached end of file (TCP FIN or TLS close_notify): the websocket is
        over; return what the last bytes completed."""
        if self.ended is not None:
            return []
        # websockets' parser reports any end of stream before a close frame as EOFError; what
        # it had buffered (or a fragmented message begun) says whether a message was cut.
        cut = (
            bool(self._fragments)
            or bool(getattr(self._protocol.reader, "buffer", b""))
            or (self._deframer is not None and self._deframer.buffered > 0)
        )
        self._protocol.receive_eof()
        if isinstance(self._protocol.parser_exc, EOFError):
            where = "in the middle of a message" if cut else "without a close frame"
            self._end(FeedError(f"the feed closed the connection {where}"), "feed_closed")
            return self._take()
        self._process()
        self._end(FeedError(self._closed_reason("the feed closed the connection")), "feed_closed")
        return self._take()

    def keep(self, buffer: memoryview) -> int:
        """Put the frame the last read cut at the front of ``buffer``, for the next read to go
        behind it; return its size (frames.py)."""
        return 0 if self._deframer is None else self._deframer.keep(buffer)

    # -- output ------------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """Whether messages and close frames can still be sent."""
        return self._protocol.state is State.OPEN

    def send_text(self, message: bytes) -> None:
        """Queue a text message. One read may bring a status and the feed's close frame behind
        it: websockets is then already closing and nothing is sent; the close ends it."""
        if self.open:
            self._protocol.send_text(message)

    def send_close(self, code: int, reason: str = "") -> None:
        """Queue a close frame, if the websocket is still open."""
        if self.open:
            self._protocol.send_close(code, reason)

    def data_to_send(self) -> list[bytes]:
        """Return the bytes to write to the transport, in order; b"" asks for a half-close."""
        return self._protocol.data_to_send()

    # -- the keepalive (RFC 6455 section 5.5.2) ----------------------------------------------

    def keepalive(self, now: float, paused: bool) -> str | None:
        """Send a ping when one is due; return why the websocket is dead if its pong is late.

        While reading is ``paused`` (backpressure) no pong can arrive, and that is our choice,
        not the peer's fault: the wait starts again.
        """
        if not self.upgraded or self.ended is not None:
            return None
        if self._ping_payload is not None:
            if paused:
                self._last_ping_at = now
            elif now - self._last_ping_at >= self._ping_timeout:
                return f"no pong within {self._ping_timeout:g} s: the feed or the network is down"
            return None
        if now - self._last_ping_at >= self._ping_interval:
            self._ping_serial += 1
            self._ping_payload = self._ping_serial.to_bytes(4, "big")
            self._protocol.send_ping(self._ping_payload)
            self._last_ping_at = now
        return None

    def keepalive_deadline(self) -> float | None:
        """When ``keepalive`` next has something to do, or None."""
        if not self.upgraded or self.ended is not None:
            return None
        limit = self._ping_timeout if self._ping_payload is not None else self._ping_interval
        return self._last_ping_at + limit

    # -- internals ---------------------------------------------------------------------------

    def _take(self) -> list[Message]:
        messages, self._messages = self._messages, []
        return messages

    def _hand_over(self, pieces: list[memoryview]) -> bool:
        # To websockets, which copies into its own buffer: views of a reused buffer are safe.
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._protocol.receive_data(cast(bytes, data))
        self._process()
        return self.ended is None

    def _receive_head(self, data: memoryview) -> memoryview | None:
        # Up to the end of the upgrade response's head, everything is websockets'; once it
        # switched protocols (101, RFC 6455 section 4.1), what follows is frames.py's.
        seen = self._head_seen + bytes(data)
        end = seen.find(_HEAD_END)
        if end < 0:
            self._head_seen = seen[-(len(_HEAD_END) - 1) :]
            self._protocol.receive_data(cast(bytes, data))
            self._process()
            return None
        cut = end + len(_HEAD_END) - len(self._head_seen)
        self._protocol.receive_data(cast(bytes, data[:cut]))
        self._process()
        if self.ended is not None:
            return None
        if not self.open:  # a refusal with a body: websockets reads it
            self._protocol.receive_data(cast(bytes, data[cut:]))
            self._process()
            return None
        self._deframer = Deframer(self._max_size, self._keep_limit)
        return data[cut:]

    def _process(self) -> None:
        protocol = self._protocol
        for event in protocol.events_received():
            if isinstance(event, Response):
                self._receive_response()
            elif isinstance(event, Frame):
                self._receive_frame(event)
            if self.ended is not None:
                return
        exc = protocol.parser_exc
        if exc is not None:
            hint = "; raise max_message_size" if isinstance(exc, PayloadTooBig) else ""
            error = FeedError(f"websocket protocol error from the feed: {exc}{hint}")
            self._end(error, "protocol_error")
        elif protocol.close_rcvd is not None or protocol.state is State.CLOSED:
            # A client waits for the server's FIN after the close handshake (RFC 6455 7.1.1);
            # the service closes the socket itself, so the websocket is over here.
            self._end(
                FeedError(self._closed_reason("the feed closed the websocket")), "feed_closed"
            )

    def _receive_response(self) -> None:
        exc = self._protocol.handshake_exc
        if exc is not None:
            detail = str(exc)
            if isinstance(exc, InvalidHandshake) and "401" in detail:
                detail += " (check the URL: the feed refused the upgrade)"
            self._end(FeedError(f"websocket upgrade refused: {detail}"), "upgrade_refused")
            return
        self.upgraded = True

    def _receive_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        # websockets 14+ reads frames into a bytearray; the splitter hashes slices of it.
        data = frame.data if type(frame.data) is bytes else bytes(frame.data)
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._messages.append(data)
            else:
                self._fragments = [data]
        elif opcode is Opcode.CONT:
            self._fragments.append(data)
            if frame.fin:
                self._messages.append(b"".join(self._fragments))
                self._fragments = []
        elif opcode is Opcode.PONG and frame.data == self._ping_payload:
            self._ping_payload = None
        # PING is answered by ClientProtocol itself (RFC 6455 5.5.2); CLOSE ends in _process.

    def _end(self, error: FeedError, kind: str) -> None:
        if self.ended is None:
            self.ended = Ended(error, kind)

    def _closed_reason(self, what: str) -> str:
        rcvd = self._protocol.close_rcvd
        if rcvd is not None:
            return f"{what} (close code {int(rcvd.code)}: {rcvd.reason or 'no reason'})"
        return what
