"""The websocket under the feed, sans-I/O, against websockets' own server protocol as the peer."""

from __future__ import annotations

import pytest
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from tradebalancer.frames import Run, messages
from tradebalancer.websocket import Websocket

TRADES = b'[{"ev":"T","sym":"AAPL","p":1.5,"s":10}]'
QUOTES = b'[{"ev":"Q","sym":"MSFT","bp":2.5,"bs":20}]'
STATUS = b'[{"ev":"status","status":"connected","message":"Connected Successfully"}]'


def open_websocket(now: float = 0.0, **options: float) -> tuple[Websocket, ServerProtocol]:
    """A websocket upgraded by a real server protocol; what the server sends is left unread."""
    websocket = Websocket(
        parse_uri("wss://socket.example.test/stocks"),
        now=now,
        user_agent="tradebalancer/test",
        max_message_size=1 << 20,
        keep_limit=1 << 16,
        ping_interval=options.get("ping_interval", 20.0),
        ping_timeout=options.get("ping_timeout", 20.0),
    )
    server = ServerProtocol(max_size=None)
    for data in websocket.data_to_send():
        server.receive_data(data)
    request = server.events_received()[0]
    assert isinstance(request, Request)
    assert request.headers["User-Agent"] == "tradebalancer/test"
    server.send_response(server.accept(request))
    assert websocket.receive_data(b"".join(server.data_to_send())) == []
    assert websocket.upgraded
    return websocket, server


def sent(server: ServerProtocol) -> bytes:
    return b"".join(server.data_to_send())


def test_plain_data_frames_come_out_as_one_run_of_the_read_buffer() -> None:
    """Two plain frames read at once are one Run, a view of the bytes read, not a copy."""
    websocket, server = open_websocket()
    server.send_text(TRADES)
    server.send_text(QUOTES)
    data = bytearray(sent(server))
    received = websocket.receive_data(data)
    assert len(received) == 1 and isinstance(received[0], Run)
    assert received[0].view.obj is data
    assert messages(received) == [TRADES, QUOTES]


def test_status_messages_and_runs_keep_their_order() -> None:
    """A status message goes through websockets and comes out as bytes, between the runs."""
    websocket, server = open_websocket()
    server.send_text(TRADES)
    server.send_text(STATUS)
    server.send_text(QUOTES)
    received = websocket.receive_data(sent(server))
    assert [type(item) for item in received] == [Run, bytes, Run]
    assert messages(received) == [TRADES, STATUS, QUOTES]


def test_a_fragmented_message_is_put_back_together_across_reads() -> None:
    """Fragments with a ping between them come out as one message, and the ping is answered."""
    websocket, server = open_websocket()
    server.send_text(TRADES[:10], fin=False)
    server.send_ping(b"p1")
    server.send_continuation(TRADES[10:20], fin=False)
    data = sent(server)
    assert websocket.receive_data(data[:7]) == []
    assert websocket.receive_data(data[7:]) == []
    server.send_continuation(TRADES[20:], fin=True)
    assert websocket.receive_data(sent(server)) == [TRADES]
    server.receive_data(b"".join(websocket.data_to_send()))
    pongs = [e for e in server.events_received() if isinstance(e, Frame)]
    assert [(frame.opcode, frame.data) for frame in pongs] == [(Opcode.PONG, b"p1")]


def test_a_data_frame_inside_a_fragmented_message_is_a_protocol_error() -> None:
    """A plain frame where a continuation is due goes to websockets, which fails it."""
    websocket, server = open_websocket()
    server.send_text(TRADES[:10], fin=False)
    data = sent(server) + Frame(Opcode.TEXT, QUOTES).serialize(mask=False)  # as a bad server
    assert websocket.receive_data(data) == []
    assert websocket.ended is not None
    error, kind = websocket.ended
    assert kind == "protocol_error"
    assert "websocket protocol error from the feed" in str(error)
    assert "continuation" in str(error)


