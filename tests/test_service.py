"""The whole balancer as a user runs it: replay feed -> `tradebalancer run` -> worker processes.

Real parts only: the replay feed on 127.0.0.1 (ws, and wss with a test CA), the balancer as a
child process, its real pipes and real worker processes (bench/sink.py, which records every
message it reads). Every test counts and compares every event against the source.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from tlsca import make_ca, make_wrong_host_cert

from tradebalancer.errors import ExitCode
from tradebalancer.replay import ReplayOptions, ReplayServer, synth
from tradebalancer.routing import pipe_for

REPO = Path(__file__).resolve().parent.parent
SINK = REPO / "bench" / "sink.py"
KEY = "test-key-1234"


def expected_streams(events: int, seed: int, pipes: int) -> dict[int, list[bytes]]:
    """What each pipe must carry, from the source frames and an independent splitter."""
    streams: dict[int, list[bytes]] = {p: [] for p in range(pipes)}
    for frame in synth.generate_frames(seed=seed, count_events=events):
        for event in synth.split_events(frame):
            symbol = orjson.loads(event)["sym"]
            streams[pipe_for(symbol.encode(), pipes)].append(event)
    return streams


def read_records(directory: Path, pipe: int) -> list[bytes]:
    path = directory / f"pipe-{pipe}.bin"
    if not path.exists():
        return []
    data = path.read_bytes()
    messages, offset = [], 0
    while offset + 4 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "little")
        messages.append(data[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return messages


class Balancer:
    """`tradebalancer run feed` as a child process, with its config and log in tmp_path."""

    def __init__(
        self,
        tmp_path: Path,
        url: str,
        *,
        pipes: int = 4,
        workers: int = 2,
        extra: str = "",
        sink_args: str = "",
        key: str = KEY,
        environ: dict[str, str] | None = None,
        subscribe: str = '["T.*"]',
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.tmp_path = tmp_path
        self.records = tmp_path / "records"
        self.log = tmp_path / "balancer.log"
        sink = (
            f'["{{{{ python }}}}", "{SINK}", "--pipes", "{{{{ pipes | join(\',\') }}}}", '
            f'"--pipe-count", "{{{{ pipe_count }}}}", "--report", '
            f'"{{{{ workdir }}}}/report-{{{{ worker }}}}.json", "--record", "{self.records}"'
            f"{sink_args}]"
        )
        config = tmp_path / "tradebalancer.toml"
        config.write_text(
            f"""
