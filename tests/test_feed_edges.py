"""Every edge of the feed, played by a hostile server against the real balancer and its workers.

Each test runs ``tradebalancer run`` against tests/hostile.py, whose script plays one thing a
real Massive cluster, a proxy or a broken network can do, and checks, from what the workers
recorded, that every valid event sent while connected arrived exactly once, in order, byte
for byte, and that the log says what a user needs to read.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from hostile import HostileFeed, Script, status
from test_service import Balancer, NotifySocket, notify_socket, read_records
from tlsca import make_ca

from tradebalancer.replay import synth
from tradebalancer.routing import pipe_for

__all__ = ["notify_socket"]  # the fixture, used by name

PIPES = 3
pytestmark = pytest.mark.timeout(120)


def trades(count: int, seed: int) -> list[bytes]:
    """``count`` events' worth of synthetic trade frames."""
    return list(synth.generate_frames(seed=seed, count_events=count, min_batch=3, max_batch=20))


def expected(frames: Sequence[bytes]) -> dict[int, list[bytes]]:
    """Per pipe, every event of ``frames``, in order."""
    streams: dict[int, list[bytes]] = {pipe: [] for pipe in range(PIPES)}
    for frame in frames:
        for event in synth.split_events(frame):
            streams[pipe_for(orjson.loads(event)["sym"].encode(), PIPES)].append(event)
    return streams


def delivered(balancer: Balancer) -> dict[int, list[bytes]]:
    return {pipe: read_records(balancer.records, pipe) for pipe in range(PIPES)}


def count(streams: dict[int, list[bytes]]) -> int:
    return sum(len(events) for events in streams.values())


def run(
    tmp_path: Path,
    balancers: list[Balancer],
    script: Script,
    *,
    until: str | None = None,
    subscribe: str = '["T.*"]',
    extra: str = "",
    environ: dict[str, str] | None = None,
    frames: Sequence[bytes] | None = None,
    seconds: float = 60.0,
) -> tuple[Balancer, HostileFeed]:
    """Serve ``script``, run the balancer until ``until`` is logged and every frame sent
    whole is delivered; return both."""
    with HostileFeed(script) as feed:
        balancer = Balancer(
            tmp_path,
            feed.url,
            pipes=PIPES,
            workers=1,
            extra=f"handshake_timeout = 1.0\n{extra}",
            environ=environ,
            subscribe=subscribe,
        )
        balancers.append(balancer)
        if until is not None:
            balancer.wait_for(lambda: until in balancer.log_text(), seconds, f"{until!r}")
        want = expected(frames if frames is not None else feed.sent)
        balancer.wait_for(lambda: count(delivered(balancer)) >= count(want), seconds, "events")
        assert balancer.stop() == 0, balancer.log_text()[-3000:]
        assert feed.errors == []
    return balancer, feed


def assert_exactly_once(balancer: Balancer, frames: Sequence[bytes]) -> None:
    """Every event of ``frames`` on its pipe once, in order, byte for byte; nothing else."""
    assert delivered(balancer) == expected(frames), balancer.log_text()[-3000:]


def reconnects(balancer: Balancer) -> int:
    found = re.findall(r"reconnects (\d+)", balancer.log_text())
    return int(found[-1]) if found else 0


# -- subscriptions ----------------------------------------------------------------------------


def test_one_refused_channel_stops_nothing(
    tmp_path: Path, balancers: list[Balancer], notify_socket: NotifySocket
) -> None:
    """A refused LULD.* is logged and shown; T.* streams on, everything after the error arrives.

    One refused channel used to close the connection and reconnect for ever: nothing streamed.
    """
    frames = trades(600, seed=11)
    script = Script(refuse=frozenset({"LULD.*"}), frames=frames, close_after_stream=False)
    balancer, feed = run(
        tmp_path,
        balancers,
        script,
        subscribe='["T.*", "LULD.*"]',
        environ={"NOTIFY_SOCKET": str(notify_socket.path)},
        frames=frames,
    )
    assert_exactly_once(balancer, frames)
    log = balancer.log_text()
    assert "the feed refused the subscription to LULD.*: not authorized to subscribe to" in log
    assert "reconnecting" not in log and reconnects(balancer) == 0
    assert len(feed.reached) == 1
    statuses = [m for m in notify_socket.collect() if "STATUS=streaming (refused: LULD.*)" in m]
    assert statuses, notify_socket.collect()


