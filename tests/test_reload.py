"""Reloading the configuration: what may change live, on the feed's connection, and the whole
instance reloaded by SIGHUP and by ``tradebalancer reload`` against a real replay feed."""

from __future__ import annotations

import dataclasses
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from test_feed import AUTH_OK, CONNECTED, TRADES, Peer, handshake, new_feed, subscribed
from test_service import (
    KEY,
    REPO,
    Balancer,
    assert_every_event_once,
    delivered,
    expected_streams,
)

from tradebalancer import config
from tradebalancer.feed import Phase
from tradebalancer.frames import messages
from tradebalancer.reload import compare
from tradebalancer.replay import ReplayOptions, ReplayServer
from tradebalancer.service import Service
from tradebalancer.status import StatusReporter
from tradebalancer.subscriptions import Subscriptions
from tradebalancer.systemd import Notifier

BASE = """
[feeds.x]
url = "wss://socket.example.test/stocks"
command = ["/bin/cat"]
pipes = 4
subscribe = ["T.*"]
"""


def feed_of(text: str) -> config.FeedConfig:
    return config.loads(text).feed("x")


@pytest.mark.parametrize(
    ("edit", "live", "restart"),
    [
        (('["T.*"]', '["T.*", "Q.AAPL"]'), ["feeds.x.subscribe"], []),
        (("pipes = 4", "pipes = 4\nstats_interval = 2.0"), ["feeds.x.stats_interval"], []),
        (("pipes = 4", "pipes = 4\ndelay_warning = 1.5"), ["feeds.x.delay_warning"], []),
        (("pipes = 4", "pipes = 8"), [], ["feeds.x.pipes"]),
        (("/stocks", "/options"), [], ["feeds.x.url"]),
        (("pipes = 4", "pipes = 4\nreconnect.max = 9.0"), [], ["feeds.x.reconnect.max"]),
        (('["/bin/cat"]', '["/bin/cat", "-u"]'), [], ["feeds.x.command"]),
        (("pipes = 4", 'pipes = 4\nmetrics = "127.0.0.1:9464"'), [], ["feeds.x.metrics"]),
        (
            ('pipes = 4\nsubscribe = ["T.*"]', 'pipes = 5\nsubscribe = ["Q.*"]'),
            ["feeds.x.subscribe"],
            ["feeds.x.pipes"],
        ),
    ],
)
def test_each_key_is_live_or_needs_a_restart(
    edit: tuple[str, str], live: list[str], restart: list[str]
) -> None:
    """A changed key is applied live only if reload.py allows it, named by its key path."""
    text = BASE.replace(*edit, 1)
    assert text != BASE
    change = compare(feed_of(BASE), feed_of(text))
    assert sorted(change.live) == live
    assert sorted(change.restart) == restart


def test_the_same_command_written_elsewhere_is_no_change() -> None:
    """A command moved from the feed's table to [defaults] is the same command."""
    moved = '[defaults]\ncommand = ["/bin/cat"]\n' + BASE.replace('command = ["/bin/cat"]\n', "")
    assert compare(feed_of(BASE), feed_of(moved)).empty


def test_a_refusal_names_each_key_with_both_values_and_the_restart() -> None:
    """The refusal is one line: each key, running -> file, and the command that applies it."""
    text = BASE.replace("pipes = 4", "pipes = 8\nworkers = 3").replace("/stocks", "/crypto")
    line = compare(feed_of(BASE), feed_of(text)).refusal()
    assert "\n" not in line
    assert "feeds.x.pipes (4 -> 8)" in line
    assert "feeds.x.url (wss://socket.example.test/stocks -> wss://socket.example.test/crypto)" in (
        line
    )
    assert "feeds.x.workers" in line
    assert "systemctl restart tradebalancer@x" in line


def test_apply_takes_only_the_live_keys() -> None:
    """The running configuration takes the new subscriptions and keeps everything else."""
    running = feed_of(BASE)
    loaded = feed_of(BASE.replace('["T.*"]', '["Q.*"]').replace("stocks", "stocks?x=1"))
    change = compare(running, loaded)
    applied = change.apply(running, loaded)
    assert applied.subscribe == ("Q.*",)
    assert applied.url == running.url
    assert dataclasses.replace(applied, subscribe=running.subscribe) == running


