"""The feed protocol, sans-I/O, against websockets' own server protocol as the peer."""

from __future__ import annotations

import orjson
import pytest
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from tradebalancer.errors import AuthError, FeedError
from tradebalancer.feed import Feed, Outcome
from tradebalancer.frames import messages
from tradebalancer.handshake import ANY, HANDSHAKE, Action, Meaning, Phase, meaning, transition

URL = "wss://socket.example.test/stocks"
CONNECTED = b'[{"ev":"status","status":"connected","message":"Connected Successfully"}]'
AUTH_OK = b'[{"ev":"status","status":"auth_success","message":"authenticated"}]'
AUTH_FAILED = b'[{"ev":"status","status":"auth_failed","message":"authentication failed"}]'
TRADES = b'[{"ev":"T","sym":"AAPL","p":1.5,"s":10},{"ev":"T","sym":"MSFT","p":2.5,"s":20}]'


def subscribed(param: str) -> bytes:
    return orjson.dumps(
        [{"ev": "status", "status": "success", "message": f"subscribed to: {param}"}]
    )


class Peer:
    """A websocket server speaking to a Feed through memory, byte for byte."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.server = ServerProtocol(max_size=None)
        self.received: list[bytes] = []
        self.pings: list[bytes] = []
        self.pongs: list[bytes] = []
        for data in feed.data_to_send():
            self.server.receive_data(data)
        events = self.server.events_received()
        assert isinstance(events[0], Request)
        self.server.send_response(self.server.accept(events[0]))
        self.deliver(0.0)

    def pump(self, now: float) -> None:
        """Move the feed's output to the server and collect what the server got."""
        for data in self.feed.data_to_send():
            if data:
                self.server.receive_data(data)
            else:
                self.server.receive_eof()
        for event in self.server.events_received():
            if isinstance(event, Request):
                continue
            if event.opcode is Opcode.TEXT:
                self.received.append(event.data)
            elif event.opcode is Opcode.PING:
                self.pings.append(event.data)
            elif event.opcode is Opcode.PONG:
                self.pongs.append(event.data)

    def deliver(self, now: float) -> None:
        """Move the server's output to the feed, then answer."""
        for data in self.server.data_to_send():
            if data:
                self.feed.receive_data(data, now)
        self.pump(now)

    def send(self, message: bytes, now: float = 0.0) -> None:
        self.server.send_text(message)
        self.deliver(now)


def handshake(feed: Feed, params: list[str]) -> Peer:
    peer = Peer(feed)
    peer.send(CONNECTED)
    peer.send(AUTH_OK)
    for param in params:
        peer.send(subscribed(param))
    return peer


def ended(feed: Feed) -> Outcome:
    """How the feed's conversation ended (it must have)."""
    outcome = feed.outcome(0.0)
    assert outcome is not None, f"the feed is still {feed.phase}"
    return outcome


def new_feed(**kwargs: object) -> Feed:
    options: dict[str, object] = {"now": 0.0, "ping_interval": 10.0, "ping_timeout": 5.0}
    options.update(kwargs)
    return Feed(URL, "sekrit-key", ["T.*", "Q.AAPL"], **options)  # type: ignore[arg-type]


def test_handshake_sends_auth_then_subscribe_and_reaches_streaming() -> None:
    """The feed authenticates on 'connected', subscribes on 'auth_success', streams on 'success'."""
    feed = new_feed()
    peer = Peer(feed)
    assert feed.phase is Phase.CONNECTING
    peer.send(CONNECTED)
    assert orjson.loads(peer.received[-1]) == {"action": "auth", "params": "sekrit-key"}
    assert feed.phase is Phase.AUTHENTICATING
    peer.send(AUTH_OK)
    assert orjson.loads(peer.received[-1]) == {"action": "subscribe", "params": "T.*,Q.AAPL"}
    peer.send(subscribed("T.*"), now=3.0)
    assert feed.phase is Phase.SUBSCRIBING
    peer.send(subscribed("Q.AAPL"), now=4.0)
    assert feed.phase is Phase.STREAMING
    assert feed.streaming and feed.streamed(10.0) == 6.0


