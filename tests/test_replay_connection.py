"""One connection to the replay feed, read by real websocket clients and by a raw socket."""

from __future__ import annotations

import base64
import os
import socket
import time
from collections.abc import Iterator

import orjson
import pytest
from replayclient import (
    events_in,
    expected_events,
    open_client,
    options,
    receive_all,
    subscribed,
)
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.sync.client import connect

from tradebalancer.replay import ReplayServer
from tradebalancer.replay.stream import AUTH_FAILED, AUTH_SUCCESS, CONNECTED


class RawClient:
    """A websocket client on a bare socket, to see frames exactly as the server wrote them."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16))
        self.sock.sendall(
            b"GET /stocks HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101 ")
        self.eof = False

    def send_text(self, payload: bytes) -> None:
        """Send a masked text frame; a zero mask keeps the payload as is (RFC 6455 5.3)."""
        assert len(payload) < 126
        self.sock.sendall(bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload)

    def frames(self) -> Iterator[tuple[bool, int, bytes]]:
        """Yield (fin, opcode, payload) per complete frame until end of file."""
        while True:
            parsed = self._parse()
            if parsed is not None:
                yield parsed
                continue
            data = self.sock.recv(1 << 16)
            if not data:
                self.eof = True
                return
            self.buffer += data

    def _parse(self) -> tuple[bool, int, bytes] | None:
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        length, offset = buffer[1] & 0x7F, 2
        if length == 126:
            length, offset = int.from_bytes(buffer[2:4], "big"), 4
        elif length == 127:
            length, offset = int.from_bytes(buffer[2:10], "big"), 10
        if len(buffer) < offset + length:
            return None
        self.buffer = buffer[offset + length :]
        return bool(buffer[0] & 0x80), buffer[0] & 0x0F, buffer[offset : offset + length]

    def subscribe(self, subscriptions: int = 1) -> None:
        """Authenticate and subscribe to T.*, consuming the statuses."""
        frames = self.frames()
        assert next(frames)[2] == CONNECTED
        self.send_text(b'{"action":"auth","params":"key"}')
        assert next(frames)[2] == AUTH_SUCCESS
        self.send_text(b'{"action":"subscribe","params":"T.*"}')
        assert next(frames)[2] == subscribed("T.*")

    def close(self) -> None:
        self.sock.close()


def test_status_flow_and_one_status_per_param() -> None:
    """connected, auth_success, one subscribed status per parameter, then data frames."""
    with ReplayServer(options(accept_keys=frozenset({"secret"}), events=300)) as server:
        with open_client(server, key="secret", params="T.*,Q.AAPL,T.MSFT") as ws:
            messages, _ = receive_all(ws)
        assert orjson.loads(messages[0])[0]["ev"] == "T"
        assert server.stats.connections == 1


def test_wrong_key_gets_auth_failed_then_close() -> None:
    """A refused key gets auth_failed, then a close frame with code 1008."""
    with ReplayServer(options(accept_keys=frozenset({"secret"}))) as server:
        with connect(server.url, open_timeout=5) as ws:
            assert ws.recv(timeout=5, decode=False) == CONNECTED
            ws.send('{"action":"auth","params":"wrong"}')
            assert ws.recv(timeout=5, decode=False) == AUTH_FAILED
            with pytest.raises(ConnectionClosedError) as closed:
                ws.recv(timeout=5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert server.stats.auth_failures == 1


def test_any_non_empty_key_accepted_without_a_key_list() -> None:
    """With no key list any non-empty key is accepted and the empty key refused."""
    with ReplayServer(options()) as server:
        with connect(server.url, open_timeout=5) as ws:
            ws.recv(timeout=5)
            ws.send('{"action":"auth","params":"anything"}')
            assert ws.recv(timeout=5, decode=False) == AUTH_SUCCESS
        with connect(server.url, open_timeout=5) as ws:
            ws.recv(timeout=5)
            ws.send('{"action":"auth","params":""}')
            assert ws.recv(timeout=5, decode=False) == AUTH_FAILED


def test_bad_requests_get_error_statuses() -> None:
    """Subscribing before auth, unknown actions and non-JSON messages get error statuses."""
    with ReplayServer(options()) as server, connect(server.url, open_timeout=5) as ws:
        ws.recv(timeout=5)
        for request in ('{"action":"subscribe","params":"T.*"}', '{"action":"x"}', "nope"):
            ws.send(request)
            answer = orjson.loads(ws.recv(timeout=5))
            assert answer[0]["status"] == "error"
        ws.send('{"action":"auth","params":"k"}')
        assert ws.recv(timeout=5, decode=False) == AUTH_SUCCESS


def test_plain_http_request_refused() -> None:
    """A request without a websocket upgrade gets an HTTP error and the connection ends."""
    with (
        ReplayServer(options()) as server,
        socket.create_connection(("127.0.0.1", server.port)) as sock,
    ):
        sock.settimeout(5)
        sock.sendall(b"GET /stocks HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
        assert response.startswith(b"HTTP/1.1 426 ")


def test_pings_sent_and_pongs_counted() -> None:
    """The server pings every ping_interval; a client's pongs are counted; client pings answered."""
    with ReplayServer(options(ping_interval=0.05)) as server:
        with connect(server.url, open_timeout=5) as ws:
            ws.recv(timeout=5)
            ws.send('{"action":"auth","params":"k"}')
            ws.recv(timeout=5)
            deadline = time.monotonic() + 5
            while server.stats.pongs_received < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ws.ping(b"hi").wait(5)
        assert server.stats.pings_sent >= 3
        assert server.stats.pongs_received >= 3


