"""Clients of the replay feed for its tests, shared by test_replay*.py.

Small, fast options; connect, authenticate and subscribe, checking each status; read every
message until the close. Real websockets clients on 127.0.0.1, no mocks.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

import orjson
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tradebalancer.replay import ReplayOptions, ReplayServer, synth
from tradebalancer.replay.stream import AUTH_SUCCESS, CONNECTED


def subscribed(param: str) -> bytes:
    return b'[{"ev":"status","status":"success","message":"subscribed to: %s"}]' % param.encode()


def options(**changes: object) -> ReplayOptions:
    """Small, fast defaults for tests: a short synthetic pool and no pings."""
    base: dict[str, object] = {"pool_events": 5000, "ping_interval": None, "symbols": 300}
    base.update(changes)
    return ReplayOptions(**base)  # type: ignore[arg-type]


def expected_events(server_options: ReplayOptions, count: int) -> list[bytes]:
    """The synthetic events the server's options produce, as exact bytes."""
    o = server_options
    frames = synth.generate_frames(o.seed, o.symbols, count, o.min_batch, o.max_batch)
    return [event for frame in frames for event in synth.split_events(frame)]


@contextlib.contextmanager
def open_client(
    server: ReplayServer,
    key: str = "key",
    params: str = "T.*",
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[ClientConnection]:
    """Connect, authenticate and subscribe, checking each status the feed answers."""
    with connect(server.url, ssl=ssl_context, open_timeout=5, close_timeout=2) as ws:
        assert ws.recv(timeout=5, decode=False) == CONNECTED
        ws.send(orjson.dumps({"action": "auth", "params": key}).decode())
        assert ws.recv(timeout=5, decode=False) == AUTH_SUCCESS
        ws.send(orjson.dumps({"action": "subscribe", "params": params}).decode())
        for param in params.split(","):
            assert ws.recv(timeout=5, decode=False) == subscribed(param)
        yield ws


def receive_all(ws: ClientConnection) -> tuple[list[bytes], ConnectionClosed]:
    """Every data message until the connection ends, and how it ended."""
    messages: list[bytes] = []
    while True:
        try:
            messages.append(ws.recv(timeout=10, decode=False))
        except ConnectionClosed as exc:
            return messages, exc


def events_in(messages: list[bytes]) -> list[bytes]:
    return [event for message in messages for event in synth.split_events(message)]