def test_data_frames_come_out_byte_for_byte_and_status_frames_never_do() -> None:
    """Data messages are returned exactly as received; status messages are consumed."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    peer.send(TRADES)
    peer.send(b'[{"ev":"status","status":"info","message":"hello"}]')
    assert messages(feed.messages_received()) == [TRADES]
    assert messages(feed.messages_received()) == []


def test_fragmented_and_binary_messages_are_reassembled() -> None:
    """A message split over continuation frames, or sent as binary, arrives whole."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    peer.server.send_text(TRADES[:10], fin=False)
    peer.server.send_continuation(TRADES[10:30], fin=False)
    peer.server.send_continuation(TRADES[30:], fin=True)
    peer.server.send_binary(TRADES)
    peer.deliver(0.0)
    assert messages(feed.messages_received()) == [TRADES, TRADES]


def test_bytes_delivered_one_at_a_time_give_the_same_messages() -> None:
    """Receive boundaries do not matter: a byte at a time gives the same messages."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    peer.server.send_text(TRADES)
    peer.server.send_text(TRADES[::-1])
    wire = b"".join(peer.server.data_to_send())
    for index in range(len(wire)):
        feed.receive_data(wire[index : index + 1], 0.0)
    assert messages(feed.messages_received()) == [TRADES, TRADES[::-1]]


def test_auth_failed_ends_with_an_auth_error_and_a_close_frame() -> None:
    """auth_failed closes the conversation with AuthError, so the service does not retry."""
    feed = new_feed()
    peer = Peer(feed)
    peer.send(CONNECTED)
    peer.send(AUTH_FAILED)
    assert feed.closed
    assert isinstance(ended(feed).error, AuthError)
    assert "sekrit" not in str(ended(feed).error)
    assert peer.server.close_rcvd is not None


def test_max_connections_sets_the_cooldown_flag() -> None:
    """max_connections is an error that asks for a long cooldown before reconnecting."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    peer.send(b'[{"ev":"status","status":"max_connections","message":"Maximum number"}]')
    assert feed.closed and ended(feed).cooldown
    assert isinstance(ended(feed).error, FeedError) and "max_connections" in str(ended(feed).error)


def test_server_ping_is_answered_with_a_pong() -> None:
    """A ping from the server gets a pong with the same payload (RFC 6455 5.5.2)."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    peer.server.send_ping(b"abcd")
    peer.deliver(0.0)
    assert peer.pongs == [b"abcd"]


def test_keepalive_pings_and_gives_up_when_no_pong_comes() -> None:
    """The client pings each interval, and a missing pong past the timeout ends the conversation."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    assert feed.next_deadline() == 10.0
    feed.tick(10.0)
    peer.pump(10.0)
    assert len(peer.pings) == 1
    feed.tick(14.9)
    assert not feed.closed
    feed.tick(15.0)
    assert feed.closed
    assert isinstance(ended(feed).error, FeedError) and "pong" in str(ended(feed).error)


def test_a_pong_clears_the_keepalive() -> None:
    """The peer's pong (sent automatically by its protocol) keeps the connection alive."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    feed.tick(10.0)
    peer.pump(10.0)
    peer.deliver(11.0)  # the server protocol answered the ping with a pong
    feed.tick(16.0)
    assert not feed.closed
    assert feed.next_deadline() == 20.0


def test_paused_reading_does_not_count_against_the_pong_timeout() -> None:
    """While the service does not read (backpressure) a late pong is not the peer's fault."""
    feed = new_feed()
    handshake(feed, ["T.*", "Q.AAPL"])
    feed.tick(10.0)
    feed.pause(True)
    feed.tick(30.0)
    assert not feed.closed


def test_close_frame_from_the_server_ends_the_conversation_with_its_reason() -> None:
    """A close frame from the feed ends the conversation and the error quotes the close code."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    peer.server.send_close(1001, "maintenance")
    peer.deliver(0.0)
    assert feed.closed
    assert "1001" in str(ended(feed).error) and "maintenance" in str(ended(feed).error)


@pytest.mark.parametrize("status", [CONNECTED, AUTH_OK], ids=["connected", "auth_success"])
def test_a_status_and_a_close_frame_read_at_once_end_the_conversation(status: bytes) -> None:
    """A handshake status with the feed's close frame behind it in one read sends no reply."""
    feed = new_feed()
    peer = Peer(feed)
    if status == AUTH_OK:
        peer.send(CONNECTED)
    sent = len(peer.received)
    peer.server.send_text(status)
    peer.server.send_close(1000, "end of replay")
    feed.receive_data(b"".join(peer.server.data_to_send()), 0.0)  # websockets is now CLOSING
    assert feed.closed
    assert "1000" in str(ended(feed).error) and "end of replay" in str(ended(feed).error)
    peer.pump(0.0)
    assert len(peer.received) == sent  # neither auth nor subscribe followed the close


