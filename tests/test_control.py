"""The control socket, `tradebalancer status`, and the metrics listener of a running balancer.

A real replay feed (stamping its timestamps behind the wall clock), a real balancer with real
workers, and the commands a user types; the metrics parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_service import (
    KEY,
    REPO,
    Balancer,
    delivered,
)

from tradebalancer import config
from tradebalancer.address import Address, parse_address
from tradebalancer.control import Endpoints, control_path
from tradebalancer.listener import CLIENT_TIMEOUT, MAX_BODY, open_listener, text
from tradebalancer.poller import Poller
from tradebalancer.replay import ReplayOptions, ReplayServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tradebalancer", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics: family name -> {sorted labels -> value} (with sample names)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body = answer.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.timeout(120)
def test_status_and_metrics_show_the_running_instance(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """`status` (once and --json) and /metrics agree with what the workers received, and the
    delay behind the market is the replay's, with the warning when it stays over the line."""
    events, pipes, port = 40_000, 3, free_port()
    control = tmp_path / "run" / "control"
    options = ReplayOptions(accept_keys=frozenset({KEY}), events=events, rate=10_000, delay=3.0)
    with ReplayServer(options) as server:
        balancer = Balancer(
            tmp_path,
            server.url,
            pipes=pipes,
            extra=(
                f'control_socket = "{control}"\nmetrics = "127.0.0.1:{port}"\n'
                "delay_warning = 1.0\ndelay_warning_after = 0.5\n"
            ),
        )
        balancers.append(balancer)
        balancer.wait_for(lambda: delivered(balancer, pipes) > 2000, what="streaming")
        assert stat.S_IMODE(control.stat().st_mode) == 0o600
        shown = command("--config", str(tmp_path / "tradebalancer.toml"), "status", "feed")
        assert shown.returncode == 0, shown.stderr
        view = shown.stdout
        assert f"state       streaming: {server.url}, TLS none" in view
        assert "subscribed  T.*; refused: -" in view
        assert "s behind the market" in view
        for pipe in range(pipes):
            assert any(line.split()[:1] == [str(pipe)] for line in view.splitlines())
        balancer.wait_for(lambda: "behind the feed's timestamps" in balancer.log_text())
        streaming = scrape(port)
        balancer.wait_for(lambda: delivered(balancer, pipes) >= events, what="every event")
        raw = command("status", "feed", "--socket", str(control), "--json")
        snapshot = orjson.loads(raw.stdout)
        metrics = scrape(port)
        assert balancer.stop() == 0
    assert streaming["tradebalancer_connection_state"][(("state", "streaming"),)] == 1
    assert streaming["tradebalancer_tls_path"][(("path", "none"),)] == 1
    assert streaming["tradebalancer_behind_market"][()] == 1
    got = delivered(balancer, pipes)
    assert snapshot["events"] == got == events
    assert snapshot["behind"] is True
    assert all(isinstance(worker["pid"], int) for worker in snapshot["workers"])
    assert metrics["tradebalancer_events_forwarded_total"][()] == events
    per_pipe = metrics["tradebalancer_pipe_events_total"]
    assert sum(per_pipe.values()) == events and len(per_pipe) == pipes
    delay = metrics["tradebalancer_market_delay_seconds_bucket"]
    frames = metrics["tradebalancer_market_delay_seconds_count"][()]
    assert frames == metrics["tradebalancer_frames_received_total"][()] > 0
    # 3 s behind, and a little more for the trip: all between the 2.5 and 5 s bounds
    assert delay[(("le", "2.5"),)] == 0 and delay[(("le", "5.0"),)] == frames
    latency = metrics["tradebalancer_forward_latency_seconds_count"][()]
    assert latency > 0
    log = balancer.log_text()
    assert "the feed is buffering for us" in log
    assert f"metrics for Prometheus on http://127.0.0.1:{port}/metrics" in log
    assert not control.exists()  # removed on the way out