def test_subscriptions_change_keeps_what_stays_and_awaits_what_is_new() -> None:
    """Added channels wait for their confirmation; removed ones leave, whatever their state."""
    subs = Subscriptions(["T.*", "Q.AAPL", "A.*"])
    subs.confirm("subscribed to: T.*")
    subs.refuse("not allowed: A.*")
    added, removed = subs.change(["t.*", "Q.MSFT"])  # T.* kept, whatever its case
    assert (added, removed) == (["Q.MSFT"], ["Q.AAPL"])  # A.* was refused: nothing to undo
    assert subs.confirmed == ["T.*"] and subs.pending == ["Q.MSFT"] and not subs.refused
    assert subs.params == "T.*,Q.MSFT"
    assert subs.leaving == ["Q.AAPL"]
    assert subs.unsubscribed("unsubscribed to: A.*, Q.AAPL") == ["Q.AAPL"]
    assert subs.unsubscribed("unsubscribed to: Q.AAPL") == [] and not subs.leaving


def test_a_streaming_feed_subscribes_the_new_then_unsubscribes_the_old() -> None:
    """On the live connection: one subscribe with the added, one unsubscribe with the removed."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    assert feed.phase is Phase.STREAMING
    sent = len(peer.received)
    added, removed = feed.resubscribe(["T.*", "Q.MSFT"], now=5.0)
    peer.pump(5.0)
    assert (added, removed) == (["Q.MSFT"], ["Q.AAPL"])
    assert [orjson.loads(m) for m in peer.received[sent:]] == [
        {"action": "subscribe", "params": "Q.MSFT"},
        {"action": "unsubscribe", "params": "Q.AAPL"},
    ]
    peer.send(subscribed("Q.MSFT"), now=5.1)
    peer.send(b'[{"ev":"status","status":"success","message":"unsubscribed to: Q.AAPL"}]')
    peer.send(TRADES)
    assert feed.phase is Phase.STREAMING and feed.subscriptions.settled
    assert messages(feed.messages_received()) == [TRADES]
    assert feed.outcome(6.0) is None


def test_before_the_subscription_the_new_list_is_sent_whole() -> None:
    """A reload while authenticating changes what the one subscribe message will carry."""
    feed = new_feed()
    peer = Peer(feed)
    peer.send(CONNECTED)
    feed.resubscribe(["Q.*"], now=0.5)
    peer.send(AUTH_OK)
    assert orjson.loads(peer.received[-1]) == {"action": "subscribe", "params": "Q.*"}
    peer.send(subscribed("Q.*"))
    assert feed.phase is Phase.STREAMING


def test_an_added_channel_refused_leaves_the_others_streaming() -> None:
    """A channel the feed refuses after a reload is a per-channel fact, not a reconnect."""
    feed = new_feed()
    peer = handshake(feed, ["T.*", "Q.AAPL"])
    feed.resubscribe(["T.*", "Q.AAPL", "XQ.*"], now=1.0)
    peer.pump(1.0)
    peer.send(b'[{"ev":"status","status":"error","message":"not authorized: XQ.*"}]')
    assert feed.phase is Phase.STREAMING
    assert feed.refused() == {"XQ.*": "not authorized: XQ.*"}


def reload_command(config_path: Path, socket: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tradebalancer",
            "--config",
            str(config_path),
            "reload",
            "feed",
            "--socket",
            str(socket),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.timeout(180)
def test_reload_changes_subscriptions_on_the_live_connection_and_refuses_the_rest(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """SIGHUP and `tradebalancer reload` resubscribe without a reconnect, nothing lost or
    repeated; an invalid file or a restart key is refused (78) and the instance runs on."""
    events, seed, pipes = 60_000, 5, 4
    socket = tmp_path / "control"
    options = ReplayOptions(accept_keys=frozenset({KEY}), events=events, seed=seed, rate=8_000)
    with ReplayServer(options) as server:
        balancer = Balancer(tmp_path, server.url, pipes=pipes, extra=f'control_socket = "{socket}"')
        balancers.append(balancer)
        path = tmp_path / "tradebalancer.toml"
        original = path.read_text()
        balancer.wait_for(lambda: delivered(balancer, pipes) > 1000, what="streaming")

        path.write_text(original.replace('subscribe = ["T.*"]', 'subscribe = ["T.*", "Q.AAPL"]'))
        done = reload_command(path, socket)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "reloaded: feeds.feed.subscribe [T.*] -> [T.*, Q.AAPL]"
        balancer.wait_for(lambda: "subscription confirmed: Q.AAPL" in balancer.log_text())

        path.write_text(original.replace('subscribe = ["T.*"]', 'subscribe = ["T.*", "Q.MSFT"]'))
        balancer.process.send_signal(signal.SIGHUP)
        balancer.wait_for(lambda: "unsubscribed from Q.AAPL" in balancer.log_text())

        path.write_text(original.replace("pipes = 4", "pipes = 0"))
        invalid = reload_command(path, socket)
        assert invalid.returncode == 78
        assert "feeds.feed.pipes: must be an integer from 1 to 4096, got 0" in invalid.stderr
        assert "the running configuration stays" in invalid.stderr

        path.write_text(original.replace("pipes = 4", "pipes = 5"))
        refused = reload_command(path, socket)
        assert refused.returncode == 78
        assert "feeds.feed.pipes (4 -> 5)" in refused.stderr
        assert "systemctl restart tradebalancer@feed" in refused.stderr
        assert server.stats.connections == 1  # all of it on the first connection
        balancer.wait_for(lambda: delivered(balancer, pipes) >= events, what="every event")
        assert balancer.stop() == 0
        actions = server.stats.subscription_actions
    assert actions[:4] == [
        (1, "subscribe", "T.*"),
        (1, "subscribe", "Q.AAPL"),
        (1, "subscribe", "Q.MSFT"),
        (1, "unsubscribe", "Q.AAPL"),
    ]
    assert_every_event_once(balancer, expected_streams(events, seed, pipes))
    log = balancer.log_text()
    assert "SIGHUP received: reloading" in log
    assert "reloaded: feeds.feed.subscribe [T.*, Q.AAPL] -> [T.*, Q.MSFT]" in log
    assert len(re.findall(r"reload refused", log)) == 2


def test_a_channel_taken_back_before_its_confirmation_is_not_awaited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Streaming: a channel added, then removed before the feed confirmed it, leaves no
    deadline behind (no warning about a confirmation of nothing)."""
    feed = new_feed()
    handshake(feed, ["T.*", "Q.AAPL"])
    feed.resubscribe(["T.*", "Q.AAPL", "XQ.*"], now=1.0)
    feed.resubscribe(["T.*", "Q.AAPL"], now=2.0)
    with caplog.at_level(logging.WARNING):
        feed.tick(30.0)
    assert feed.phase is Phase.STREAMING and feed.next_deadline() != 12.0
    assert not [r for r in caplog.records if "no confirmation" in r.getMessage()]


