"""The Massive (Polygon.io) feed protocol, sans-I/O: bytes in, data messages out, bytes to send.

Owns one websocket connection's conversation with the feed: the HTTP upgrade and the websocket
framing (delegated to websockets' sans-I/O ``ClientProtocol``), reassembly of fragmented
messages, the feed's own handshake, and the client keepalive. It does no networking and never
reads the clock: the service hands it bytes and ``now``, and takes back the data messages, the
bytes to send and, when the conversation is over, the reason (``error``).

The feed's handshake (Massive's websocket documentation)::

    server  [{"ev":"status","status":"connected",...}]
    client  {"action":"auth","params":"<key>"}
    server  [{"ev":"status","status":"auth_success",...}]     or auth_failed -> AuthError
    client  {"action":"subscribe","params":"T.*,Q.AAPL"}
    server  [{"ev":"status","status":"success","message":"subscribed to: T.*"}]   one per param
    server  [{"ev":"T","sym":"AAPL",...},...]                  data, until the connection ends

The handshake is a transition table, ``HANDSHAKE``: (phase, status) -> (action, next phase);
a status the table does not name for the phase, nor for every phase (``ANY``), is noted and
changes nothing. ``max_connections`` (another client with the same key took the stream over)
ends the conversation with a cooldown: the service waits long before it reconnects. Status
events never leave this module: the splitter hands those found in data frames back through
``receive_status``.

Bad input from the peer never raises: the websocket is failed (a close frame is queued) and
the reason kept, and the service asks for it (``outcome``) and decides at its own pace.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import cast

import orjson
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidURI
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from . import __version__
from .errors import EXCERPT_BYTES, AuthError, FeedError, TradeBalancerError

logger = logging.getLogger(__name__)

_STATUS_PREFIX = b'[{"ev":"status"'


class Phase(enum.Enum):
    """Where the conversation with the feed stands."""

    UPGRADING = "upgrading"  # HTTP upgrade sent, waiting for 101
    CONNECTING = "connecting"  # websocket open, waiting for the "connected" status
    AUTHENTICATING = "authenticating"  # auth sent, waiting for auth_success
    SUBSCRIBING = "subscribing"  # subscribe sent, waiting for one success per param
    STREAMING = "streaming"  # every subscription confirmed
    CLOSED = "closed"  # over: see Feed.outcome()


class Action(enum.Enum):
    """What a status makes the feed do."""

    AUTHENTICATE = "send the auth message"
    SUBSCRIBE = "send the subscribe message"
    CONFIRM = "count a subscription confirmed; stream once all are"
    REFUSE_KEY = "close: the API key was refused (no retry)"
    COOL_DOWN = "close: another client took the stream over (wait long)"
    FAIL = "close with the feed's message"
    NOTE = "log it, change nothing"


ANY = None  # a HANDSHAKE row for every phase

# The feed's handshake (Massive's websocket documentation). Looked up with the phase first,
# then with ANY; a status found under neither is noted (Action.NOTE) and changes nothing.
HANDSHAKE: Mapping[tuple[Phase | None, str], tuple[Action, Phase]] = MappingProxyType(
    {
        (Phase.CONNECTING, "connected"): (Action.AUTHENTICATE, Phase.AUTHENTICATING),
        (Phase.AUTHENTICATING, "auth_success"): (Action.SUBSCRIBE, Phase.SUBSCRIBING),
        (Phase.SUBSCRIBING, "success"): (Action.CONFIRM, Phase.SUBSCRIBING),
        (ANY, "auth_failed"): (Action.REFUSE_KEY, Phase.CLOSED),
        (ANY, "max_connections"): (Action.COOL_DOWN, Phase.CLOSED),
        (ANY, "error"): (Action.FAIL, Phase.CLOSED),
        (ANY, "auth_timeout"): (Action.FAIL, Phase.CLOSED),
    }
)


def transition(phase: Phase, status: object) -> tuple[Action, Phase]:
    """Look ``status`` up in HANDSHAKE for ``phase``: the action and the next phase."""
    if isinstance(status, str):
        found = HANDSHAKE.get((phase, status)) or HANDSHAKE.get((ANY, status))
        if found is not None:
            return found
    return Action.NOTE, phase


@dataclass(frozen=True)
class Outcome:
    """How a conversation ended: why, and what that means for the next one."""

    reason: str  # for the log
    error: TradeBalancerError | None  # what ended it; None: we closed it ourselves
    cooldown: bool  # max_connections: wait max_connections_cooldown before reconnecting
    streamed: float  # seconds it streamed (0: it never got there)


class Feed:
    """One connection's worth of the feed protocol, driven by bytes and timestamps."""

    def __init__(
        self,
        url: str,
        api_key: str,
        subscribe: Sequence[str],
        *,
        now: float,
        max_message_size: int = 16 << 20,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
    ) -> None:
        try:
            uri = parse_uri(url)
        except InvalidURI as exc:
            raise FeedError(f"invalid feed URL {url!r}: {exc}") from exc
        self.url = url
        self._api_key = api_key
        self._params = ",".join(subscribe)
        self._pending_params = set(subscribe)
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._protocol = ClientProtocol(uri, max_size=max_message_size)
        request = self._protocol.connect()
        request.headers["User-Agent"] = f"tradebalancer/{__version__}"
        self._protocol.send_request(request)
        self.phase = Phase.UPGRADING
        self._error: FeedError | None = None
        self._cooldown = False  # after max_connections: reconnect only after a long wait
        self._streaming_since: float | None = None
        self._messages: list[bytes] = []
        self._fragments: list[bytes] = []
        self._last_ping_at = now
        self._ping_payload: bytes | None = None
        self._ping_serial = 0
        self._paused = False  # the service stopped reading (backpressure): no pong can arrive

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes read from the transport; data messages become available."""
        if self.phase is Phase.CLOSED:
            return
        # ClientProtocol copies into its own buffer, so a memoryview of a reused buffer is safe.
        self._protocol.receive_data(cast(bytes, data))
        self._process(now)

    def receive_eof(self, now: float) -> None:
        """The transport reached end of file (TCP FIN or TLS close_notify)."""
        if self.phase is Phase.CLOSED:
            return
        self._protocol.receive_eof()
        if isinstance(self._protocol.parser_exc, EOFError):
            self._close(FeedError("the feed closed the connection in the middle of a message"))
            return
        self._process(now)
        self._close(FeedError(self._closed_reason("the feed closed the connection")))

    def receive_status(self, event: bytes, now: float) -> None:
        """Handle one status event (a JSON object) that arrived inside a data frame."""
        try:
            parsed = orjson.loads(event)
        except orjson.JSONDecodeError:
            logger.warning("ignored malformed status event: %r", event[:EXCERPT_BYTES])
            return
        if isinstance(parsed, dict):
            self._handle_status(parsed, now)

    # -- output ------------------------------------------------------------------------------

    def messages_received(self) -> list[bytes]:
        """Return the data messages (JSON arrays) completed since the last call."""
        messages, self._messages = self._messages, []
        return messages

    def data_to_send(self) -> list[bytes]:
        """Return the bytes to write to the transport, in order; b"" asks for a half-close."""
        return self._protocol.data_to_send()

    @property
    def closed(self) -> bool:
        """True once the conversation is over and the transport should be closed."""
        return self.phase is Phase.CLOSED

    @property
    def streaming(self) -> bool:
        """True once every subscription was confirmed (until the conversation is over)."""
        return self._streaming_since is not None

    def streamed(self, now: float) -> float:
        """Seconds since every subscription was confirmed (0 if they never were)."""
        return 0.0 if self._streaming_since is None else now - self._streaming_since

    def outcome(self, now: float) -> Outcome | None:
        """None while the conversation goes on; how it ended once it is over."""
        if self.phase is not Phase.CLOSED:
            return None
        error = self._error
        reason = str(error) if error is not None else "closed"
        return Outcome(reason, error, self._cooldown, self.streamed(now))

    def pause(self, paused: bool) -> None:
        """The service stopped (or went back to) reading the socket: pongs cannot arrive."""
        self._paused = paused

    # -- time --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Run the keepalive: send a ping each interval, give up when a pong is overdue."""
        if self.phase in (Phase.UPGRADING, Phase.CLOSED):
            return
        if self._ping_payload is not None:
            if self._paused:
                # Not reading the socket is our choice, not the peer's fault.
                self._last_ping_at = now
            elif now - self._last_ping_at >= self._ping_timeout:
                self._fail(
                    CloseCode.INTERNAL_ERROR,
                    f"no pong within {self._ping_timeout:g} s: the feed or the network is down",
                )
            return
        if now - self._last_ping_at >= self._ping_interval:
            self._ping_serial += 1
            self._ping_payload = self._ping_serial.to_bytes(4, "big")
            self._protocol.send_ping(self._ping_payload)
            self._last_ping_at = now

    def next_deadline(self) -> float | None:
        """Return when ``tick`` next has something to do, or None."""
        if self.phase in (Phase.UPGRADING, Phase.CLOSED):
            return None
        limit = self._ping_timeout if self._ping_payload is not None else self._ping_interval
        return self._last_ping_at + limit

    def close(self) -> None:
        """Start a clean websocket close (going away), e.g. on shutdown."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(CloseCode.GOING_AWAY, "client shutting down")
        self._close(None)

    # -- internals ---------------------------------------------------------------------------

    def _process(self, now: float) -> None:
        for event in self._protocol.events_received():
            if isinstance(event, Response):
                self._receive_response()
            elif isinstance(event, Frame):
                self._receive_frame(event, now)
            if self.phase is Phase.CLOSED:
                return
        exc = self._protocol.parser_exc
        if exc is not None:
            self._close(FeedError(f"websocket protocol error from the feed: {exc}"))
        elif self._protocol.close_rcvd is not None or self._protocol.state is State.CLOSED:
            # A client waits for the server's FIN after the close handshake (RFC 6455 7.1.1);
            # the service closes the socket itself, so the conversation is over here.
            self._close(FeedError(self._closed_reason("the feed closed the websocket")))

    def _receive_response(self) -> None:
        exc = self._protocol.handshake_exc
        if exc is not None:
            detail = str(exc)
            if isinstance(exc, InvalidHandshake) and "401" in detail:
                detail += " (check the URL: the feed refused the upgrade)"
            self._close(FeedError(f"websocket upgrade refused: {detail}"))
            return
        self.phase = Phase.CONNECTING
        logger.debug("websocket open to %s", self.url)

    def _receive_frame(self, frame: Frame, now: float) -> None:
        opcode = frame.opcode
        # websockets 14+ reads frames into a bytearray; the splitter hashes slices of it.
        data = frame.data if type(frame.data) is bytes else bytes(frame.data)
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._receive_message(data, now)
            else:
                self._fragments = [data]
        elif opcode is Opcode.CONT:
            self._fragments.append(data)
            if frame.fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self._receive_message(message, now)
        elif opcode is Opcode.PONG and frame.data == self._ping_payload:
            self._ping_payload = None
        # PING is answered by ClientProtocol itself (RFC 6455 5.5.2); CLOSE ends in _process.

    def _receive_message(self, message: bytes, now: float) -> None:
        if message.startswith(_STATUS_PREFIX):
            try:
                events = orjson.loads(message)
            except orjson.JSONDecodeError:
                events = None
            if isinstance(events, list) and all(
                isinstance(e, dict) and e.get("ev") == "status" for e in events
            ):
                for event in events:
                    self._handle_status(event, now)
                return
        # Anything else, status events mixed with data included, goes to the splitter, which
        # hands status events back through receive_status.
        self._messages.append(message)

    def _handle_status(self, event: dict[str, object], now: float) -> None:
        status = event.get("status")
        text = str(event.get("message", ""))
        action, next_phase = transition(self.phase, status)
        if action is Action.AUTHENTICATE:
            logger.info("connected to %s; authenticating", self.url)
            self._send_text(orjson.dumps({"action": "auth", "params": self._api_key}))
        elif action is Action.SUBSCRIBE:
            logger.info("authenticated; subscribing to %s", self._params)
            self._send_text(orjson.dumps({"action": "subscribe", "params": self._params}))
        elif action is Action.CONFIRM:
            self._pending_params.discard(text.removeprefix("subscribed to: "))
            logger.info("subscription confirmed: %s", text)
            if not self._pending_params:
                next_phase = Phase.STREAMING
                self._streaming_since = now
        elif action is Action.REFUSE_KEY:
            self._fail(
                CloseCode.NORMAL_CLOSURE,
                None,
                AuthError(
                    f"the feed refused the API key ({text or 'auth_failed'}): put a valid key "
                    "in the credential file or the environment and start again"
                ),
            )
        elif action is Action.COOL_DOWN:
            self._cooldown = True
            self._fail(
                CloseCode.NORMAL_CLOSURE,
                None,
                FeedError(
                    f"max_connections: {text or 'another client with this key took over'}; "
                    "stop the other client or use another key"
                ),
            )
        elif action is Action.FAIL:
            self._fail(CloseCode.NORMAL_CLOSURE, f"feed status {status}: {text}")
        else:
            logger.warning("feed status %s: %s", status, text)
        if self.phase is not Phase.CLOSED:
            self.phase = next_phase

    def _send_text(self, message: bytes) -> None:
        # One read may bring a status and the feed's close frame behind it: websockets is then
        # already closing and refuses to send; the close ends the conversation in _process.
        if self._protocol.state is State.OPEN:
            self._protocol.send_text(message)

    def _fail(self, code: int, reason: str | None, error: FeedError | None = None) -> None:
        if error is None:
            error = FeedError(reason or "feed failure")
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(code, "")
        self._close(error)

    def _close(self, error: FeedError | None) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self._error = error

    def _closed_reason(self, what: str) -> str:
        rcvd = self._protocol.close_rcvd
        if rcvd is not None:
            return f"{what} (close code {int(rcvd.code)}: {rcvd.reason or 'no reason'})"
        return what