def test_status_of_an_instance_that_is_not_running_says_so(tmp_path: Path) -> None:
    """No socket: exit 69, naming the instance and how to start it."""
    shown = command("status", "nosuch", "--socket", str(tmp_path / "control"))
    assert shown.returncode == 69
    assert "tradebalancer@nosuch is not running here" in shown.stderr
    assert "systemctl start tradebalancer@nosuch" in shown.stderr


def test_the_control_socket_is_found_where_systemd_puts_it() -> None:
    """RUNTIME_DIRECTORY first; then /run/tradebalancer/NAME for root; "off" is none."""
    assert control_path("a", "auto", {"RUNTIME_DIRECTORY": "/run/x/a"}) == "/run/x/a/control"
    if os.geteuid() == 0:
        assert control_path("a", "auto", {}) == "/run/tradebalancer/a/control"
    assert control_path("a", "off", {}) is None
    assert control_path("a", "${D}/c", {"D": "/srv"}) == "/srv/c"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", Address("tcp", host="127.0.0.1", port=9464)),
        ("[::1]:9464", Address("tcp", host="::1", port=9464)),
        ("unix:/run/m.sock", Address("unix", path="/run/m.sock")),
    ],
)
def test_listen_addresses_parse(text: str, expected: Address) -> None:
    """HOST:PORT, [IPv6]:PORT and unix:/path are the three forms."""
    assert parse_address(text) == expected


@pytest.mark.parametrize("bad", ["9464", "localhost", "unix:rel.sock", "1.2.3.4:99999", ":80"])
def test_bad_listen_addresses_say_what_is_expected(bad: str) -> None:
    """Anything else is refused with the forms that work."""
    with pytest.raises(ValueError, match=r'expected "HOST:PORT"'):
        parse_address(bad)


def serve_until(endpoints: Endpoints, poller: Poller, done: object, now: float = 0.0) -> None:
    deadline = time.monotonic() + 5
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline
        for tag, _mask, _hangup in poller.select(0.05):
            endpoints.serve(tag, now)  # type: ignore[arg-type]


def test_the_listener_answers_bad_requests_and_drops_slow_clients(tmp_path: Path) -> None:
    """404, 400 for garbage or an endless request line, and a silent client closed at its
    deadline; a live socket at the path is not taken over."""
    poller = Poller()
    endpoints = Endpoints(poller)
    path = str(tmp_path / "c.sock")
    listener = open_listener(
        Address("unix", path=path), lambda m, p: text(404, f"{m} {p}\n"), "control"
    )
    endpoints._add(listener)
    answers = []
    for request in (b"GET /x HTTP/1.0\r\n\r\n", b"garbage\r\n\r\n", b"G" * 9000):
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.sendall(request)
        serve_until(endpoints, poller, lambda c=client: select.select([c], [], [], 0)[0])
        serve_until(endpoints, poller, lambda: not endpoints.clients)
        answers.append(client.recv(1000))
        client.close()
    assert answers[0].startswith(b"HTTP/1.0 404 Not Found") and answers[0].endswith(b"GET /x\n")
    assert answers[1].startswith(b"HTTP/1.0 400") and answers[2].startswith(b"HTTP/1.0 400")
    silent = socket.socket(socket.AF_UNIX)
    silent.connect(path)
    serve_until(endpoints, poller, lambda: len(endpoints.clients) == 1)
    endpoints.tick(CLIENT_TIMEOUT - 0.1)
    assert len(endpoints.clients) == 1
    endpoints.tick(CLIENT_TIMEOUT)
    assert not endpoints.clients and silent.recv(10) == b""
    silent.close()
    with pytest.raises(OSError, match="another process answers"):
        open_listener(Address("unix", path=path), lambda m, p: text(200, ""), "control")
    endpoints.close()
    poller.close()
    assert not os.path.exists(path)