def test_a_refused_channel_removed_is_not_unsubscribed() -> None:
    """The feed never subscribed a refused channel: removing it sends nothing."""
    feed = new_feed()
    peer = handshake(feed, ["T.*"])  # Q.AAPL stays unanswered, then is refused
    peer.send(b'[{"ev":"status","status":"error","message":"not authorized: Q.AAPL"}]')
    sent = len(peer.received)
    assert feed.resubscribe(["T.*"], now=1.0) == ([], [])
    peer.pump(1.0)
    assert peer.received[sent:] == []


def test_a_change_of_case_alone_is_sent_at_the_next_connection() -> None:
    """T.aapl -> T.AAPL on a live connection sends nothing (the feed matches without case);
    before the subscription the new spelling goes out."""
    feed = new_feed()
    handshake(feed, ["T.*", "Q.AAPL"])
    assert feed.resubscribe(["T.*", "q.aapl"], now=1.0) == ([], [])
    early = new_feed()
    peer = Peer(early)
    peer.send(CONNECTED)
    assert early.resubscribe(["t.*"], now=0.5) is None
    peer.send(AUTH_OK)
    assert orjson.loads(peer.received[-1]) == {"action": "subscribe", "params": "t.*"}


class RecordingNotifier(Notifier):
    """A notifier that keeps the first line of each message instead of sending it."""

    def __init__(self) -> None:
        super().__init__({})
        self.sent: list[str] = []

    def _send(self, message: str) -> None:
        self.sent.append(message.split("\n")[0])


def service_for(tmp_path: Path, interval: int) -> tuple[Service, Path, RecordingNotifier]:
    path = tmp_path / "tb.toml"
    path.write_text(BASE.replace("[feeds.x]", f"[feeds.x]\nstats_interval = {interval}"))
    notifier = RecordingNotifier()
    feed = config.load(str(path)).feed("x")
    service = Service(feed, "k", notifier=notifier, config_path=str(path), environ={})
    service.status = StatusReporter(notifier, service.stats, float(interval), 0.0)
    return service, path, notifier


def test_a_reload_before_ready_tells_systemd_nothing(tmp_path: Path) -> None:
    """READY=1 still means "started": a reload before it sends no RELOADING=1 or READY=1."""
    service, _, notifier = service_for(tmp_path, 5)
    assert service.reload(0.5)[0]
    assert notifier.sent == []
    service.status.tick(30.0, lambda now: None)  # type: ignore[union-attr]
    service.reload(31.0)
    assert notifier.sent[-2:] == ["RELOADING=1", "READY=1"]


def test_a_shorter_stats_interval_applies_from_the_reload(tmp_path: Path) -> None:
    """stats_interval 3600 -> 5 by reload: the next stats line is due within 5 s."""
    service, path, _ = service_for(tmp_path, 3600)
    path.write_text(path.read_text().replace("3600", "5"))
    assert service.reload(1.0) == (True, "reloaded: feeds.x.stats_interval 3600.0 -> 5.0")
    assert service.status is not None and service.status.deadline() <= 6.0