def test_messages_before_the_close_frame_are_kept_and_nothing_after_it() -> None:
    """A read with data, the close frame and more data: the data before, then the close."""
    websocket, server = open_websocket()
    server.send_text(TRADES)
    server.send_close(CloseCode.GOING_AWAY, "maintenance")
    data = sent(server) + Frame(Opcode.TEXT, QUOTES).serialize(mask=False)
    assert messages(websocket.receive_data(data)) == [TRADES]
    assert websocket.ended is not None
    error, kind = websocket.ended
    assert kind == "feed_closed"
    assert str(error) == "the feed closed the websocket (close code 1001: maintenance)"
    assert websocket.receive_data(Frame(Opcode.TEXT, QUOTES).serialize(mask=False)) == []
    assert not websocket.open


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (0, "the feed closed the connection without a close frame"),
        (5, "the feed closed the connection in the middle of a message"),
    ],
)
def test_end_of_stream_says_whether_a_message_was_cut(cut: int, why: str) -> None:
    """EOF between frames and EOF inside one are told apart."""
    websocket, server = open_websocket()
    server.send_text(TRADES)
    whole = sent(server)
    if cut:
        server.send_text(QUOTES)
        whole += sent(server)[:cut]
    assert messages(websocket.receive_data(whole)) == [TRADES]
    assert websocket.receive_eof() == []
    assert websocket.ended is not None
    assert websocket.ended == (websocket.ended[0], "feed_closed")
    assert str(websocket.ended[0]) == why


def test_an_upgrade_refused_is_the_end_with_the_status() -> None:
    """A 401 to the upgrade ends the websocket, saying to check the URL."""
    websocket = Websocket(
        parse_uri("wss://socket.example.test/stocks"),
        now=0.0,
        user_agent="tradebalancer/test",
        max_message_size=1 << 20,
        keep_limit=1 << 16,
        ping_interval=20.0,
        ping_timeout=20.0,
    )
    body = b"unauthorized"
    head = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert websocket.receive_data(head[:20]) == []
    assert websocket.receive_data(head[20:] + body) == []
    assert not websocket.upgraded
    assert websocket.ended is not None
    error, kind = websocket.ended
    assert kind == "upgrade_refused"
    assert "401" in str(error) and "check the URL" in str(error)


def test_keepalive_pings_matches_the_pong_and_times_out_without_one() -> None:
    """A ping every interval; its pong clears it; a late pong is the end, unless paused."""
    websocket, server = open_websocket(now=0.0, ping_interval=10.0, ping_timeout=5.0)
    assert websocket.keepalive_deadline() == 10.0
    assert websocket.keepalive(9.9, paused=False) is None
    assert websocket.data_to_send() == []
    assert websocket.keepalive(10.0, paused=False) is None
    server.receive_data(b"".join(websocket.data_to_send()))
    (ping,) = server.events_received()
    assert isinstance(ping, Frame) and ping.opcode is Opcode.PING
    assert websocket.keepalive_deadline() == 15.0
    websocket.receive_data(sent(server))  # the server's protocol answered with a pong
    assert websocket.keepalive_deadline() == 20.0
    assert websocket.keepalive(20.0, paused=False) is None  # the next ping
    assert websocket.keepalive(30.0, paused=True) is None  # paused: no pong can come
    assert websocket.keepalive_deadline() == 35.0
    assert websocket.keepalive(35.0, paused=False) == (
        "no pong within 5 s: the feed or the network is down"
    )


def test_sends_only_while_open() -> None:
    """Text and close frames are queued while open, and nothing once the close was sent."""
    websocket, server = open_websocket()
    websocket.send_text(b'{"action":"auth"}')
    websocket.send_close(CloseCode.GOING_AWAY, "client shutting down")
    websocket.send_text(b'{"action":"late"}')
    server.receive_data(b"".join(websocket.data_to_send()))
    frames = [e for e in server.events_received() if isinstance(e, Frame)]
    assert [frame.opcode for frame in frames] == [Opcode.TEXT, Opcode.CLOSE]
    assert frames[0].data == b'{"action":"auth"}'
    assert Close.parse(frames[1].data).reason == "client shutting down"
