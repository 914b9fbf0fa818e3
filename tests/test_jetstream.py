"""Remote partitions end to end: replay feed -> balancer -> bridge -> NATS JetStream -> readers.

Real parts only: nats-server processes on 127.0.0.1 (tests/natsserver.py; killed with SIGKILL),
the replay feed, the balancer with its bridge worker, and remote workers (tests/jsworker.py)
reading with tradebalancer.reader.jetstream. Each test compares every event, per partition and
in order, with what the feed sent.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest
from natsserver import NatsServer, cluster, environment
from test_service import Balancer, expected_streams, read_records

from tradebalancer.reader import ReaderError
from tradebalancer.reader.format import EVENT_HEADER
from tradebalancer.reader.jetstream import Cursor, JetStreamSource, connect_options
from tradebalancer.replay import ReplayOptions, ReplayServer

WORKER = Path(__file__).resolve().parent / "jsworker.py"
PIPES = 4
REMOTE = [2, 3]


class RemoteWorker:
    """tests/jsworker.py as a process: a worker host reading partitions from JetStream."""

    def __init__(self, tmp_path: Path, servers: str, durable: str, *extra: str) -> None:
        self.records = tmp_path / f"remote-{durable}"
        self.log = tmp_path / f"remote-{durable}.log"
        self.argv = [
            *(sys.executable, str(WORKER), "--servers", servers, "--stream", "tb"),
            *("--durable", durable, "--partitions", ",".join(map(str, REMOTE))),
            *("--records", str(self.records), "--cursor", str(tmp_path / f"{durable}.cursor")),
        ]
        self.process = self.start(*extra)

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*self.argv, *extra], stdout=log, stderr=subprocess.STDOUT, env=environment()
            )
        return self.process

    def events(self, partition: int) -> list[bytes]:
        path = self.records / f"partition-{partition}.bin"
        if not path.exists():
            return []
        data, messages, offset = path.read_bytes(), [], 0
        while offset + 4 <= len(data):
            length = int.from_bytes(data[offset : offset + 4], "little")
            messages.append(data[offset + 4 : offset + 4 + length])
            offset += 4 + length
        return messages

    def count(self) -> int:
        return sum(len(self.events(p)) for p in REMOTE)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(20)


@pytest.fixture
def processes() -> Iterator[list[object]]:
    """Servers, balancers and remote workers a test starts: killed at the end if still running."""
    started: list[object] = []
    yield started
    for thing in reversed(started):
        if isinstance(thing, NatsServer):
            thing.kill()
        else:
            process = thing.process  # type: ignore[attr-defined]
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def stream_leader(url: str) -> str:
    """The name of the server that leads stream "tb"."""
    connection = await nats.connect(url)
    try:
        info = await connection.jetstream().stream_info("tb")
        assert info.cluster is not None and info.cluster.leader is not None
        return info.cluster.leader
    finally:
        await connection.close()


def remote_balancer(
    tmp_path: Path, url: str, servers: str, extra: str = "", feed_extra: str = ""
) -> Balancer:
    """The balancer with partitions 2 and 3 on JetStream (stream "tb"), 0 and 1 on pipes;
    ``extra`` goes into the jetstream table, ``feed_extra`` into the feed's."""
    return Balancer(
        tmp_path,
        url,
        pipes=PIPES,
        workers=1,
        extra=(
            feed_extra
            + f"\n[feeds.feed.jetstream]\nservers = {servers.split(',')!r}\n".replace("'", '"')
            + f'stream = "tb"\nsubject_prefix = "tb.feed"\npartitions = {REMOTE}\n{extra}'
        ),
        environ={"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent)])},
    )


def assert_all_once_in_order(
    balancer: Balancer, remote: RemoteWorker, expected: dict[int, list[bytes]]
) -> None:
    for partition, events in expected.items():
        if partition in REMOTE:
            got = remote.events(partition)
        else:
            got = read_records(balancer.records, partition)
        assert len(got) == len(events), f"partition {partition}: {len(got)} of {len(events)}"
        assert got == events, f"partition {partition}: events differ or are out of order"


def run_feed(
    tmp_path: Path,
    processes: list[object],
    servers: list[NatsServer],
    *,
    events: int,
    seed: int,
    rate: float | None = None,
    during: Callable[[Balancer, RemoteWorker], None] | None = None,
    replicas: int = 1,
    worker_args: tuple[str, ...] = (),
) -> tuple[Balancer, RemoteWorker]:
    """Stream ``events`` through a remote balancer to one remote worker; ``during`` meddles."""
    urls = ",".join(server.url for server in servers)
    options = ReplayOptions(events=events, seed=seed, rate=rate)
    with ReplayServer(options) as feed:
        jetstream = f"replicas = {replicas}\npublish_timeout = 2.0"
        balancer = remote_balancer(tmp_path, feed.url, urls, jetstream)
        processes.append(balancer)
        wait_until(lambda: "JetStream stream tb" in balancer.log_text(), "the stream", 30)
        remote = RemoteWorker(tmp_path, urls, "w1", *worker_args)
        processes.append(remote)
        if during is not None:
            during(balancer, remote)
        total = sum(len(expected) for expected in expected_streams(events, seed, PIPES).values())
        local = [0, 1]
        balancer.wait_for(
            lambda: (
                remote.count() + sum(len(read_records(balancer.records, p)) for p in local) >= total
            ),
            timeout=90,
            what="every event, local and remote",
        )
        time.sleep(0.5)  # a duplicate would arrive now
        remote.stop()
        assert balancer.stop() == 0
    return balancer, remote


@pytest.mark.timeout(120)
def test_every_event_reaches_the_remote_reader_once_in_order(
    tmp_path: Path, processes: list[object]
) -> None:
    """Partitions 2 and 3 through JetStream arrive whole and in order, 0 and 1 on their pipes."""
    server = NatsServer(tmp_path / "nats").start()
    processes.append(server)
    balancer, remote = run_feed(tmp_path, processes, [server], events=30_000, seed=3)
    assert_all_once_in_order(balancer, remote, expected_streams(30_000, 3, PIPES))
    log = balancer.log_text()
    assert "created JetStream stream tb (tb.feed.>, file storage, replicas 1)" in log
    assert "all pipes closed; " in log


@pytest.mark.timeout(150)
def test_a_jetstream_server_killed_and_restarted_mid_stream_loses_nothing(
    tmp_path: Path, processes: list[object]
) -> None:
    """The only server killed mid-stream, restarted on its file store 2 s later: all arrive once."""
    server = NatsServer(tmp_path / "nats").start()
    processes.append(server)

    def crash(balancer: Balancer, remote: RemoteWorker) -> None:
        wait_until(lambda: remote.count() > 3_000, "the first events remotely")
        server.kill()
        time.sleep(2)
        server.start()

    balancer, remote = run_feed(
        tmp_path, processes, [server], events=40_000, seed=5, rate=8_000, during=crash
    )
    assert_all_once_in_order(balancer, remote, expected_streams(40_000, 5, PIPES))
    assert "not acknowledged" in balancer.log_text() or "disconnected" in balancer.log_text()


@pytest.mark.timeout(170)
def test_a_three_server_cluster_with_replicas_3_survives_a_killed_server(
    tmp_path: Path, processes: list[object]
) -> None:
    """The stream's leader of three killed mid-stream: nothing lost, no remote gap over 10 s."""
    servers = [server.start() for server in cluster(tmp_path / "nats")]
    processes.extend(servers)
    wait_until(lambda: all("JetStream cluster" in s.log.read_text() for s in servers), "cluster")
    time.sleep(1.0)  # a meta leader elected

    def crash(balancer: Balancer, remote: RemoteWorker) -> None:
        wait_until(lambda: remote.count() > 3_000, "the first events remotely")
        leader = asyncio.run(stream_leader(servers[0].url))
        next(server for server in servers if server.name == leader).kill()

    balancer, remote = run_feed(
        tmp_path, processes, servers, events=40_000, seed=9, rate=8_000, during=crash, replicas=3
    )
    assert_all_once_in_order(balancer, remote, expected_streams(40_000, 9, PIPES))
    for partition in REMOTE:
        times = (remote.records / f"times-{partition}.txt").read_text().split()
        gaps = [int(b) - int(a) for a, b in itertools.pairwise(times)]
        assert max(gaps) < 10e9, f"partition {partition}: a pause of {max(gaps) / 1e9:.1f} s"


@pytest.mark.timeout(150)
def test_a_remote_worker_killed_in_its_code_and_restarted_gets_each_event_once(
    tmp_path: Path, processes: list[object]
) -> None:
    """A worker killed while handed its 5,000th event resumes there: no loss, no duplicate."""
    server = NatsServer(tmp_path / "nats").start()
    processes.append(server)
    killed_at = 5_000

    def crash(balancer: Balancer, remote: RemoteWorker) -> None:
        remote.process.wait(60)
        assert remote.process.returncode == -signal.SIGKILL
        assert remote.count() == killed_at - 1
        remote.start()

    balancer, remote = run_feed(
        tmp_path,
        processes,
        [server],
        events=30_000,
        seed=13,
        rate=10_000,
        during=crash,
        worker_args=("--crash-at", str(killed_at)),
    )
    assert_all_once_in_order(balancer, remote, expected_streams(30_000, 13, PIPES))


@pytest.mark.timeout(60)
def test_wrong_credentials_and_a_missing_stream_are_clear_errors(
    tmp_path: Path, processes: list[object]
) -> None:
    """A refused password and an unknown stream each raise a ReaderError saying what to do."""
    server = NatsServer(tmp_path / "nats", users={"tb": "right"}).start()
    processes.append(server)
    wrong = tmp_path / "wrong.creds"
    wrong.write_text("tb:wrong-Secret-7\n")
    right = tmp_path / "right.creds"
    right.write_text("tb:right\n")
    source = JetStreamSource(
        [server.url], stream="tb", durable="d", partitions=[0], credentials=str(wrong)
    )
    with pytest.raises(ReaderError) as refused, source:
        pass
    assert f"cannot connect to JetStream at {server.url} with credentials {wrong}" in str(
        refused.value
    )
    assert "wrong-Secret-7" not in str(refused.value)
    source = JetStreamSource(
        [server.url], stream="nope", durable="d", partitions=[0], credentials=str(right)
    )
    with pytest.raises(ReaderError) as missing, source:
        pass
    assert "no JetStream stream 'nope'" in str(missing.value)
    assert "start the balancer first" in str(missing.value)


@pytest.mark.timeout(60)
def test_the_bridge_names_refused_credentials_and_a_missing_stream_it_may_not_create(
    tmp_path: Path, processes: list[object]
) -> None:
    """The bridge exits 77 on a refused password and 78 on a missing stream with create = false."""
    server = NatsServer(tmp_path / "nats", users={"tb": "right"}).start()
    processes.append(server)
    for password, create, code, message in [
        ("wrong-Secret-7", True, 77, "refused the credentials"),
        ("right", False, 78, "no JetStream stream 'tb' and jetstream.create is false"),
    ]:
        creds = tmp_path / "nats.creds"
        creds.write_text(f"tb:{password}\n")
        read, write = os.pipe()
        argv = [
            *(sys.executable, "-m", "tradebalancer.bridge", "--servers", server.url),
            *("--stream", "tb", "--subject-prefix", "tb.feed", "--partitions", "0"),
            *("--credentials", str(creds)),
            *(() if create else ("--no-create",)),
        ]
        env = environment() | {"TRADEBALANCER_FDS": str(read)}
        bridge = subprocess.run(
            argv, pass_fds=(read,), env=env, capture_output=True, timeout=30, check=False
        )
        os.close(read)
        os.close(write)
        assert bridge.returncode == code, bridge.stderr
        assert message in bridge.stderr.decode()
        assert "wrong-Secret-7" not in bridge.stderr.decode()


def test_the_cursor_survives_a_reopen_and_never_moves_back(tmp_path: Path) -> None:
    """Skips what was handed over, in older messages all of it, and ignores a step backwards."""
    cursor = Cursor(str(tmp_path / "cursor"))
    cursor.write(7, 3)
    cursor.write(5, 10)  # a redelivered older message, skipped whole: no step back
    cursor.close()
    cursor = Cursor(str(tmp_path / "cursor"))
    assert (cursor.sequence, cursor.done) == (7, 3)
    assert [cursor.skip(6, 4), cursor.skip(7, 10), cursor.skip(7, 2), cursor.skip(8, 5)] == [
        4,
        3,
        2,
        0,
    ]
    cursor.close()
    assert (Cursor(None).sequence, Cursor(None).skip(1, 5)) == (0, 0)


@pytest.mark.parametrize(
    ("text", "options"),
    [
        ("-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n", "creds"),
        ("tb:Pa:ss\n", {"user": "tb", "password": "Pa:ss"}),
        ("s3cr3t-token\n", {"token": "s3cr3t-token"}),
        ("SU" + "A" * 56 + "\n", "seed"),
    ],
)
def test_a_credentials_file_gives_the_connect_options(
    tmp_path: Path, text: str, options: object
) -> None:
    """A .creds file or an NKey seed is passed by path; one line is USER:PASSWORD or a token."""
    path = tmp_path / "nats.creds"
    path.write_text(text)
    by_path = {"creds": {"user_credentials": str(path)}, "seed": {"nkeys_seed": str(path)}}
    expected = by_path[options] if isinstance(options, str) else options
    assert connect_options(str(path)) == expected


def test_an_unusable_credentials_file_is_named_without_its_secret(tmp_path: Path) -> None:
    """Two lines that are not a .creds file, or no file, raise a ReaderError naming the path."""
    path = tmp_path / "nats.creds"
    path.write_text("user:Secret-1\nmore\n")
    with pytest.raises(ReaderError, match=r"must be a \.creds file or one line") as caught:
        connect_options(str(path))
    assert "Secret-1" not in str(caught.value)
    with pytest.raises(ReaderError, match="cannot read the NATS credentials file"):
        connect_options(str(tmp_path / "missing"))


@pytest.mark.timeout(60)
def test_the_bridge_publishes_what_came_before_a_pipe_that_breaks_the_framing(
    tmp_path: Path, processes: list[object]
) -> None:
    """Events before a frame that is not the balancer's are published, then the bridge exits 71."""
    server = NatsServer(tmp_path / "nats").start()
    processes.append(server)
    read, write = os.pipe()
    event = b'{"ev":"T","sym":"AAPL"}'
    os.write(write, len(event).to_bytes(4, "little") + event + b"\x05\x00\x00\x00hello")
    os.close(write)
    argv = [
        *(sys.executable, "-m", "tradebalancer.bridge", "--servers", server.url),
        *("--stream", "tb", "--subject-prefix", "tb.feed", "--partitions", "0"),
    ]
    env = environment() | {"TRADEBALANCER_FDS": str(read)}
    bridge = subprocess.run(
        argv, pass_fds=(read,), env=env, capture_output=True, timeout=30, check=False
    )
    os.close(read)
    assert bridge.returncode == 71, bridge.stderr
    assert "is this fd one of the balancer's pipes?" in bridge.stderr.decode()
    source = JetStreamSource([server.url], stream="tb", durable="d", partitions=[0])
    with source:
        assert next(source.batches()) == (0, [event])


@pytest.mark.timeout(60)
def test_a_jump_in_the_event_numbers_is_logged_and_counted_as_missing(
    tmp_path: Path, processes: list[object], caplog: pytest.LogCaptureFixture
) -> None:
    """Batches numbered 1-3, 4-6 and 9-10 of a partition: events 7-8 are named missing."""
    server = NatsServer(tmp_path / "nats").start()
    processes.append(server)

    def batch(*events: bytes) -> bytes:
        return b"".join(len(event).to_bytes(4, "little") + event for event in events)

    sent = [[b'{"n":%d}' % n for n in numbers] for numbers in ([1, 2, 3], [4, 5, 6], [9, 10])]

    async def publish() -> None:
        connection = await nats.connect(server.url)
        js = connection.jetstream()
        await js.add_stream(name="tb", subjects=["tb.feed.>"])
        for events in sent:
            last = int(events[-1][5:-1])
            await js.publish("tb.feed.1", batch(*events), headers={EVENT_HEADER: str(last)})
        await js.publish("tb.feed.1", batch(b'{"n":0}'))  # no number: nothing to check
        await js.publish("tb.feed.1", batch(b'{"n":0}'), headers={EVENT_HEADER: "\u00b2"})
        await connection.close()

    asyncio.run(publish())
    caplog.set_level("WARNING", logger="tradebalancer.reader.jetstream")
    with JetStreamSource([server.url], stream="tb", durable="d", partitions=[1]) as source:
        got = list(itertools.islice(source.batches(), 5))
    assert got == [(1, events) for events in [*sent, [b'{"n":0}'], [b'{"n":0}']]]
    assert source.missing == {1: 2}
    assert [record.getMessage() for record in caplog.records] == [
        "2 event(s) of partition 1 are missing from stream tb (numbers 7-8): lost before "
        "JetStream stored them (the balancer counted them as not delivered), or discarded by "
        "the stream's max_age or max_bytes before this reader got to them"
    ]