@pytest.mark.parametrize("ping_interval", [None, 0.2])
def test_idle_connection_costs_no_cpu(ping_interval: float | None) -> None:
    """An authenticated, unsubscribed client leaves the server idle, not spinning."""
    server_options = options(ping_interval=ping_interval)
    with ReplayServer(server_options) as server, connect(server.url, open_timeout=5) as ws:
        ws.recv(timeout=5)
        ws.send('{"action":"auth","params":"k"}')
        ws.recv(timeout=5)
        before = os.times()
        time.sleep(0.6)
        after = os.times()
    used = (after.user - before.user) + (after.system - before.system)
    assert used < 0.2


def test_missing_pong_closes_with_1011() -> None:
    """A client that never answers pings is closed with code 1011 after the timeout."""
    with ReplayServer(options(ping_interval=0.1, rate=100.0)) as server:
        client = RawClient(server.port)
        try:
            client.subscribe()
            opcodes = []
            for _, opcode, payload in client.frames():
                opcodes.append(opcode)
                if opcode == 0x8:
                    assert int.from_bytes(payload[:2], "big") == 1011
                    break
            assert 0x9 in opcodes
        finally:
            client.close()


def test_cut_mid_frame_then_every_event_once_over_two_connections() -> None:
    """disconnect_after cuts a frame in half; the next connection gets it whole: no loss."""
    server_options = options(events=3000, disconnect_after=1000)
    with ReplayServer(server_options) as server:
        first = RawClient(server.port)
        try:
            first.subscribe()
            messages = [payload for _, opcode, payload in first.frames() if opcode == 0x1]
        finally:
            first.close()
        assert first.eof
        assert first.buffer, "the connection ended on a frame boundary, not mid-frame"
        assert 1000 - 500 < len(events_in(messages)) <= 1000
        with open_client(server) as ws:
            rest, closed = receive_all(ws)
        assert isinstance(closed, ConnectionClosedOK)
    assert events_in(messages + rest) == expected_events(server_options, 3000)
    assert server.stats.forced_disconnects == 1
    assert server.stats.events_sent == 3000


def test_cut_seen_by_websockets_client_as_abnormal_close() -> None:
    """A websockets client sees the cut as an abnormal close, and gets every event once."""
    server_options = options(events=2000, disconnect_after=700)
    with ReplayServer(server_options) as server:
        received: list[bytes] = []
        for expected_ok in (False, True):
            with open_client(server) as ws:
                messages, closed = receive_all(ws)
            received += messages
            assert isinstance(closed, ConnectionClosedOK) is expected_ok
            if not expected_ok:
                assert closed.rcvd is None  # no close frame: the TCP connection just ended
    assert events_in(received) == expected_events(server_options, 2000)


def test_fragmented_messages() -> None:
    """fragment=True sends each message as a text frame and two continuation frames."""
    server_options = options(events=600, fragment=True)
    with ReplayServer(server_options) as server:
        client = RawClient(server.port)
        try:
            client.subscribe()
            frames = []
            for frame in client.frames():
                frames.append(frame)
                if frame[1] == 0x8:  # the close frame: the stream is over
                    break
        finally:
            client.close()
        with ReplayServer(server_options) as again, open_client(again) as ws:
            messages, _ = receive_all(ws)
    data = [(fin, opcode) for fin, opcode, _ in frames if opcode in (0x0, 0x1)]
    assert data == [(False, 0x1), (False, 0x0), (True, 0x0)] * (len(data) // 3)
    joined = [b"".join(p for _, op, p in frames[i : i + 3]) for i in range(0, len(data), 3)]
    assert joined == messages
    assert events_in(messages) == expected_events(server_options, 600)


def test_binary_messages() -> None:
    """binary=True sends the same messages as binary frames."""
    server_options = options(events=700, binary=True)
    with ReplayServer(server_options) as server, open_client(server) as ws:
        first = ws.recv(timeout=5)
        messages, _ = receive_all(ws)
    assert isinstance(first, bytes)
    assert events_in([first, *messages]) == expected_events(server_options, 700)


def test_rate_limits_events_per_second() -> None:
    """rate paces the stream: 4,000 events at 10,000 per second take about 0.4 s."""
    with ReplayServer(options(rate=10_000.0, events=4000)) as server, open_client(server) as ws:
        started = time.monotonic()
        messages, _ = receive_all(ws)
        elapsed = time.monotonic() - started
    assert len(events_in(messages)) == 4000
    assert 0.4 / 3 < elapsed < 0.4 * 3 + 1.0


def test_timestamps_on_the_last_event_of_each_frame() -> None:
    """timestamps=True ends each frame's last event with "lt", the monotonic ns at send."""
    before = time.monotonic_ns()
    server_options = options(rate=20_000.0, events=2000, timestamps=True)
    with ReplayServer(server_options) as server, open_client(server) as ws:
        messages, _ = receive_all(ws)
    after = time.monotonic_ns()
    assert messages
    for message in messages:
        events = orjson.loads(message)
        assert all("lt" not in event for event in events[:-1])
        assert list(events[-1])[-1] == "lt"
        assert before < events[-1]["lt"] < after


def test_keep_sent_matches_what_the_client_got() -> None:
    """keep_sent records every frame sent, as sent."""
    with ReplayServer(options(events=900, keep_sent=True)) as server, open_client(server) as ws:
        messages, _ = receive_all(ws)
    assert server.sent_frames == messages
