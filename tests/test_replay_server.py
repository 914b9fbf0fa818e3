"""The replay feed, served on 127.0.0.1 and read by real websocket clients, plain and TLS."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from replayclient import events_in, expected_events, open_client, options, receive_all
from tlsca import make_ca
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from tradebalancer.errors import ConfigError
from tradebalancer.replay import ReplayServer
from tradebalancer.replay.stream import AUTH_SUCCESS, CONNECTED


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.mark.parametrize(
    ("maximum", "version"), [(None, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")]
)
def test_wss_with_a_test_ca(
    tls_files: tuple[Path, Path, Path], maximum: ssl.TLSVersion | None, version: str
) -> None:
    """wss:// works with a certificate from a test CA, in TLS 1.3 and TLS 1.2."""
    ca, cert, key = tls_files
    server_options = options(
        certfile=str(cert), keyfile=str(key), tls_max_version=maximum, events=3000
    )
    context = ssl.create_default_context(cafile=str(ca))
    with ReplayServer(server_options) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        with open_client(server, ssl_context=context) as ws:
            assert ws.socket.version() == version  # type: ignore[attr-defined]
            messages, closed = receive_all(ws)
    assert isinstance(closed, ConnectionClosedOK)
    assert events_in(messages) == expected_events(server_options, 3000)


def test_wss_client_that_distrusts_the_certificate(tls_files: tuple[Path, Path, Path]) -> None:
    """A failed TLS handshake only drops that connection; the next one is served."""
    ca, cert, key = tls_files
    with ReplayServer(options(certfile=str(cert), keyfile=str(key), events=100)) as server:
        with (
            pytest.raises(ssl.SSLCertVerificationError),
            connect(server.url, ssl=ssl.create_default_context(), open_timeout=5),
        ):
            pass
        context = ssl.create_default_context(cafile=str(ca))
        with open_client(server, ssl_context=context) as ws:
            messages, _ = receive_all(ws)
    assert len(events_in(messages)) == 100


def test_stop_closes_clients_with_going_away() -> None:
    """Stopping the server closes an endless stream's clients with code 1001."""
    server = ReplayServer(options(rate=1000.0))
    server.start()
    with open_client(server) as ws:
        try:
            ws.recv(timeout=5)
        finally:
            server.stop()
        _, closed = receive_all(ws)
    assert closed.rcvd is not None and closed.rcvd.code == 1001


def thread_cpu_seconds(thread: threading.Thread) -> float:
    """The CPU time, user and system, one thread of this process has used (proc(5), stat)."""
    assert thread.native_id is not None
    stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
    fields = stat.rpartition(")")[2].split()  # after the name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def start_and_find_thread(server: ReplayServer) -> threading.Thread:
    """Start the server and return the thread it serves in."""
    before = set(threading.enumerate())
    server.start()
    (thread,) = set(threading.enumerate()) - before
    return thread


def test_idle_server_sleeps() -> None:
    """With no client, the server's thread sleeps: it uses well under 5% of a core over 2 s."""
    # It spun at 20-90% of a core (select with a timeout of 0, 30,000 times a second). CPU
    # time, unlike wall time, does not grow while a loaded machine leaves the thread waiting.
    server = ReplayServer(options())
    thread = start_and_find_thread(server)
    try:
        time.sleep(0.1)  # past the start
        used, started = thread_cpu_seconds(thread), time.monotonic()
        time.sleep(2.0)
        used, elapsed = thread_cpu_seconds(thread) - used, time.monotonic() - started
    finally:
        server.stop()
    assert used / elapsed < 0.05, f"{used:.2f} s of CPU in {elapsed:.2f} s"


def test_idle_server_answers_a_client_and_a_stop_at_once() -> None:
    """Sleeping between clients, the server still greets a new client and stops without delay."""
    server = ReplayServer(options())
    start_and_find_thread(server)
    try:
        for _ in range(2):  # the first client, then one after the server was idle again
            time.sleep(0.3)  # into the idle wait (up to 1 s)
            started = time.monotonic()
            with connect(server.url, open_timeout=5) as ws:
                assert ws.recv(timeout=5, decode=False) == CONNECTED
                greeted = time.monotonic() - started
            assert greeted < 0.5
        time.sleep(0.3)
    finally:
        started = time.monotonic()
        server.stop()
    assert time.monotonic() - started < 0.5


def test_configuration_errors(tmp_path: Path) -> None:
    """A missing certificate or a bad recording is a ConfigError before anything listens."""
    with pytest.raises(ConfigError, match="certificate"):
        ReplayServer(options(certfile=str(tmp_path / "none.pem")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("[]\n{}\n")
    with pytest.raises(ConfigError, match="line 2"):
        ReplayServer(options(source=str(bad)))


def test_command_line_serves_then_exits_when_the_stream_ends() -> None:
    """The command prints its URL, serves N events to a client, and exits 0."""
    command = [sys.executable, "-m", "tradebalancer.replay", "--port", "0", "--events", "300"]
    command += ["--symbols", "50", "--accept-key", "k"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().decode().strip()
            assert url.startswith("ws://127.0.0.1:")
            with connect(url, open_timeout=5) as ws:
                ws.recv(timeout=5)
                ws.send('{"action":"auth","params":"k"}')
                assert ws.recv(timeout=5, decode=False) == AUTH_SUCCESS
                ws.send('{"action":"subscribe","params":"T.*"}')
                ws.recv(timeout=5)
                messages, closed = receive_all(ws)
            assert isinstance(closed, ConnectionClosedOK)
            assert len(events_in(messages)) == 300
            assert process.wait(timeout=10) == 0
        finally:
            process.kill()