def test_eof_mid_frame_loses_only_the_incomplete_message() -> None:
    """Complete messages before an EOF are kept; the partial one is never returned."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    peer.server.send_text(TRADES)
    peer.server.send_text(TRADES)
    wire = b"".join(peer.server.data_to_send())
    feed.receive_data(wire[: len(wire) - 5], 0.0)
    feed.receive_eof(0.0)
    assert messages(feed.messages_received()) == [TRADES]
    assert feed.closed and "in the middle of a message" in str(ended(feed).error)


def test_garbage_from_the_server_fails_the_connection_without_raising() -> None:
    """Bytes that are not websocket frames end the conversation with a FeedError."""
    feed = new_feed()
    handshake(feed, ["T.*", "Q.AAPL"])
    feed.receive_data(b"\x8f\x05hello", 0.0)  # reserved opcode 0xF
    assert feed.closed
    assert isinstance(ended(feed).error, FeedError)


def test_refused_upgrade_is_reported() -> None:
    """An HTTP error instead of 101 ends the conversation with the status in the message."""
    feed = new_feed()
    server = ServerProtocol()
    for data in feed.data_to_send():
        server.receive_data(data)
    request = server.events_received()[0]
    assert isinstance(request, Request)
    server.send_response(server.reject(403, "Forbidden\n"))
    for data in server.data_to_send():
        if data:
            feed.receive_data(data, 0.0)
    assert feed.closed
    assert "403" in str(ended(feed).error)


def test_message_size_limit_is_raised_past_websockets_default() -> None:
    """A 2 MiB message passes (websockets' default limit is 1 MiB)."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    big = b"[" + b",".join([b'{"ev":"T","sym":"X","pad":"' + b"x" * 1000 + b'"}'] * 2000) + b"]"
    assert len(big) > (2 << 20) - 100_000
    peer.send(big)
    assert messages(feed.messages_received()) == [big]


def test_status_events_from_mixed_frames_are_handled() -> None:
    """A status event found by the splitter inside a data frame is handled like any other."""
    feed = new_feed()
    handshake(feed, ["T.*", "Q.AAPL"])
    feed.receive_status(b'{"ev":"status","status":"max_connections","message":"x"}', 0.0)
    assert feed.closed and ended(feed).cooldown


@pytest.mark.parametrize("url", ["http://x", "not a url", "wss://"])
def test_invalid_url_is_a_feed_error(url: str) -> None:
    """A URL the websocket client cannot use is refused with a clear error."""
    with pytest.raises(FeedError, match="invalid feed URL"):
        Feed(url, "k", ["T.*"], now=0.0)


# -- the handshake, driven by its own table ---------------------------------------------------

# The status events a feed may send, in the words Massive and its older versions used.
STATUS_EVENTS = [
    ("connected", "Connected Successfully"),
    ("success", "Connected Successfully"),
    ("auth_success", "authenticated"),
    ("authenticated", "authenticated"),
    ("success", "authenticated"),
    ("success", "subscribed to: T.*"),
    ("success", "Subscribed to: t.*"),
    ("auth_failed", "authentication failed"),
    ("max_connections", "Maximum number of websocket connections exceeded"),
    ("error", "something broke"),
    ("auth_timeout", "authentication timed out"),
    ("info", "just so you know"),
]


def feed_in(phase: Phase) -> tuple[Feed, Peer]:
    """A feed on one channel, T.*, whose conversation stands at ``phase``."""
    feed = Feed(URL, "sekrit-key", ["T.*"], now=0.0)
    peer = Peer(feed)
    steps = {
        Phase.CONNECTING: [],
        Phase.AUTHENTICATING: [CONNECTED],
        Phase.SUBSCRIBING: [CONNECTED, AUTH_OK],
        Phase.STREAMING: [CONNECTED, AUTH_OK, subscribed("T.*")],
    }[phase]
    for message in steps:
        peer.send(message)
    assert feed.phase is phase
    return feed, peer


SENT_BY = {
    Action.AUTHENTICATE: {"action": "auth", "params": "sekrit-key"},
    Action.SUBSCRIBE: {"action": "subscribe", "params": "T.*"},
}


@pytest.mark.parametrize(
    ("phase", "status", "message"),
    [
        (phase, status, message)
        for phase in (Phase.CONNECTING, Phase.AUTHENTICATING, Phase.SUBSCRIBING, Phase.STREAMING)
        for status, message in STATUS_EVENTS
    ],
)
def test_every_status_in_every_phase_does_what_the_table_says(
    phase: Phase, status: str, message: str
) -> None:
    """Each (phase, status): its meaning's action in the table is taken, its next phase reached."""
    meant = meaning(phase, status, message)
    action, expected = transition(phase, meant)
    row = HANDSHAKE.get((phase, meant)) or HANDSHAKE.get((ANY, meant))
    assert (action, expected) == (row if row is not None else (Action.NOTE, phase))
    feed, peer = feed_in(phase)
    sent_before = len(peer.received)
    peer.send(orjson.dumps([{"ev": "status", "status": status, "message": message}]), 7.0)
    sent = [orjson.loads(data) for data in peer.received[sent_before:]]
    assert sent == ([SENT_BY[action]] if action in SENT_BY else [])
    outcome = feed.outcome(7.0)
    if expected is Phase.CLOSED:
        assert feed.phase is Phase.CLOSED
        assert outcome is not None and outcome.error is not None
        assert isinstance(outcome.error, AuthError) == (action is Action.REFUSE_KEY)
        assert outcome.cooldown == (action is Action.COOL_DOWN)
        assert message in outcome.reason
        return
    assert outcome is None
    if action is Action.CONFIRM and phase is Phase.SUBSCRIBING:  # the one channel: streaming
        assert feed.phase is Phase.STREAMING and feed.streamed(10.0) == 3.0
    else:
        assert feed.phase is expected
    if action is Action.REFUSE_CHANNEL and phase is Phase.SUBSCRIBING:
        assert feed.refused() == {"T.*": message}  # the one channel waiting


@pytest.mark.parametrize(
    ("phase", "status", "message", "meant"),
    [
        (Phase.CONNECTING, "connected", "Connected Successfully", Meaning.GREETING),
        (Phase.CONNECTING, "success", "Connected Successfully", Meaning.GREETING),
        (Phase.AUTHENTICATING, "success", "authenticated", Meaning.AUTH_OK),
        (Phase.AUTHENTICATING, "authenticated", "", Meaning.AUTH_OK),
        (Phase.AUTHENTICATING, "auth_success", "authenticated", Meaning.AUTH_OK),
        (Phase.SUBSCRIBING, "success", "subscribed to: T.*,Q.AAPL", Meaning.CONFIRMED),
        (Phase.STREAMING, "success", "SUBSCRIBED TO: q.aapl", Meaning.CONFIRMED),
        (Phase.STREAMING, "success", "unsubscribed to: T.*", Meaning.UNSUBSCRIBED),
        (Phase.STREAMING, "error", "not authorized: LULD.*", Meaning.ERROR),
        (Phase.STREAMING, "bonjour", "", Meaning.OTHER),
        (Phase.STREAMING, 7, "", Meaning.OTHER),
    ],
)
def test_statuses_are_taken_by_meaning(
    phase: Phase, status: object, message: str, meant: Meaning
) -> None:
    """The greeting, the auth reply and confirmations are recognised in their variants."""
    assert meaning(phase, status, message) is meant


def test_a_status_message_in_any_layout_is_a_status_not_data() -> None:
    """A confirmation written with spaces (json.dumps' style) is taken as such, not as data."""
    feed = new_feed()
    peer = handshake(feed, [])
    spaced = b'[{"ev": "status", "status": "success", "message": "subscribed to: T.*"}]'
    peer.send(spaced, 3.0)
    peer.send(subscribed("Q.AAPL"), 4.0)
    assert messages(feed.messages_received()) == []
    assert feed.phase is Phase.STREAMING and feed.streamed(5.0) == 1.0


def test_a_confirmation_after_the_first_data_ends_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Data before the confirmations starts the stream; the late confirmation ends the wait.

    The deadline used to stay, and fire with "no confirmation of" nothing.
    """
    feed = new_feed(handshake_timeout=2.0)
    peer = handshake(feed, [])
    peer.send(TRADES, 3.0)
    assert feed.phase is Phase.STREAMING and feed.next_deadline() == 2.0  # since the subscribe
    peer.send(subscribed("T.*"), 3.5)
    peer.send(subscribed("Q.AAPL"), 3.6)
    assert feed.next_deadline() == 10.0  # the keepalive alone
    feed.tick(9.0)
    assert "no confirmation" not in caplog.text


def test_eof_between_frames_says_no_close_frame_came() -> None:
    """An end of stream after whole messages is "without a close frame", not a cut message."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    peer.send(TRADES)
    feed.receive_eof(0.0)
    assert messages(feed.messages_received()) == [TRADES]
    assert "the feed closed the connection without a close frame" in str(ended(feed).error)