def test_every_channel_refused_keeps_the_connection_without_a_loop(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """All channels refused: said plainly once, the connection kept, no reconnect, no spin."""
    script = Script(refuse=frozenset({"T.*", "Q.*"}), close_after_stream=False)
    with HostileFeed(script) as feed:
        balancer = Balancer(
            tmp_path,
            feed.url,
            pipes=PIPES,
            workers=1,
            extra="handshake_timeout = 0.5",
            subscribe='["T.*", "Q.*"]',
        )
        balancers.append(balancer)
        balancer.wait_for(lambda: "refused every channel" in balancer.log_text(), what="it")
        cpu_before = balancer_cpu(balancer)
        time.sleep(2.0)  # four handshake timeouts: nothing may fire
        cpu = balancer_cpu(balancer) - cpu_before
        assert balancer.stop() == 0
    log = balancer.log_text()
    assert log.count("refused every channel (T.*,Q.*)") == 1
    assert "reconnecting" not in log and len(feed.reached) == 1
    assert cpu < 0.5, f"the balancer used {cpu:.2f} s of CPU in 2 s while idle"


def balancer_cpu(balancer: Balancer) -> float:
    fields = Path(f"/proc/{balancer.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize(
    ("greeting", "auth_reply", "confirm"),
    [
        (status("success", "Connected Successfully"), None, "each"),
        (None, status("authenticated", "authenticated"), "each"),
        (None, status("success", "authenticated"), "each"),
        (None, None, "casefold"),
        (None, None, "grouped"),
        (None, None, "reversed"),
    ],
)
def test_greetings_and_confirmations_are_taken_by_meaning(
    tmp_path: Path,
    balancers: list[Balancer],
    notify_socket: NotifySocket,
    greeting: bytes | None,
    auth_reply: bytes | None,
    confirm: str,
) -> None:
    """A "success" greeting, older auth replies, confirmations in other case, grouping or
    order: streaming at once, READY without the 20 s wait. (Each used to leave it stuck.)"""
    frames = trades(200, seed=12)
    script = Script(frames=frames, confirm=confirm, close_after_stream=False)
    if greeting is not None:
        script.greeting = greeting
    if auth_reply is not None:
        script.auth_reply = auth_reply
    started = time.monotonic()
    balancer, _ = run(
        tmp_path,
        balancers,
        script,
        subscribe='["T.*", "Q.AAPL"]',
        environ={"NOTIFY_SOCKET": str(notify_socket.path)},
        frames=frames,
    )
    assert_exactly_once(balancer, frames)
    ready = notify_socket.ready()
    assert ready is not None and "STATUS=streaming:" in ready, notify_socket.collect()
    assert time.monotonic() - started < 15
    assert reconnects(balancer) == 0


def test_data_without_confirmation_counts_as_streaming(
    tmp_path: Path, balancers: list[Balancer], notify_socket: NotifySocket
) -> None:
    """No confirmation but data: streaming from the first event; the missing one is logged."""
    frames = trades(300, seed=13)
    actions = [("text", frame) for frame in frames[:5]] + [("sleep", 1.5)]
    script = Script(confirm="none", actions=actions, frames=frames[5:], close_after_stream=False)
    balancer, _ = run(
        tmp_path,
        balancers,
        script,
        until="no confirmation of T.* within 1 s (handshake_timeout); data flows, going on",
        environ={"NOTIFY_SOCKET": str(notify_socket.path)},
        frames=frames,
    )
    assert_exactly_once(balancer, frames)
    ready = notify_socket.ready()
    assert ready is not None and "STATUS=streaming:" in ready
    assert reconnects(balancer) == 0


def test_routine_and_unknown_statuses_are_info_once(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """Statuses after subscribing (success, unknown ones) are INFO, each kind once, never fatal."""
    frames = trades(100, seed=14)
    actions = [
        ("status", status("success", "subscribed to: T.*")),
        ("status", status("info", "market opens soon")),
        ("status", status("info", "market opens soon")),
        ("status", status("success", "unsubscribed to: Q.*")),
    ]
    script = Script(actions=actions, frames=frames, close_after_stream=False)
    balancer, _ = run(tmp_path, balancers, script, frames=frames)
    assert_exactly_once(balancer, frames)
    log = balancer.log_text()
    assert log.count("INFO    tradebalancer.feed: feed status info: market opens soon") == 1
    assert "WARNING" not in log.split("subscription confirmed")[1]


# -- deadlines ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stall_at", "said"),
    [
        ("upgrade", "the answer to the websocket upgrade (HTTP 101) did not come within 1 s"),
        ("greeting", 'the feed\'s greeting ("connected") did not come within 1 s'),
        ("auth", "the answer to auth did not come within 1 s"),
        ("subscribe", "a subscription's confirmation, or data, (waiting for T.*) did not come"),
    ],
)
def test_a_silent_step_of_the_handshake_is_a_reconnect(
    tmp_path: Path, balancers: list[Balancer], stall_at: str, said: str
) -> None:
    """Every step has its deadline: past it a WARNING names it, then a reconnect with backoff.

    A peer that never answered the upgrade used to hang the balancer for ever.
    """
    with HostileFeed(Script(stall_at=stall_at)) as feed:
        balancer = Balancer(
            tmp_path, feed.url, pipes=PIPES, workers=1, extra="handshake_timeout = 1.0"
        )
        balancers.append(balancer)
        balancer.wait_for(lambda: len(feed.reached) >= 2, 30, "a second attempt")
        assert balancer.stop() == 0
    log = balancer.log_text()
    assert said in log, log[-3000:]
    assert "(handshake_timeout)" in log and "reconnecting in" in log


# -- what the feed sends: invalid JSON, refused events, rate-limited lines ---------------------


def test_invalid_json_never_reaches_a_worker(tmp_path: Path, balancers: list[Balancer]) -> None:
    """Frames with a broken number, literal, comma, control byte, name or escape: dropped
    whole (their valid events too), counted, logged with an excerpt; the rest delivered."""
    good = trades(120, seed=15)
    broken = [
        b'[{"ev":"T","sym":"AAPL","p":18x7},{"ev":"T","sym":"IBM","p":2}]',
        b'[{"ev":"T","sym":"AAPL","s":tru}]',
        b'[{"ev":"T","sym":"AAPL","p":1,}]',
        b'[{"ev":"T","sym":"AAPL","c":"a\x00b"}]',
        b'[{"ev":"T","sym":"AAPL","c":"a\x01b"}]',
        b'[{"ev":"T","sym":"AAPL",p:1}]',
        b'[{"ev":"T","sym":"AAPL","c":"\\x41"}]',
        b'[{"ev":"T","sym":"AAPL","p":NaN}]',
    ]
    actions = [("status", frame) for frame in broken]  # sent as text, not counted as sent
    script = Script(actions=actions, frames=good, close_after_stream=False)
    balancer, _ = run(tmp_path, balancers, script, frames=good, until="rejected 8")
    assert_exactly_once(balancer, good)
    log = balancer.log_text()
    assert "not a JSON array of objects; the last (not valid JSON" in log


def test_rejected_frames_are_summed_up_at_the_next_stats_tick(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """A second bad frame right after the first is logged at the next stats tick, not never."""
    good = trades(50, seed=16)
    actions = [("status", b"not json at all"), ("status", b"[1, 2, 3]")]
    script = Script(actions=actions, frames=good, close_after_stream=False)
    balancer, _ = run(
        tmp_path,
        balancers,
        script,
        frames=good,
        until="dropped 1 frame(s) that are not a JSON array of objects; the last (element 0",
    )
    assert "dropped 1 frame(s) that are not a JSON array of objects; the last (not valid" in (
        balancer.log_text()
    )


def test_a_route_key_that_is_not_a_string_goes_to_the_empty_keys_pipe(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """ "sym":7 or no sym at all: delivered to the pipe of the empty key, counted and logged."""
    odd = b'[{"ev":"T","sym":7,"p":1},{"ev":"T","p":2}]'
    script = Script(actions=[("status", odd)], close_after_stream=False)
    with HostileFeed(script) as feed:
        balancer = Balancer(tmp_path, feed.url, pipes=PIPES, workers=1)
        balancers.append(balancer)
        pipe = pipe_for(b"", PIPES)
        balancer.wait_for(lambda: len(read_records(balancer.records, pipe)) == 2, what="both")
        balancer.wait_for(lambda: "no route key that is a string" in balancer.log_text())
        assert balancer.stop() == 0
    assert read_records(balancer.records, pipe) == [
        b'{"ev":"T","sym":7,"p":1}',
        b'{"ev":"T","p":2}',
    ]
    assert "2 event(s) had no route key that is a string" in balancer.log_text()
    assert f"the empty key, pipe {pipe}" in balancer.log_text()


# -- the network: fragments, dribbles, pings, closes, resets, huge frames ----------------------


def test_fragments_with_pings_between_them_and_dribbled_bytes_arrive_whole(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """Messages in fragments with pings interleaved, frames a byte at a time, pings in the
    handshake: every event arrives once, in order, byte for byte."""
    frames = trades(400, seed=17)
    actions = [
        ("fragments+pings", frames[0], 5),
        ("fragments", frames[1], 3),
        ("dribble", frames[2]),
        ("ping", b"mid-stream"),
        *(("text", frame) for frame in frames[3:]),
    ]
    script = Script(
        before_greeting=[("ping", b"early"), ("ping", b"earlier")],
        actions=actions,
        close_after_stream=False,
    )
    balancer, _ = run(tmp_path, balancers, script, frames=frames)
    assert_exactly_once(balancer, frames)
    assert reconnects(balancer) == 0


@pytest.mark.parametrize(("code", "reason"), [(1001, "going away"), (1011, "internal trouble")])
def test_a_close_frame_is_logged_with_its_code_and_everything_before_it_delivered(
    tmp_path: Path, balancers: list[Balancer], code: int, reason: str
) -> None:
    """A close frame ends the connection: its code and reason logged, a reconnect, no loss."""
    frames = trades(300, seed=18)
    actions = [*(("text", frame) for frame in frames), ("close", code, reason)]
    script = Script(actions=actions, close_after_stream=False, replay=False)
    balancer, _ = run(tmp_path, balancers, script, frames=frames, until="reconnecting in")
    assert_exactly_once(balancer, frames)
    assert f"close code {code}: {reason}" in balancer.log_text()


def test_a_reset_in_the_middle_of_a_frame_loses_only_that_frame(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """A TCP reset mid-frame: the events sent whole before it arrive once, the half frame not."""
    frames = trades(300, seed=19)
    half = trades(40, seed=20)[0]
    actions = [*(("text", frame) for frame in frames), ("reset-mid-frame", half)]
    script = Script(actions=actions, close_after_stream=False, replay=False)
    balancer, _ = run(tmp_path, balancers, script, frames=frames, until="reconnecting in")
    assert_exactly_once(balancer, frames)
    assert "ECONNRESET" in balancer.log_text()


def test_huge_frames_arrive_and_one_past_the_limit_is_a_reconnect(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """An 8 MiB frame of events arrives whole; one past max_message_size closes with 1009."""
    events = [event for frame in trades(60_000, seed=21) for event in synth.split_events(frame)]
    big = b"[" + b",".join(events) + b"]"
    assert len(big) > 6 << 20
    too_big = b'[{"ev":"T","sym":"X","pad":"' + b"x" * (9 << 20) + b'"}]'
    actions = [("text", big), ("status", too_big), ("hold",)]
    script = Script(actions=actions, close_after_stream=False, replay=False)
    balancer, _ = run(
        tmp_path,
        balancers,
        script,
        frames=[big],
        until="reconnecting in",
        extra="max_message_size = 8388608",
    )
    assert_exactly_once(balancer, [big])
    assert "exceeds limit of 8388608 bytes; raise max_message_size" in balancer.log_text()


def test_a_close_notify_read_with_the_last_frame_ends_the_stream_at_once(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """wss, user-space TLS: the last frame and the close_notify in one read, no FIN after.

    A read short of the buffer used to end the wake-up's reads, and the close_notify behind the
    data left the poll nothing to signal: the end waited for the keepalive (40 s).
    """
    ca, cert, key = make_ca(tmp_path / "ca")
    frames = trades(400, seed=23)
    actions = [*(("text", frame) for frame in frames[:-1]), ("text+close_notify", frames[-1])]
    script = Script(actions=actions, close_after_stream=False, replay=False)
    with HostileFeed(script, certfile=str(cert), keyfile=str(key)) as feed:
        balancer = Balancer(tmp_path, feed.url, pipes=PIPES, workers=1, extra=f'ca_file = "{ca}"')
        balancers.append(balancer)
        balancer.wait_for(lambda: "reconnecting in" in balancer.log_text(), 15, "the reconnect")
        want = expected(frames)
        balancer.wait_for(lambda: count(delivered(balancer)) >= count(want), 30, "every event")
        assert balancer.stop() == 0
    assert_exactly_once(balancer, frames)
    log = balancer.log_text()
    assert "TLS: user" in log
    assert "the feed closed the connection without a close frame; reconnecting in" in log
    assert "no pong" not in log


def test_a_close_while_reading_is_paused_is_noticed_at_once_and_nothing_is_lost(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """The feed closes while backpressure stops reading: said at once, the rest read later.

    It used to go unnoticed (state and reconnect count unchanged) until the backlog drained.
    """
    # About 320 KB: more than the pipes (3 x 64 KiB) and the backlog limit (64 KiB) hold, so
    # reading pauses, and little enough to sit in the socket's buffer with the FIN behind it.
    frames = trades(2_900, seed=22)
    actions = [*(("text", frame) for frame in frames), ("fin",)]
    script = Script(actions=actions, close_after_stream=False, replay=False)
    with HostileFeed(script) as feed:
        balancer = Balancer(
            tmp_path,
            feed.url,
            pipes=PIPES,
            workers=1,
            sink_args=', "--delay=1.0"',
            extra="backlog_limit = 65536\nbatch_bytes = 65536",
        )
        balancers.append(balancer)
        balancer.wait_for(
            lambda: "while reading was paused" in balancer.log_text(), 60, "the hang-up noticed"
        )
        want = expected(frames)
        balancer.wait_for(lambda: count(delivered(balancer)) >= count(want), 120, "every event")
        balancer.wait_for(lambda: "reconnecting in" in balancer.log_text(), 60, "the reconnect")
        assert balancer.stop() == 0
    assert_exactly_once(balancer, frames)
    log = balancer.log_text()
    paused_at = log.index("backpressure:")
    assert paused_at < log.index("the feed closed the connection while reading was paused")


# -- max_connections ----------------------------------------------------------------------------


def test_max_connections_says_another_client_took_the_stream(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """max_connections: the log says another client with the same key took the stream."""
    actions = [("status", status("max_connections", "Maximum number of connections exceeded."))]
    script = Script(actions=[*actions, ("hold",)], close_after_stream=False)
    with HostileFeed(script) as feed:
        balancer = Balancer(tmp_path, feed.url, pipes=PIPES, workers=1)
        balancers.append(balancer)
        balancer.wait_for(lambda: "reconnecting in" in balancer.log_text(), what="the line")
        assert balancer.stop() == 0
    log = balancer.log_text()
    assert (
        "another client with the same API key connected to this cluster and took the stream" in log
    )
    assert "reconnecting in 300 s" in log