def test_a_metrics_address_in_use_stops_the_start_with_the_key(
    tmp_path: Path, balancers: list[Balancer]
) -> None:
    """A metrics listener that cannot listen is a configuration error (78) naming the key."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        balancer = Balancer(tmp_path, "ws://127.0.0.1:9/", extra=f'metrics = "127.0.0.1:{port}"\n')
        balancers.append(balancer)
        assert balancer.process.wait(30) == 78
    assert f"feeds.feed.metrics: cannot listen on 127.0.0.1:{port}" in balancer.log_text()


def test_metrics_listener_serves_only_metrics(tmp_path: Path, balancers: list[Balancer]) -> None:
    """The TCP listener answers /metrics and refuses the control requests (no reload from
    the network)."""
    port = free_port()
    balancer = Balancer(
        tmp_path,
        "ws://127.0.0.1:9/",
        extra=f'metrics = "127.0.0.1:{port}"\ncontrol_socket = "off"\n',
    )
    balancers.append(balancer)
    balancer.wait_for(lambda: "metrics for Prometheus" in balancer.log_text())
    request = urllib.request.Request(f"http://127.0.0.1:{port}/reload", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 404
    refused.value.close()
    assert scrape(port)["tradebalancer_connection_state"][(("state", "reconnecting"),)] == 1
    assert balancer.stop() == 0
    assert "reload" not in balancer.log_text()


def test_a_request_with_a_body_gets_its_answer(tmp_path: Path) -> None:
    """POST with a body (curl -d): the body is read and dropped, the answer arrives whole
    rather than a reset; a body over the limit gets 413."""
    poller, path = Poller(), str(tmp_path / "c")
    endpoints = Endpoints(poller)
    endpoints._add(open_listener(Address("unix", path=path), lambda m, p: text(200, "ok\n"), "c"))
    answers = []
    for length, sent in ((100_000, 100_000), (MAX_BODY + 1, 10)):
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            client.sendall(b"POST /reload HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % length)
            body = memoryview(b"x" * sent)
            client.setblocking(False)
            while body:
                with contextlib.suppress(BlockingIOError):
                    body = body[client.send(body) :]
                for tag, _mask, _hangup in poller.select(0.01):
                    endpoints.serve(tag, 0.0)  # type: ignore[arg-type]
            client.setblocking(True)
            serve_until(endpoints, poller, lambda c=client: select.select([c], [], [], 0)[0])
            answers.append(client.recv(1000))
        serve_until(endpoints, poller, lambda: not endpoints.clients)
    endpoints.close()
    poller.close()
    assert answers[0].startswith(b"HTTP/1.0 200 OK") and answers[0].endswith(b"ok\n")
    assert answers[1].startswith(b"HTTP/1.0 413")


def test_a_live_socket_with_a_full_backlog_is_not_taken_and_does_not_hang(tmp_path: Path) -> None:
    """Another process listening at the path, too busy to accept: refused at once."""
    path = str(tmp_path / "c")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(0)
        held = []
        for _ in range(3):
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(path)
            held.append(client)
        started = time.monotonic()
        with pytest.raises(OSError, match="another process answers"):
            open_listener(Address("unix", path=path), lambda m, p: text(200, ""), "c")
        assert time.monotonic() - started < 1
        for client in held:
            client.close()
    assert os.path.exists(path)


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    """A socket file nobody listens on (a balancer that died) is replaced, made 0600."""
    path = str(tmp_path / "c")
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(path)
    listener = open_listener(Address("unix", path=path), lambda m, p: text(200, ""), "c")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    listener.close()


def test_the_automatic_directory_is_private_and_ours(tmp_path: Path) -> None:
    """The automatic socket's directory is made 0700; one left open is closed down; one of
    another user is refused (the socket could be swapped under `status`)."""
    poller = Poller()
    feed = config.loads('[feeds.f]\nurl = "ws://127.0.0.1:9/"\ncommand = ["w"]\n').feed("f")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o777)
    runtime.chmod(0o777)
    endpoints = Endpoints(poller)
    endpoints.open(
        feed, {"RUNTIME_DIRECTORY": str(runtime)}, reload=lambda: (True, ""), snapshot=dict
    )
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert stat.S_IMODE((runtime / "control").stat().st_mode) == 0o600
    endpoints.close()
    os.chown(runtime, 4242, 4242)
    others = Endpoints(poller)
    others.open(feed, {"RUNTIME_DIRECTORY": str(runtime)}, reload=lambda: (True, ""), snapshot=dict)
    assert others.listeners == []
    poller.close()
