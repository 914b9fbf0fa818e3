"""The Massive (Polygon.io) feed protocol, sans-I/O: bytes in, data messages out, bytes to send.

Owns one connection's conversation with the feed over its websocket (websocket.py: the upgrade,
the frames, the keepalive): the feed's own handshake, the subscriptions, each step's deadline,
and which messages are data for the workers. Once streaming, runs of plain data frames pass
through as ``Run`` views of the receive buffer, uncopied. It does no networking and never reads
the clock: the service hands it bytes and ``now``, and takes back the data messages, the bytes
to send and, when the conversation is over, the reason (``outcome``).

The feed's handshake (Massive's websocket documentation)::

    server  [{"ev":"status","status":"connected",...}]        or "success": the greeting
    client  {"action":"auth","params":"<key>"}
    server  [{"ev":"status","status":"auth_success",...}]     auth_failed -> AuthError
    client  {"action":"subscribe","params":"T.*,Q.AAPL"}
    server  [{"ev":"status","status":"success","message":"subscribed to: T.*"}]   per channel
    server  [{"ev":"T","sym":"AAPL",...},...]                  data, until the connection ends

Statuses are taken by meaning (``meaning``), not exact text: the greeting may say ``success``,
the auth reply ``authenticated``, confirmations may differ in case, order or grouping
(subscriptions.py matches them); the first data message also counts as streaming. The
handshake is then a transition table, ``HANDSHAKE``: (phase, meaning) -> (action, next phase),
looked up for the phase, then for ``ANY``; a status found under neither is logged once at INFO
and changes nothing. An ``error`` while subscribing or streaming refuses one channel, never the
connection: it is logged with the feed's message, the other channels stream on, and if all are
refused the connection is kept, saying so. ``max_connections`` (another client with the same
key and cluster took the stream) ends the conversation with a cooldown.

A reload changes the channels on the live connection (``resubscribe``): before the subscribe
message is sent the new list simply replaces the old; after it, the added channels are
subscribed first and the removed ones unsubscribed second, in two messages, so that a change
such as T.AAPL -> T.* misses no AAPL trade in between. The added channels' confirmations are
awaited as at the start (a deadline, then a warning while data flows), refusals are
per channel, and ``unsubscribed to: ...`` answers are logged.

Every step of the handshake has a deadline, ``handshake_timeout`` after the step before it (the
upgrade, the greeting, the auth reply, the confirmations); past it the conversation ends,
saying which step and what was awaited, unless data already flows, which only a missing
confirmation can leave behind: that is logged and the stream goes on. Status events never leave
this module: the splitter hands those found in data frames back through ``receive_status``.

Bad input from the peer never raises: the websocket is failed (a close frame is queued) and
the reason kept, and the service asks for it (``outcome``) and decides at its own pace.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from websockets.exceptions import InvalidURI
from websockets.frames import CloseCode
from websockets.uri import parse_uri

from . import __version__
from .errors import EXCERPT_BYTES, AuthError, FeedError, TradeBalancerError
from .frames import STATUS, STATUS_WINDOW, Run, payloads
from .handshake import AWAITED, Action, Phase, meaning, transition
from .subscriptions import Subscriptions
from .websocket import Message, Websocket

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """How a conversation ended: why, and what that means for the next one."""

    reason: str  # for the log
    error: TradeBalancerError | None  # what ended it; None: we closed it ourselves
    cooldown: bool  # max_connections: wait max_connections_cooldown before reconnecting
    streamed: float  # seconds it streamed (0: it never got there)
    kind: str = "closed"  # why, as a label: feed_closed, handshake_timeout, connect_failed, ...


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
        keep_limit: int = 1 << 19,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
        handshake_timeout: float = 10.0,
    ) -> None:
        try:
            uri = parse_uri(url)
        except InvalidURI as exc:
            raise FeedError(f"invalid feed URL {url!r}: {exc}") from exc
        self.url = url
        self._api_key = api_key
        self.subscriptions = Subscriptions(subscribe)
        self._handshake_timeout = handshake_timeout
        self._deadline: float | None = now + handshake_timeout  # of the step under way
        self._noted: set[str] = set()  # statuses and errors already logged on this connection
        self._websocket = Websocket(
            uri,
            now=now,
            user_agent=f"tradebalancer/{__version__}",
            max_message_size=max_message_size,
            keep_limit=keep_limit,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        self.phase = Phase.UPGRADING
        self._error: FeedError | None = None
        self._kind = ""  # why it ended, as a metrics label (Outcome.kind)
        self._cooldown = False  # after max_connections: reconnect only after a long wait
        self._streaming_since: float | None = None
        self._messages: list[Message] = []
        self._paused = False  # the service stopped reading (backpressure): no pong can arrive

    # -- input -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """Feed bytes read from the transport; data messages become available.

        Plain data frames come out as ``Run`` views of ``data``, valid until the caller's next
        read, which must first ``keep`` the frame its last read cut (websocket.py).
        """
        if self.phase is not Phase.CLOSED:
            self._receive(self._websocket.receive_data(data), now)

    def keep(self, buffer: memoryview) -> int:
        """Put the frame the last read cut at the front of ``buffer``, for the next read to go
        behind it; return its size."""
        return self._websocket.keep(buffer)

    def receive_eof(self, now: float) -> None:
        """The transport reached end of file (TCP FIN or TLS close_notify)."""
        if self.phase is not Phase.CLOSED:
            self._receive(self._websocket.receive_eof(), now)

    def receive_status(self, event: bytes, now: float) -> None:
        """Handle one status event (a JSON object) that arrived inside a data frame."""
        try:
            parsed = orjson.loads(event)
        except orjson.JSONDecodeError:
            logger.warning("ignored malformed status event: %r", event[:EXCERPT_BYTES])
            return
        if isinstance(parsed, dict):
            self._handle_status(parsed, now)

    def resubscribe(
        self, channels: Sequence[str], now: float
    ) -> tuple[list[str], list[str]] | None:
        """Change the subscriptions to ``channels``; return (added, removed) as sent, or None
        when nothing is sent: before the handshake reaches the subscription (which will carry
        the new list whole), and once the conversation is over."""
        if self.phase is Phase.CLOSED:
            return None
        if self.phase in (Phase.UPGRADING, Phase.CONNECTING, Phase.AUTHENTICATING):
            self.subscriptions = Subscriptions(channels)
            return None
        added, removed = self.subscriptions.change(channels)
        if added:
            logger.info("subscribing to %s", ",".join(added))
            self._send_text(orjson.dumps({"action": "subscribe", "params": ",".join(added)}))
            self._deadline = now + self._handshake_timeout  # for their confirmations
        if removed:
            logger.info("unsubscribing from %s", ",".join(removed))
            self._send_text(orjson.dumps({"action": "unsubscribe", "params": ",".join(removed)}))
        if self.subscriptions.settled:
            self._deadline = None  # the channels still awaited were all removed
            if self.phase is Phase.SUBSCRIBING and self.subscriptions.confirmed:
                self._start_streaming(now)
        return added, removed

    # -- output ------------------------------------------------------------------------------

    def messages_received(self) -> list[bytes | Run]:
        """Return the data messages (JSON arrays) completed since the last call: each one's
        bytes, or runs of plain data frames whose payloads are messages (frames.py)."""
        messages, self._messages = self._messages, []
        return messages

    def data_to_send(self) -> list[bytes]:
        """Return the bytes to write to the transport, in order; b"" asks for a half-close."""
        return self._websocket.data_to_send()

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
        return Outcome(reason, error, self._cooldown, self.streamed(now), self._kind)

    def pause(self, paused: bool) -> None:
        """The service stopped (or went back to) reading the socket: pongs cannot arrive."""
        self._paused = paused

    # -- time --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Run the timers: the handshake step's deadline, then the keepalive."""
        if self.phase is Phase.CLOSED:
            return
        if self._deadline is not None and now >= self._deadline:
            self._step_late(now)
            if self.closed:
                return
        if (dead := self._websocket.keepalive(now, self._paused)) is not None:
            self._fail(CloseCode.INTERNAL_ERROR, dead, kind="ping_timeout")

    def next_deadline(self) -> float | None:
        """Return when ``tick`` next has something to do, or None."""
        if self.phase is Phase.CLOSED:
            return None
        keepalive = self._websocket.keepalive_deadline()
        times = [t for t in (self._deadline, keepalive) if t is not None]
        return min(times) if times else None

    def refused(self) -> dict[str, str]:
        """The channels the feed refused on this connection, with its messages."""
        return dict(self.subscriptions.refused)

    def close(self) -> None:
        """Start a clean websocket close (going away), e.g. on shutdown."""
        self._websocket.send_close(CloseCode.GOING_AWAY, "client shutting down")
        self._close(None, "closed")

    # -- internals ---------------------------------------------------------------------------

    def _receive(self, messages: list[Message], now: float) -> None:
        websocket = self._websocket
        if self.phase is Phase.UPGRADING and websocket.upgraded:
            self.phase = Phase.CONNECTING
            self._deadline = now + self._handshake_timeout
            logger.debug("websocket open to %s", self.url)
        for message in messages:
            if isinstance(message, bytes):
                self._receive_message(message, now)
            elif self._streaming_since is not None:
                self._messages.append(message)  # the hot path: the receive buffer, uncopied
            else:  # before the stream, each message is looked at
                for payload in payloads(message.view):
                    self._receive_message(bytes(payload), now)
            if self.phase is Phase.CLOSED:
                return
        if (ended := websocket.ended) is not None:
            self._close(ended.error, ended.kind)

    def _receive_message(self, message: bytes, now: float) -> None:
        # Status messages are small and say so in their first bytes, in whatever layout; a data
        # frame is only looked at that far (the splitter finds any status among its events).
        if STATUS in message[:STATUS_WINDOW]:
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
        if self._streaming_since is None and self.phase is Phase.SUBSCRIBING:
            self._start_streaming(now)  # data flows: the feed took the subscription

    def _handle_status(self, event: dict[str, object], now: float) -> None:
        status = event.get("status")
        text = str(event.get("message", ""))
        action, next_phase = transition(self.phase, meaning(self.phase, status, text))
        if action is Action.AUTHENTICATE:
            logger.info("connected to %s; authenticating", self.url)
            self._send_text(orjson.dumps({"action": "auth", "params": self._api_key}))
        elif action is Action.SUBSCRIBE:
            logger.info("authenticated; subscribing to %s", self.subscriptions.params)
            self._send_text(
                orjson.dumps({"action": "subscribe", "params": self.subscriptions.params})
            )
        elif action is Action.CONFIRM:
            for channel in self.subscriptions.confirm(text):
                logger.info("subscription confirmed: %s", channel)
        elif action is Action.UNSUBSCRIBED:
            for channel in self.subscriptions.unsubscribed(text):
                logger.info("unsubscribed from %s", channel)
        elif action is Action.REFUSE_CHANNEL:
            self._refuse_channel(text)
        elif action is Action.REFUSE_KEY:
            self._fail(
                CloseCode.NORMAL_CLOSURE,
                None,
                AuthError(
                    f"the feed refused the API key ({text or 'auth_failed'}): put a valid key "
                    "in the credential file or the environment and start again"
                ),
                "auth_failed",
            )
        elif action is Action.COOL_DOWN:
            self._cooldown = True
            self._fail(
                CloseCode.NORMAL_CLOSURE,
                None,
                FeedError(
                    f"max_connections ({text or 'maximum number of connections exceeded'}): "
                    "another client with the same API key connected to this cluster and took "
                    "the stream (the feed allows one connection per key and cluster); stop the "
                    "other client or give this feed a key of its own"
                ),
                "max_connections",
            )
        elif action is Action.FAIL:
            self._fail(CloseCode.NORMAL_CLOSURE, f"feed status {status}: {text}")
        elif f"status {status}" not in self._noted:
            self._noted.add(f"status {status}")
            logger.info("feed status %s: %s", status, text)
        if self.phase is Phase.CLOSED:
            return
        if next_phase is not self.phase:
            self.phase = next_phase
            self._deadline = now + self._handshake_timeout
        if self.subscriptions.settled:
            if self.phase is Phase.STREAMING:
                self._deadline = None  # the last confirmations came after the first data
            elif self.phase is Phase.SUBSCRIBING and self.subscriptions.confirmed:
                self._start_streaming(now)
            elif self.phase is Phase.SUBSCRIBING:
                self._deadline = None  # all refused: nothing to wait for (and no tight loop)

    def _refuse_channel(self, text: str) -> None:
        """An error while subscribing or streaming: one channel refused, or logged as it is."""
        subscriptions = self.subscriptions
        channel = subscriptions.refuse(text)
        if channel is None:
            if f"error {text}" not in self._noted:
                self._noted.add(f"error {text}")
                logger.error("the feed reported an error: %s; streaming goes on", text)
            return
        logger.error(
            "the feed refused the subscription to %s: %s; the other channels go on", channel, text
        )
        if subscriptions.all_refused:
            logger.error(
                "the feed refused every channel (%s): nothing will stream on this connection; "
                "check that your plan includes them, or change the feed's subscribe key",
                subscriptions.params,
            )

    def _start_streaming(self, now: float) -> None:
        self.phase = Phase.STREAMING
        if self._streaming_since is None:
            self._streaming_since = now
        if self.subscriptions.settled:
            self._deadline = None
        # else: the confirmations still missing have until the deadline, then are reported

    def _step_late(self, now: float) -> None:
        """The step under way missed its deadline: end the conversation, saying which step."""
        self._deadline = None
        pending = ", ".join(self.subscriptions.pending)
        if self.phase is Phase.STREAMING:  # only confirmations can be late while data flows
            logger.warning(
                "no confirmation of %s within %g s (handshake_timeout); data flows, going on",
                pending,
                self._handshake_timeout,
            )
            return
        awaited = AWAITED.get(self.phase, self.phase.value)
        if self.phase is Phase.SUBSCRIBING:
            awaited = f"{awaited} (waiting for {pending})"
        self._fail(
            CloseCode.POLICY_VIOLATION,
            f"{awaited} did not come within {self._handshake_timeout:g} s (handshake_timeout) "
            f"while {self.phase.value}: the feed, or a proxy in between, does not answer",
            kind="handshake_timeout",
        )

    def _send_text(self, message: bytes) -> None:
        self._websocket.send_text(message)

    def _fail(
        self,
        code: int,
        reason: str | None,
        error: FeedError | None = None,
        kind: str = "feed_error",
    ) -> None:
        if error is None:
            error = FeedError(reason or "feed failure")
        self._websocket.send_close(code)
        self._close(error, kind)

    def _close(self, error: FeedError | None, kind: str) -> None:
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.CLOSED
            self._error = error
            self._kind = kind