[feeds.feed]
url = "{url}"
subscribe = {subscribe}
api_key_file = ""
pipes = {pipes}
workers = {workers}
pipe_size = 65536
working_directory = "{tmp_path}"
command = {sink}
stats_interval = 0.5
reconnect.initial = 0.05
reconnect.max = 0.2
worker_restart.initial = 0.05
{extra}
"""
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MASSIVE", "POLYGON"))}
        env["MASSIVE_API_KEY"] = key
        env["PYTHONPATH"] = str(REPO)
        env.update(environ or {})
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    *prefix,
                    sys.executable,
                    *("-m", "tradebalancer", "--config", str(config), "run", "feed"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate: object, timeout: float = 60.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            if self.process.poll() is not None:
                raise AssertionError(
                    f"balancer exited {self.process.returncode}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log_text()[-4000:]}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"balancer did not stop:\n{self.log_text()}") from None


def delivered(balancer: Balancer, pipes: int) -> int:
    return sum(len(read_records(balancer.records, p)) for p in range(pipes))


def assert_every_event_once(balancer: Balancer, expected: dict[int, list[bytes]]) -> None:
    for pipe, events in expected.items():
        got = read_records(balancer.records, pipe)
        assert len(got) == len(events), f"pipe {pipe}: {len(got)} events, expected {len(events)}"
        assert got == events, f"pipe {pipe}: events differ or are out of order"


@pytest.mark.timeout(180)
def test_wss_every_event_once_in_order_across_a_disconnect_mid_frame(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """Over wss, across a server cut mid-frame, every event arrives once, in order, on its pipe."""
    ca, cert, key = make_ca(tmp_path)
    events, seed, pipes = 30_000, 7, 4
    options = ReplayOptions(
        certfile=str(cert),
        keyfile=str(key),
        accept_keys=frozenset({KEY}),
        events=events,
        seed=seed,
        disconnect_after=11_000,
        ping_interval=0.5,
    )
    with ReplayServer(options) as server:
        url = server.url.replace("127.0.0.1", "localhost")
        balancer = Balancer(tmp_path, url, pipes=pipes, extra=f'ca_file = "{ca}"')
        balancers.append(balancer)
        balancer.wait_for(lambda: delivered(balancer, pipes) >= events, what="every event")
        assert balancer.stop() == 0
        assert server.stats.forced_disconnects == 1
    log = balancer.log_text()
    assert_every_event_once(balancer, expected_streams(events, seed, pipes))
    assert log.count("authenticated; subscribing") >= 2
    assert "reconnecting in" in log
    assert "TLS: user" in log
    assert "kernel TLS not used" in log  # this kernel has no tls module: one warning says why
    assert KEY not in log


@pytest.mark.timeout(180)
def test_ws_fragmented_messages_and_a_worker_crash_lose_nothing_in_the_pipes(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """A crashed worker is restarted on its pipes, which still hold every event it had not read."""
    events, seed, pipes = 30_000, 11, 4
    marker = tmp_path / "crashed"
    options = ReplayOptions(accept_keys=frozenset({KEY}), events=events, seed=seed, fragment=True)
    with ReplayServer(options) as server:
        balancer = Balancer(
            tmp_path,
            server.url,
            pipes=pipes,
            sink_args=(
                ', "--crash-after={{ 3000 if worker == 0 else 0 }}", '
                f'"--crash-once", "{marker}"'
            ),
        )
        balancers.append(balancer)
        expected = expected_streams(events, seed, pipes)
        lost_at_most = 2  # worker 0 may die holding the head of one message on each of its pipes

        balancer.wait_for(
            lambda: delivered(balancer, pipes) >= events - lost_at_most and marker.exists(),
            what="every event after the crash",
        )
        time.sleep(0.5)
        assert balancer.stop() == 0
    log = balancer.log_text()
    assert "worker 0 (pid" in log and "exited with status 1; restarting it" in log
    assert "worker 0 restarted" in log
    for pipe, events_of_pipe in expected.items():
        got = read_records(balancer.records, pipe)
        skipped_file = balancer.records / f"skipped-{pipe}.bin"
        skipped = skipped_file.read_bytes() if skipped_file.exists() else b""
        if got == events_of_pipe:
            assert skipped == b""
            continue
        # Exactly one message is missing: the one the dead worker had begun to read. Its
        # successor skipped precisely the rest of it, to the next boundary.
        assert len(got) == len(events_of_pipe) - 1, f"pipe {pipe}"
        index = next(
            (i for i, (a, b) in enumerate(zip(got, events_of_pipe, strict=False)) if a != b),
            len(got),
        )
        assert got == events_of_pipe[:index] + events_of_pipe[index + 1 :]
        missing = events_of_pipe[index]
        framed = len(missing).to_bytes(4, "little") + missing
        assert skipped and framed.endswith(skipped) and skipped != framed


@pytest.mark.timeout(60)
def test_auth_failure_exits_77_without_a_reconnect_loop(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """A refused API key stops the service with exit code 77 after one attempt."""
    options = ReplayOptions(accept_keys=frozenset({KEY}), events=100)
    with ReplayServer(options) as server:
        balancer = Balancer(tmp_path, server.url, key="wrong-key")
        balancers.append(balancer)
        assert balancer.process.wait(30) == 77
        assert server.stats.auth_failures == 1
    log = balancer.log_text()
    assert "refused the API key" in log
    assert "wrong-key" not in log


class NotifySocket:
    """A NOTIFY_SOCKET as systemd listens on it: a datagram socket collecting the messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def collect(self) -> list[str]:
        """Every message that arrived so far."""
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def ready(self) -> str | None:
        """The READY=1 message, if it came."""
        return next((m for m in self.collect() if "READY=1" in m.splitlines()), None)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    notify = NotifySocket(tmp_path / "notify")
    yield notify
    notify.sock.close()


