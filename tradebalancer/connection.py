"""One connection to the feed, from the connect to the close: transport and protocol together.

Owns one attempt: the Connector while the connection opens (transport/), then the Transport and
the Feed over it (feed.py): moving bytes between them, receiving a batch into the caller's
buffer, sending what the protocol queues, and, whatever ends the attempt (a refused connect, a
broken socket, the feed closing, a protocol error), one ``Outcome`` that says why. Must not
touch: the pipes, the workers, the reconnect policy; the service asks ``outcome()`` once a turn
and decides there whether and when to connect again.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
from collections.abc import Callable

from .config import FeedConfig
from .errors import TradeBalancerError, TransportError
from .feed import Feed, Outcome
from .frames import Run
from .transport import Connector, Transport

__all__ = ["FeedConnection", "Outcome"]

logger = logging.getLogger(__name__)


# The forwarder's method: messages in, the status events found among them out.
Forward = Callable[[list[bytes | Run], float], list[bytes]]


class FeedConnection:
    """One attempt at the feed: connecting, then open, then over (``outcome`` says why)."""

    def __init__(self, config: FeedConfig, api_key: str, now: float, *, paused: bool) -> None:
        self.config = config
        self._api_key = api_key
        self._paused = paused
        self.transport: Transport | None = None
        self.feed: Feed | None = None
        self._failure: TradeBalancerError | None = None  # ended it before the feed's own end
        self._hung_up = False  # the peer's FIN or reset was noticed while paused
        self.received_bytes = 0  # plaintext read from the transport
        self.tls = "-"  # "kernel", "user", "kernel tx/user rx", "none" once connected
        self.fallback_reason: str | None = None
        logger.debug("connecting to %s:%d", config.host, config.port)
        self._connector: Connector | None = Connector(
            config.host,
            config.port,
            tls=config.secure,
            tls_mode=config.tls,
            ca_file=config.ca_file,
            server_hostname=config.server_hostname,
            timeout=config.connect_timeout,
            now=now,
        )
        self._step_connector(now)

    # -- what the loop polls ---------------------------------------------------------------

    @property
    def state(self) -> str:
        """The attempt's state: connecting, connected (handshake), streaming, refused (all), or
        closing (the feed hung up while reading was paused)."""
        feed = self.feed
        if feed is None:
            return "connecting"
        if self._hung_up:
            return "closing"
        if feed.streaming:
            return "streaming"
        return "refused" if feed.subscriptions.all_refused else "connected"

    def refused_channels(self) -> tuple[str, ...]:
        """The channels the feed refused on this connection."""
        return tuple(self.feed.refused()) if self.feed is not None else ()

    def pollable(self) -> socket.socket | None:
        """The socket to poll; None once the attempt is over.

        A new object whenever the connect moves on (lookup, then each address in turn, then
        the transport), which may well carry the number of the one it replaces.
        """
        if self._connector is not None:
            return self._connector.pollable()
        return self.transport.pollable() if self.transport is not None else None

    def events(self) -> int:
        """What ``pollable()`` must be polled for now (0: nothing, e.g. reading is paused)."""
        if self._failure is not None:
            return 0
        if self._connector is not None:
            return self._connector.events()
        assert self.transport is not None
        mask = 0 if self._paused else selectors.EVENT_READ
        return mask | (selectors.EVENT_WRITE if self.transport.wants_write() else 0)

    def watches_hangup(self) -> bool:
        """Whether to be told of the peer's hang-up: while paused, until it was noticed once."""
        return self._paused and self.transport is not None and not self._hung_up

    def hung_up(self, now: float) -> None:
        """The peer closed or reset the connection while reading is paused (backpressure).

        What it sent before stays in the socket (a reset too: Linux hands queued data out
        before the error) and is read, exactly once, when the workers catch up and reading
        resumes; the attempt ends there, at the end of the stream. Noticed and said now.
        """
        transport = self.transport
        if transport is None or self._hung_up:
            return
        self._hung_up = True
        how = "reset" if transport.pending_error() is not None else "closed"
        logger.warning(
            "the feed %s the connection while reading was paused (backpressure): what it sent "
            "before is read once the workers catch up, then the balancer reconnects",
            how,
        )

    def deadline(self) -> float | None:
        """When ``tick`` has something to do (a connect timeout, a ping), or None."""
        if self._connector is not None:
            return self._connector.deadline
        return self.feed.next_deadline() if self.feed is not None else None

    # -- what the loop does when the fd is ready, or at the deadline -----------------------

    def writable(self, now: float) -> None:
        """The socket can take more: flush what is queued (or step the connect)."""
        if self._connector is not None:
            self._step_connector(now)
        elif self.transport is not None and self._failure is None:
            try:
                self.transport.flush()
            except TransportError as exc:
                self._fail(exc)

    def receive(self, buffer: memoryview, now: float, forward: Forward) -> bool:
        """Read once into ``buffer`` and hand the messages it completed to ``forward``.

        One read is one batch. The status events ``forward`` finds inside data frames come
        back here and go to the feed. Returns whether another read may bring more: only when
        this one filled the buffer, or reached the end of the stream (which the next read
        returns).
        """
        if self._connector is not None:
            self._step_connector(now)
            return False
        transport, feed = self.transport, self.feed
        assert transport is not None and feed is not None
        if self._failure is not None:
            return False
        again = False
        kept = feed.keep(buffer)  # a frame the last read cut: this read completes it in place
        space = len(buffer) - kept
        try:
            count = transport.receive_into(buffer[kept:])
        except BlockingIOError:
            return False
        except TransportError as exc:
            self._fail(exc)
        else:
            if count == 0:
                feed.receive_eof(now)
            else:
                self.received_bytes += count
                feed.receive_data(buffer[: kept + count], now)
                # A read that left space found the socket drained (user-space TLS reads on
                # until the socket has nothing): the poll, not one more read, says when more
                # is there. The read that would say EAGAIN cost a system call and an exception
                # a wake-up. But a close_notify read behind the data leaves the poll nothing
                # to signal: the next read returns the end of the stream at once.
                again = (count == space or transport.at_eof) and not feed.closed
        messages = feed.messages_received()
        if messages:
            for event in forward(messages, now):
                feed.receive_status(event, now)
        self.send_pending()  # pongs, close replies, answers to status events
        return again

    def tick(self, now: float) -> None:
        """Run the timers: the connect timeout, or the feed's keepalive."""
        if self._connector is not None:
            if now >= self._connector.deadline:
                self._step_connector(now)  # it says it timed out, and in which phase
        elif self.feed is not None:
            self.feed.tick(now)
            self.send_pending()

    def pause(self, paused: bool) -> None:
        """Stop (or go back to) reading the socket: backpressure from the pipes."""
        self._paused = paused
        if self.feed is not None:
            self.feed.pause(paused)

    def resubscribe(self, config: FeedConfig, now: float) -> tuple[list[str], list[str]] | None:
        """Take a reloaded ``config``'s subscriptions on this connection: (added, removed) as
        sent to the feed, or None if the new list is to be sent whole (or never: it is over)."""
        self.config = config
        if self.feed is None:
            return None
        changed = self.feed.resubscribe(config.subscribe, now)
        self.send_pending()
        return changed

    def send_pending(self) -> None:
        """Hand what the protocol queued to the transport."""
        feed, transport = self.feed, self.transport
        if feed is None or transport is None or self._failure is not None:
            return
        try:
            for data in feed.data_to_send():
                if data:  # b"" asks for a half-close: the socket is closed as a whole instead
                    transport.send(data)
        except TransportError as exc:  # the peer went away (EPIPE, ECONNRESET)
            self._fail(exc)

    # -- the end ---------------------------------------------------------------------------

    def outcome(self, now: float) -> Outcome | None:
        """None while the attempt goes on; why it is over once it is."""
        failure, feed = self._failure, self.feed
        if failure is not None:
            reason = str(failure) if feed is not None else f"cannot connect: {failure}"
            streamed = feed.streamed(now) if feed is not None else 0.0
            kind = "connection_lost" if feed is not None else "connect_failed"
            return Outcome(reason, failure, False, streamed, kind)
        return feed.outcome(now) if feed is not None else None

    def close(self) -> None:
        """End the attempt: a close frame if the socket still takes it, then the socket."""
        if self._connector is not None:
            self._connector.close()
            self._connector = None
        feed, transport = self.feed, self.transport
        if transport is None:
            return
        if feed is not None:
            feed.close()
            # A peer that is gone already (EPIPE, ECONNRESET) is what we are closing on.
            with contextlib.suppress(TransportError):
                for data in feed.data_to_send():
                    if data:
                        transport.send(data)
        transport.close()

    # -- internals ---------------------------------------------------------------------------

    def _step_connector(self, now: float) -> None:
        connector = self._connector
        assert connector is not None
        try:
            transport = connector.step(now)
        except TransportError as exc:  # KernelTLSUnavailable included: the service decides
            self._connector = None
            self._failure = exc
            return
        if transport is not None:
            self._connector = None
            self._open(transport, now)

    def _open(self, transport: Transport, now: float) -> None:
        config = self.config
        self.transport = transport
        tx, rx = str(transport.tx_mode), str(transport.rx_mode)
        self.tls = tx if tx == rx else f"{tx} tx/{rx} rx"
        self.fallback_reason = transport.fallback_reason
        logger.info("connected to %s (TLS: %s)", transport.address, self.tls)
        self.feed = Feed(
            config.url,
            self._api_key,
            config.subscribe,
            now=now,
            max_message_size=config.max_message_size,
            keep_limit=config.batch_bytes // 2,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            handshake_timeout=config.handshake_timeout,
        )
        self.feed.pause(self._paused)
        self.send_pending()

    def _fail(self, exc: TradeBalancerError) -> None:
        if self._failure is None:
            self._failure = exc
