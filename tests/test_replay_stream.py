"""The replay feed's stream as a client receives it: synthetic trades, recordings, loop, limit."""

from __future__ import annotations

from pathlib import Path

import orjson
from replayclient import events_in, expected_events, open_client, options, receive_all
from websockets.exceptions import ConnectionClosedOK

from tradebalancer.replay import ReplayServer, synth
from tradebalancer.replay.cli import main

TRADE_KEYS = ["ev", "sym", "i", "x", "p", "s", "c", "t", "q", "z", "trfi", "trft", "lt"]


def test_exactly_n_events_in_polygon_order_then_clean_close() -> None:
    """events=N sends exactly the first N synthetic trades, in order, then closes with 1000."""
    server_options = options(events=1234, min_batch=50, max_batch=120)
    with ReplayServer(server_options) as server, open_client(server) as ws:
        messages, closed = receive_all(ws)
    assert isinstance(closed, ConnectionClosedOK)
    assert closed.rcvd is not None and closed.rcvd.code == 1000
    assert events_in(messages) == expected_events(server_options, 1234)
    for message in messages:
        events = orjson.loads(message)
        assert isinstance(events, list) and 1 <= len(events) <= 120
        for event in events:
            assert list(event) == [key for key in TRADE_KEYS if key in event]
    assert server.stats.events_sent == 1234
    assert server.stats.frames_sent == len(messages)
    assert server.finished.is_set()


def test_recording_served_byte_for_byte(tmp_path: Path) -> None:
    """A recording's frames arrive exactly as written in the file, then the stream ends."""
    frames = [b'[{"ev":"T","sym":"A","p":1.5}]', b'[ {"ev": "Q", "sym": "B"} , {"ev":"T"} ]', b"[]"]
    path = tmp_path / "rec.jsonl.gz"
    synth.write_recording(path, frames)
    with ReplayServer(options(source=str(path))) as server, open_client(server) as ws:
        messages, closed = receive_all(ws)
    assert messages == frames
    assert isinstance(closed, ConnectionClosedOK)
    assert server.stats.events_sent == 3


def test_loop_and_limit_shorten_the_last_frame(tmp_path: Path) -> None:
    """A looped recording starts again at its end, and the limit cuts the last frame exactly."""
    frames = [b'[{"n":1},{"n":2}]', b'[{"n":3}, {"n":4}]', b'[{"n":5},{"n":6}]']
    path = tmp_path / "rec.jsonl"
    synth.write_recording(path, frames)
    server_options = options(source=str(path), loop=True, events=9)
    with ReplayServer(server_options) as server, open_client(server) as ws:
        messages, _ = receive_all(ws)
    assert messages == [*frames, frames[0], b'[{"n":3}]']


def test_command_line_writes_a_recording(tmp_path: Path) -> None:
    """--record-to writes the synthetic trades to a recording file and exits 0."""
    path = tmp_path / "trades.jsonl.gz"
    assert main(["--record-to", str(path), "--events", "1000", "--seed", "3"]) == 0
    frames = list(synth.read_recording(path))
    assert frames == list(synth.generate_frames(3, synth.DEFAULT_SYMBOLS, 1000))