def test_ready_waits_for_the_subscription(
    tmp_path: Path, balancers: list[Balancer], notify_socket: NotifySocket
) -> None:
    """READY=1 comes once the feed streams, with a STATUS line that says so."""
    with ReplayServer(ReplayOptions(accept_keys=frozenset({KEY}), rate=1000.0)) as server:
        balancer = Balancer(
            tmp_path, server.url, environ={"NOTIFY_SOCKET": str(notify_socket.path)}
        )
        balancers.append(balancer)
        balancer.wait_for(lambda: notify_socket.ready() is not None, what="READY=1")
        ready = notify_socket.ready()
        assert ready is not None and f"STATUS=streaming: {server.url}" in ready
        assert balancer.stop() == 0
    assert "STOPPING=1" in notify_socket.collect()[-1].splitlines()


def test_ready_comes_while_the_feed_is_down(
    tmp_path: Path, balancers: list[Balancer], notify_socket: NotifySocket
) -> None:
    """With the feed unreachable, READY=1 still comes (systemctl start returns), saying so."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now: connection refused
    balancer = Balancer(
        tmp_path,
        f"ws://127.0.0.1:{port}/stocks",
        environ={"NOTIFY_SOCKET": str(notify_socket.path)},
    )
    balancers.append(balancer)
    balancer.wait_for(lambda: notify_socket.ready() is not None, what="READY=1")
    ready = notify_socket.ready()
    assert ready is not None and "STATUS=reconnecting:" in ready
    assert balancer.stop() == 0


def test_a_name_whose_first_address_refuses_connects_to_the_next(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """A host name with two addresses, the first refusing (as "localhost" is ::1 and then
    127.0.0.1 on most machines): the connect moves on to the second and streams.

    The second address's socket gets the number of the first, just closed; the loop watched the
    connection by number, saw "the same fd, the same events" and never registered the new
    socket with the epoll, so every attempt timed out.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /etc/hosts")
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 feed.test\n127.0.0.1 feed.test\n")  # nothing listens on ::1
    private_hosts = ("unshare", "--mount", "--propagation", "private", "sh", "-c")
    script = f'mount --bind "{hosts}" /etc/hosts && exec "$@"'
    events, seed = 2000, 17
    with ReplayServer(
        ReplayOptions(accept_keys=frozenset({KEY}), events=events, seed=seed)
    ) as server:
        url = server.url.replace("127.0.0.1", "feed.test")
        assert url != server.url
        balancer = Balancer(
            tmp_path, url, pipes=3, workers=1, prefix=(*private_hosts, script, "sh")
        )
        balancers.append(balancer)
        balancer.wait_for(lambda: delivered(balancer, 3) >= events, 60, "every event")
        assert balancer.stop() == 0
    assert "timed out" not in balancer.log_text()
    assert_every_event_once(balancer, expected_streams(events, seed, 3))


def test_a_refused_key_exits_77_before_ready(
    tmp_path: Path, balancers: list[Balancer], notify_socket: NotifySocket
) -> None:
    """A refused key ends the process before READY=1, so `systemctl start` fails at once."""
    with ReplayServer(ReplayOptions(accept_keys=frozenset({KEY}), events=100)) as server:
        balancer = Balancer(
            tmp_path,
            server.url,
            key="wrong-key",
            environ={"NOTIFY_SOCKET": str(notify_socket.path)},
        )
        balancers.append(balancer)
        assert balancer.process.wait(30) == 77
    assert notify_socket.ready() is None
    assert notify_socket.messages, "the balancer sent nothing at all: is NOTIFY_SOCKET used?"


