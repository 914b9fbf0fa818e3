"""The replay feed, served on 127.0.0.1 and read by real websocket clients, plain and TLS."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from replayclient import events_in, expected_events, open_client, options, receive_all
from tlsca import make_ca
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from tradebalancer.errors import ConfigError
from tradebalancer.replay import ReplayServer
from tradebalancer.replay.stream import AUTH_SUCCESS


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
