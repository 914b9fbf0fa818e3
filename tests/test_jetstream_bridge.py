"""The bridge under failure, end to end: replay feed -> balancer -> bridge -> nats-server.

Real parts only (tests/natsserver.py; SIGSTOP stands for a server that takes in bytes and never
answers). Each test reads the stream back message by message and compares every event of the
remote partitions, in order, with what the feed sent.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import nkeys
import pytest
from natsserver import NatsServer, environment
from test_control import free_port, scrape
from test_jetstream import PIPES, REMOTE, processes, remote_balancer, wait_until
from test_service import expected_streams, read_records

from tradebalancer.ledger import EVENT_HEADER
from tradebalancer.reader import MessageParser
from tradebalancer.reader.jetstream import JetStreamSource
from tradebalancer.replay import ReplayOptions, ReplayServer

__all__ = ["processes"]  # the fixture, shared with test_jetstream.py


async def read_stream(url: str) -> dict[int, list[tuple[int, list[bytes]]]]:
    """Every message of stream "tb": per partition, (its last event's number, its events)."""
    connection = await nats.connect(url)
    try:
        js = connection.jetstream()
        info = await js.stream_info("tb")
        found: dict[int, list[tuple[int, list[bytes]]]] = {p: [] for p in REMOTE}
        for sequence in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg("tb", sequence)
            partition = int((message.subject or "").rsplit(".", 1)[1])
            number = int((message.headers or {})[EVENT_HEADER])
            found[partition].append((number, MessageParser().receive_data(message.data or b"")))
        return found
    finally:
        await connection.close()


def bridge_pid(log: str) -> int:
    """The pid of the bridge (worker 1 of a remote_balancer) as last started."""
    pids = re.findall(r"worker 1 (?:started|restarted) \(pid (\d+)", log)
    assert pids, log
    return int(pids[-1])


def counted_lost(log: str) -> dict[int, int]:
    """Per partition, the events the log says a bridge read and never stored, net of late ones."""
    counted: dict[int, int] = {}
    for partition in REMOTE:
        warned = re.findall(
            rf"(\d+) events of partition {partition} were read by the previous", log
        )
        warned += re.findall(rf"(1) event of partition {partition} was read in part", log)
        late = re.findall(rf"in tb\.feed\.{partition} after this one started: (\d+) events", log)
        counted[partition] = sum(map(int, warned)) - sum(map(int, late))
    return {partition: count for partition, count in counted.items() if count}


@pytest.mark.timeout(150)
def test_a_bridge_killed_with_unstored_events_counts_them_as_not_delivered(
    tmp_path: Path, processes: list[object]
) -> None:
    """SIGKILL while JetStream does not answer: the loss is logged, counted in the last line
    (exit 75) and is exactly the events missing from the stream; the rest arrive once, in order."""
    server = NatsServer(tmp_path / "nats").start()
    processes.append(server)
    events, seed = 20_000, 21
    expected = expected_streams(events, seed, PIPES)
    options = ReplayOptions(events=events, seed=seed, rate=4_000)
    port = free_port()
    with ReplayServer(options) as feed:
        balancer = remote_balancer(
            tmp_path,
            feed.url,
            server.url,
            "max_batch_bytes = 8192\npublish_timeout = 1.0",
            feed_extra=f'metrics = "127.0.0.1:{port}"',
        )
        processes.append(balancer)
        wait_until(lambda: "JetStream stream tb" in balancer.log_text(), "the stream", 30)
        time.sleep(1.0)  # some batches stored
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            balancer.wait_for(lambda: "not acknowledged" in balancer.log_text(), 20, "a timeout")
            time.sleep(0.5)  # more read behind the batch in flight
            os.kill(bridge_pid(balancer.log_text()), signal.SIGKILL)
        finally:
            server.process.send_signal(signal.SIGCONT)
        balancer.wait_for(lambda: "worker 1 restarted" in balancer.log_text(), 30, "a successor")
        local = [p for p in range(PIPES) if p not in REMOTE]
        balancer.wait_for(
            lambda: all(len(read_records(balancer.records, p)) >= len(expected[p]) for p in local),
            timeout=60,
            what="every local event",
        )
        time.sleep(1.0)  # the feed's last remote events into the pipes

        def lost_in_metrics() -> bool:  # as the log counts them, now
            lost = scrape(port)["tradebalancer_pipe_lost_events_total"]
            by_pipe = {int(dict(labels)["pipe"]): value for labels, value in lost.items()}
            counted = counted_lost(balancer.log_text())
            return (
                by_pipe == {p: counted.get(p, 0) for p in range(PIPES)}
                and sum(counted.values()) > 0
            )

        wait_until(lost_in_metrics, "the lost events in the metrics", 10)
        assert balancer.stop() == 75, balancer.log_text()[-3000:]
    log = balancer.log_text()
    stored = asyncio.run(read_stream(server.url))
    missing = 0
    for partition in REMOTE:
        got = [event for _, batch in stored[partition] for event in batch]
        want = expected[partition]
        gap = len(want) - len(got)
        missing += gap
        # What is stored is the feed's order with one run cut out: the events the bridge lost.
        head = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        head = len(got) if head is None else head
        assert got[:head] == want[:head]
        assert got[head:] == want[head + gap :], f"partition {partition}: a duplicate or disorder"
        # The numbers show the gap where it is, and nowhere else.
        numbers = [number for number, _ in stored[partition]]
        sizes = [len(batch) for _, batch in stored[partition]]
        gaps = [b - a - size for a, b, size in zip([0, *numbers], numbers, sizes, strict=False)]
        assert sorted(gaps)[:-1] == [0] * (len(gaps) - 1) and sum(gaps) == gap, partition
        warned = re.findall(
            rf"(\d+) events of partition {partition} were read by the previous", log
        )
        # A message the killed bridge had read only the head of is one more (its successor
        # skips the rest), and a batch the server took in late is uncounted.
        warned += re.findall(rf"(1) event of partition {partition} was read in part", log)
        late = re.findall(rf"in tb\.feed\.{partition} after this one started: (\d+) events", log)
        assert sum(map(int, warned)) - sum(map(int, late)) == gap, log[-3000:]
    assert missing > 0, "nothing was lost: the test did not kill the bridge with events held"
    line = re.search(
        r"stopped: ([\d,]+) events? of ([\d,]+) not delivered, read by a JetStream", log
    )
    assert line is not None, log[-3000:]
    assert int(line.group(1).replace(",", "")) == missing
    assert int(line.group(2).replace(",", "")) == events


@pytest.mark.timeout(120)
def test_jetstream_unreachable_at_the_start_is_backpressure_then_everything_arrives(
    tmp_path: Path, processes: list[object]
) -> None:
    """No server at the bridge's start: one clear WARNING, the balancer's backlog grows while the
    bridge retries, and once the server starts every event is stored once, in order."""
    server = NatsServer(tmp_path / "nats")  # its port chosen, nothing listening yet
    processes.append(server)
    events, seed = 12_000, 23
    expected = expected_streams(events, seed, PIPES)
    local = [p for p in range(PIPES) if p not in REMOTE]
    with ReplayServer(ReplayOptions(events=events, seed=seed, rate=6_000)) as feed:
        balancer = remote_balancer(tmp_path, feed.url, server.url)
        processes.append(balancer)
        balancer.wait_for(
            lambda: all(len(read_records(balancer.records, p)) >= len(expected[p]) for p in local),
            timeout=60,
            what="every local event while JetStream is down",
        )
        balancer.wait_for(lambda: "JetStream at" in balancer.log_text(), 20, "the warning")
        time.sleep(3)  # more attempts, which must not be logged
        log = balancer.log_text()
        assert (
            f"cannot connect to JetStream at {server.url} (" in log
            and "partitions 2,3 are not read meanwhile, so their pipes fill and the balancer "
            "keeps their events in its backlog; retrying every 0.25 s. Start the server, or "
            "correct jetstream.servers"
            in log
        ), log[-3000:]
        assert log.count("cannot connect to JetStream") == 1  # not one per attempt
        backlogs = re.findall(r"largest backlog ([\d.]+) (KiB|MiB) \(worker 1\)", log)
        assert backlogs, "the balancer held no backlog for the bridge"
        assert "not delivered" not in log and "dropped" not in log
        server.start()
        balancer.wait_for(
            lambda: "connected to JetStream at" in balancer.log_text(), 30, "the connection"
        )
        balancer.wait_for(
            lambda: stored_count(server.url) >= sum(len(expected[p]) for p in REMOTE),
            timeout=60,
            what="every remote event stored",
        )
        assert balancer.stop() == 0, balancer.log_text()[-3000:]
    stored = asyncio.run(read_stream(server.url))
    for partition in REMOTE:
        got = [event for _, batch in stored[partition] for event in batch]
        assert got == expected[partition], f"partition {partition}: lost, twice or out of order"
    assert "stopped: all 12,000 events delivered" in balancer.log_text()


def stored_count(url: str) -> int:
    """The events stored in stream "tb" so far (0 before it exists)."""
    try:
        stored = asyncio.run(read_stream(url))
    except Exception:
        return 0
    return sum(len(batch) for batches in stored.values() for _, batch in batches)


@pytest.mark.timeout(30)
def test_a_bridge_still_connecting_stops_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM while no server answers ends the bridge at once, exit 0, having read nothing."""
    server = NatsServer(tmp_path / "nats")  # never started
    read, write = os.pipe()
    argv = [
        *(sys.executable, "-m", "tradebalancer.bridge", "--servers", server.url),
        *("--stream", "tb", "--subject-prefix", "tb.feed", "--partitions", "0"),
    ]
    env = environment() | {"TRADEBALANCER_FDS": str(read)}
    bridge = subprocess.Popen(argv, pass_fds=(read,), env=env, stderr=subprocess.PIPE)
    os.write(write, b"\x02\x00\x00\x00{}")
    time.sleep(2.0)
    bridge.send_signal(signal.SIGTERM)
    _, stderr = bridge.communicate(timeout=10)
    assert bridge.returncode == 0, stderr
    assert "SIGTERM before JetStream was reached" in stderr.decode()
    os.set_blocking(read, False)
    assert os.read(read, 100) == b"\x02\x00\x00\x00{}"  # still there for the balancer to count
    os.close(read)
    os.close(write)


def user_seed(path: Path) -> str:
    """Write a new user NKey seed to ``path`` (mode 0600); return its public key, "U..."."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


@pytest.mark.timeout(60)
def test_an_nkey_seed_authenticates_the_bridge_and_the_reader(tmp_path: Path) -> None:
    """A user NKey seed the server lists lets the bridge publish and the reader read (nats-py
    signs the nonce through nkeys); another seed is refused, exit 77, its secret not shown."""
    right, wrong = tmp_path / "right.nk", tmp_path / "wrong.nk"
    server = NatsServer(tmp_path / "nats", nkeys=[user_seed(right)]).start()
    user_seed(wrong)
    event = b'{"ev":"T","sym":"AAPL"}'
    try:
        for seed, code in [(wrong, 77), (right, 0)]:
            read, write = os.pipe()
            os.write(write, len(event).to_bytes(4, "little") + event)
            os.close(write)
            argv = [
                *(sys.executable, "-m", "tradebalancer.bridge", "--servers", server.url),
                *("--stream", "tb", "--subject-prefix", "tb.feed", "--partitions", "0"),
                *("--credentials", str(seed)),
            ]
            env = environment() | {"TRADEBALANCER_FDS": str(read)}
            bridge = subprocess.run(
                argv, pass_fds=(read,), env=env, capture_output=True, timeout=30, check=False
            )
            os.close(read)
            assert bridge.returncode == code, bridge.stderr
            assert seed.read_text().strip() not in bridge.stderr.decode()
            if code:
                assert f"refused the credentials ({wrong})" in bridge.stderr.decode()
        source = JetStreamSource(
            [server.url], stream="tb", durable="d", partitions=[0], credentials=str(right)
        )
        with source:
            assert next(source.batches()) == (0, [event])
    finally:
        server.kill()