def test_a_feed_gone_while_the_balancer_answers_it_is_a_reconnect(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """The feed says "connected" and resets the connection: the auth send fails, and the
    balancer reconnects instead of stopping (it stopped before, on the EPIPE)."""
    import struct
    import threading

    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            protocol = ServerProtocol()
            request = None
            while request is None and (data := conn.recv(65536)):
                protocol.receive_data(data)
                events = protocol.events_received()
                request = next((e for e in events if isinstance(e, Request)), None)
            if request is not None:
                protocol.send_response(protocol.accept(request))
                protocol.send_text(b'[{"ev":"status","status":"connected","message":"hi"}]')
                conn.sendall(b"".join(protocol.data_to_send()))
            # A reset right behind "connected": the balancer's answer meets a dead socket.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        balancer = Balancer(tmp_path, f"ws://127.0.0.1:{port}/stocks")
        balancers.append(balancer)
        balancer.wait_for(lambda: len(accepted) >= 3, what="three connection attempts")
        assert balancer.process.poll() is None, balancer.log_text()
        assert balancer.stop() == 0
    finally:
        listener.close()
    assert "reconnecting" in balancer.log_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("problem", ["unknown CA", "wrong host"])
def test_a_certificate_that_does_not_verify_is_refused(
    tmp_path: Path, balancers: list[Balancer], problem: str
) -> None:
    """An untrusted CA or a certificate for another host is refused, logged, never used."""
    ca, cert, key = make_ca(tmp_path)
    extra = f'ca_file = "{ca}"'
    if problem == "wrong host":
        cert, key = make_wrong_host_cert(tmp_path)
    else:
        extra = ""  # the system store does not know the test CA
    options = ReplayOptions(certfile=str(cert), keyfile=str(key), events=100)
    with ReplayServer(options) as server:
        url = server.url.replace("127.0.0.1", "localhost")
        balancer = Balancer(tmp_path, url, extra=extra)
        balancers.append(balancer)
        balancer.wait_for(lambda: "cannot connect" in balancer.log_text(), what="the refusal")
        assert server.stats.events_sent == 0
        assert balancer.stop() == 0
    log = balancer.log_text()
    assert "certificate" in log or "hostname" in log


@pytest.mark.timeout(120)
def test_a_slow_worker_causes_backpressure_not_loss(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """Past the backlog limit the balancer stops reading, says who is behind, loses nothing."""
    events, seed, pipes = 20_000, 5, 2
    options = ReplayOptions(accept_keys=frozenset({KEY}), events=events, seed=seed)
    with ReplayServer(options) as server:
        balancer = Balancer(
            tmp_path,
            server.url,
            pipes=pipes,
            workers=2,
            extra="backlog_limit = 65536\nbatch_bytes = 65536",
            sink_args=', "--delay={{ 0.05 if worker == 1 else 0 }}"',
        )
        balancers.append(balancer)
        balancer.wait_for(lambda: delivered(balancer, pipes) >= events, what="every event")
        assert balancer.stop() == 0
    log = balancer.log_text()
    assert "backpressure:" in log and "worker 1 is behind" in log
    assert_every_event_once(balancer, expected_streams(events, seed, pipes))
    # Told as episodes: it was a WARNING and an INFO line at every pause, five a second.
    lines = [line for line in log.splitlines() if "backpressure" in line]
    starts = [line for line in lines if "backpressure: " in line]
    ticks = sum("tradebalancer.status:" in line for line in log.splitlines())
    assert len(lines) <= 2 * len(starts) + ticks, "\n".join(lines)
    pauses = [re.search(r"reading paused (once|[\d,]+ times)", line) for line in lines]
    paused = sum(1 if m[1] == "once" else number(m[1].split()[0]) for m in pauses if m)
    assert len(starts) < paused, "\n".join(lines)  # many pauses, few episodes


@pytest.mark.timeout(60)
def test_sigterm_flushes_and_workers_see_end_of_file(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """On SIGTERM the workers get every event already received, then end of file, and exit 0."""
    options = ReplayOptions(accept_keys=frozenset({KEY}), rate=20_000)
    with ReplayServer(options) as server:
        balancer = Balancer(tmp_path, server.url)
        balancers.append(balancer)
        balancer.wait_for(lambda: delivered(balancer, 4) > 2000, what="streaming")
        assert balancer.stop() == 0
    reports = [orjson.loads((tmp_path / f"report-{w}.json").read_bytes()) for w in range(2)]
    total = sum(p["count"] for r in reports for p in r["pipes"].values())
    assert total == delivered(balancer, 4) > 2000
    log = balancer.log_text()
    assert "SIGTERM received: stopping" in log
    assert f"stopped: all {total:,} events delivered (worker 0 " in log
    assert "worker 0 exited with status 0" in log and "worker 1 exited with status 0" in log


@pytest.mark.timeout(60)
def test_frames_that_are_not_arrays_of_objects_are_dropped_and_the_rest_delivered(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """Bad frames are counted and logged (an excerpt), never forwarded, never fatal."""
    import threading

    from websockets.sync.server import ServerConnection, serve

    good = [
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":10},{"ev":"T","sym":"MSFT","p":2,"s":5}]',
        b'[ {"sym": "IB\\u004d", "ev": "T", "note": "},{ [x]"} ]',  # an escaped key: slow path
    ]

    done = threading.Event()

    def handler(ws: ServerConnection) -> None:
        ws.send('[{"ev":"status","status":"connected","message":"Connected Successfully"}]')
        ws.recv()
        ws.send('[{"ev":"status","status":"auth_success","message":"authenticated"}]')
        ws.recv()
        ws.send('[{"ev":"status","status":"success","message":"subscribed to: T.*"}]')
        ws.send(good[0].decode())
        ws.send("this is not JSON at all")
        ws.send("[1, 2, 3]")
        ws.send('[{"ev":"T","sym":"TRUNC"')
        ws.send(good[1].decode())
        done.wait(30)

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        port = server.socket.getsockname()[1]
        balancer = Balancer(tmp_path, f"ws://127.0.0.1:{port}/stocks", pipes=3, workers=1)
        balancers.append(balancer)
        balancer.wait_for(lambda: delivered(balancer, 3) >= 3, what="the good events")
        balancer.wait_for(lambda: "rejected 3" in balancer.log_text(), what="the stats line")
        assert balancer.stop() == 0
        done.set()
        server.shutdown()
    got = sorted(m for p in range(3) for m in read_records(balancer.records, p))
    assert got == sorted(synth.split_events(good[0]) + synth.split_events(good[1]))
    log = balancer.log_text()
    assert "that are not a JSON array of objects" in log
    assert "slow path 1" in log


def test_an_event_too_long_for_the_pipe_format_is_refused_and_the_rest_delivered(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """An event of LIMIT bytes or more never reaches a pipe: refused, logged, the rest delivered."""
    from hostile import HostileFeed, Script

    from tradebalancer.reader.format import LIMIT

    huge = b'{"ev":"T","sym":"AAPL","x":"' + b"a" * LIMIT + b'"}'
    small = b'{"ev":"T","sym":"MSFT","p":2}'
    frames = [b"[" + huge + b"," + small + b"]", b"[" + small + b"]"]
    with HostileFeed(Script(frames=frames, close_after_stream=False)) as feed:
        balancer = Balancer(
            tmp_path, feed.url, pipes=3, workers=1, extra="max_message_size = 16777216"
        )
        balancers.append(balancer)
        balancer.wait_for(lambda: delivered(balancer, 3) >= 2, what="the small events")
        balancer.wait_for(lambda: "refused 1 event(s)" in balancer.log_text(), what="the log")
        assert balancer.stop() == 0
    got = [m for p in range(3) for m in read_records(balancer.records, p)]
    assert got == [small, small]
    assert "which the pipe format cannot carry" in balancer.log_text()


# -- an honest stop --------------------------------------------------------------------------

FINAL = re.compile(r"stopped: ([\d,]+) events? of ([\d,]+) not delivered, left in the pipes of .*")
SHARE = re.compile(r"worker (\d+) ([\d,]+)(?: delivered, ([\d,]+) not delivered)?")


def number(text: str | None) -> int:
    return int(text.replace(",", "")) if text else 0


def final_account(log: str) -> dict[int, tuple[int, int]]:
    """Each worker's (delivered, not delivered) from the balancer's last line."""
    line = next(line for line in reversed(log.splitlines()) if "stopped: " in line)
    shares = line[line.index("(") + 1 : line.rindex(")")]
    return {int(match[1]): (number(match[2]), number(match[3])) for match in SHARE.finditer(shares)}


def frame_prefix(pipes: int, seed: int, routed: int) -> dict[int, list[bytes]]:
    """Each pipe's events over the shortest run of whole source frames holding ``routed``."""
    streams: dict[int, list[bytes]] = {p: [] for p in range(pipes)}
    total = 0
    for frame in synth.generate_frames(seed=seed, count_events=200_000):
        if total == routed:
            return streams
        for event in synth.split_events(frame):
            streams[pipe_for(orjson.loads(event)["sym"].encode(), pipes)].append(event)
            total += 1
    raise AssertionError(f"{routed} events is not a whole number of frames: not the feed's")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stop_after", [700, 0])
def test_a_worker_that_stops_reading_is_counted_and_the_exit_is_75(
    tmp_path: Path, balancers: list[Balancer], stop_after: int
) -> None:
    """Worker 0 stops reading (after 700 events, or before any): the stop said "N events
    forwarded" and exited 0 (workers had 1,125,407 of 1,356,073). Now the last line counts
    per worker what was read and what was left, exactly, and the exit status is 75."""
    seed, pipes = 7, 4
    options = ReplayOptions(accept_keys=frozenset({KEY}), rate=20_000, seed=seed)
    with ReplayServer(options) as server:
        balancer = Balancer(
            tmp_path,
            server.url,
            pipes=pipes,
            # one argument: a trailing number alone would be taken for an fd (fds_from_argv)
            sink_args=f', "--stop-after={{{{ {stop_after} if worker == 0 else -1 }}}}"',
            extra="drain_timeout = 1.0",
        )
        balancers.append(balancer)
        balancer.wait_for(lambda: delivered(balancer, pipes) > 5000, what="streaming")
        started = time.monotonic()
        assert balancer.stop() == ExitCode.UNDELIVERED
        took = time.monotonic() - started
    log = balancer.log_text()
    assert FINAL.search(log), log[-3000:]
    assert "ERROR" in next(line for line in log.splitlines() if "stopped: " in line)
    account = final_account(log)
    routed = sum(d + u for d, u in account.values())
    expected = frame_prefix(pipes, seed, routed)
    for worker, owned in ((0, (0, 1)), (1, (2, 3))):
        got = {pipe: read_records(balancer.records, pipe) for pipe in owned}
        for pipe in owned:  # what a worker read is the start of its pipes' streams, in order
            assert got[pipe] == expected[pipe][: len(got[pipe])], f"pipe {pipe}"
        assert account[worker][0] == sum(map(len, got.values())), f"worker {worker}"
    assert account[0][1] == sum(len(expected[p]) for p in (0, 1)) - account[0][0] > 0
    assert account[1] == (sum(len(expected[p]) for p in (2, 3)), 0)  # it read everything
    assert account[0][0] >= stop_after  # (continued by the stop's SIGCONT, it may read a batch)
    assert took < 2 * 1.0 + 5 + 5  # drain_timeout twice, SIGTERM's grace, and slack


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("drain", "status"), [(30.0, ExitCode.OK), (0.3, ExitCode.UNDELIVERED)])
def test_drain_timeout_bounds_the_wait_for_a_slow_worker(
    tmp_path: Path, balancers: list[Balancer], drain: float, status: ExitCode
) -> None:
    """A slow but live worker: the fixed 10 s flush lost 5,399 events without a word. Now
    drain_timeout says how long to wait: long enough, all delivered (exit 0); too short, what
    was left is counted per worker and the exit is 75."""
    seed, pipes = 11, 2
    options = ReplayOptions(accept_keys=frozenset({KEY}), rate=20_000, seed=seed)
    with ReplayServer(options) as server:
        balancer = Balancer(
            tmp_path,
            server.url,
            pipes=pipes,
            workers=1,
            sink_args=', "--delay=0.05"',
            extra=f"drain_timeout = {drain}",
        )
        balancers.append(balancer)
        balancer.wait_for(
            lambda: (
                "largest backlog 0 B" not in balancer.log_text()
                and "largest backlog" in balancer.log_text()
            ),
            what="a backlog",
        )
        started = time.monotonic()
        assert balancer.stop(timeout=60) == status
        took = time.monotonic() - started
    account = final_account(balancer.log_text())
    routed = sum(d + u for d, u in account.values())
    expected = frame_prefix(pipes, seed, routed)
    got = [read_records(balancer.records, pipe) for pipe in range(pipes)]
    assert got == [expected[p][: len(got[p])] for p in range(pipes)]
    assert account[0][0] == sum(map(len, got))
    if status == ExitCode.OK:
        assert account[0] == (routed, 0) and got == [expected[p] for p in range(pipes)]
    else:
        assert account[0][1] > 0 and took < 2 * drain + 5 + 5
