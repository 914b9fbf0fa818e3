"""Tests for tradebalancer.transport against real servers on 127.0.0.1 (tests/tlspeer.py)."""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path

import pytest
from tlsca import make_ca, make_wrong_host_cert
from tlspeer import pattern, receive, send, start_peer

from tradebalancer.errors import KernelTLSUnavailable, TransportError
from tradebalancer.transport import TLS_MODES, Transport, kernel, open_transport

BUFFER = memoryview(bytearray(4 << 20))  # the service's receive buffer is 1-4 MiB


def _kernel_tls_missing() -> bool:
    """True when setting the tls upper layer protocol fails with ENOENT (no module)."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, kernel.TCP_ULP, b"tls")
        except OSError as exc:
            return exc.errno == errno.ENOENT
    return False


needs_no_ktls = pytest.mark.skipif(not _kernel_tls_missing(), reason="the tls module is loaded")


def connect(port: int, ca: Path, **options: object) -> Transport:
    """open_transport to the peer as "localhost" with the test CA."""
    return open_transport(
        "127.0.0.1",
        port,
        tls=True,
        ca_file=str(ca),
        server_hostname="localhost",
        timeout=5,
        **options,  # type: ignore[arg-type]
    )


def test_plain_tcp_round_trip_and_end_of_stream(tmp_path: Path) -> None:
    """Without TLS, bytes go both ways untouched and the server's FIN reads as 0."""
    with start_peer(tmp_path, [["echo", 11], ["fin"], ["wait_eof"]]) as peer:
        transport = open_transport("127.0.0.1", peer.port, tls=False, timeout=5)
        assert (transport.tls, transport.tx_mode, transport.rx_mode) == ("none", "none", "none")
        assert transport.fallback_reason is None
        assert transport.address == f"127.0.0.1:{peer.port}"
        send(transport, b"hello world")
        assert receive(transport) == b"hello world"
        assert transport.receive_into(BUFFER) == 0
        transport.close()
        assert peer.wait_for("eof")["close_notify"] is False


@needs_no_ktls
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_auto_falls_back_to_user_space_and_says_why(tmp_path: Path, version: str) -> None:
    """tls_mode auto without the tls module keeps the same session in user space and says why."""
    ca, cert, key = make_ca(tmp_path)
    size = 3 << 20  # more than a socket buffer: partial writes and many records
    steps = [["echo", size], ["send_pattern", 100], ["wait_eof"]]
    with start_peer(tmp_path, steps, cert=cert, key=key, tls_version=version) as peer:
        transport = connect(peer.port, ca, tls_mode="auto")
        assert (transport.tls, transport.tx_mode, transport.rx_mode) == ("user", "user", "user")
        assert transport.fallback_reason is not None
        assert "tls kernel module is not loaded" in transport.fallback_reason
        assert "ENOENT" in transport.fallback_reason
        assert transport.tls_version == f"TLSv{version}"
        send(transport, pattern(size))
        assert peer.wait_for("echoed")["intact"]
        assert receive(transport, size + 100) == pattern(size) + pattern(100)
        with pytest.raises(BlockingIOError):
            transport.receive_into(BUFFER)
        transport.close()
        transport.close()  # idempotent
        assert peer.wait_for("eof")["close_notify"] is True


@needs_no_ktls
def test_kernel_mode_raises_when_the_kernel_cannot(tmp_path: Path) -> None:
    """tls_mode kernel raises KernelTLSUnavailable with the reason instead of falling back."""
    ca, cert, key = make_ca(tmp_path)
    with start_peer(tmp_path, [["wait_eof"]], cert=cert, key=key) as peer:
        with pytest.raises(KernelTLSUnavailable, match="modprobe tls") as caught:
            connect(peer.port, ca, tls_mode="kernel")
        assert caught.value.address == f"127.0.0.1:{peer.port}"
        assert peer.wait_for("eof")


def test_user_mode_never_tries_the_kernel(tmp_path: Path) -> None:
    """tls_mode user stays in user space without a fallback reason."""
    ca, cert, key = make_ca(tmp_path)
    with start_peer(tmp_path, [["send", "hi"], ["recv", 3]], cert=cert, key=key) as peer:
        transport = connect(peer.port, ca, tls_mode="user")
        assert (transport.tls, transport.tx_mode, transport.rx_mode) == ("user", "user", "user")
        assert transport.fallback_reason is None
        assert receive(transport, 2) == b"hi"
        send(transport, b"yes")
        assert peer.wait_for("received")["data"] == "yes"
        transport.close()


def test_a_server_without_kernel_ciphers_gets_a_second_try_in_auto(tmp_path: Path) -> None:
    """A TLS 1.2 server offering no AEAD cipher makes auto connect again with OpenSSL's list."""
    ca, cert, key = make_ca(tmp_path)
    options = {"tls_version": "1.2", "ciphers": "ECDHE-ECDSA-AES128-SHA256", "connections": 3}
    with start_peer(tmp_path, [["send", "cbc"]], cert=cert, key=key, **options) as peer:  # type: ignore[arg-type]
        transport = connect(peer.port, ca, tls_mode="auto")
        assert transport.cipher == "ECDHE-ECDSA-AES128-SHA256"
        assert transport.fallback_reason is not None
        assert "none of the ciphers kernel TLS takes" in transport.fallback_reason
        assert receive(transport, 3) == b"cbc"
        transport.close()
        with pytest.raises(KernelTLSUnavailable, match="none of the ciphers"):
            connect(peer.port, ca, tls_mode="kernel")


@pytest.mark.parametrize("tls_mode", TLS_MODES)
def test_untrusted_certificate_is_refused(tmp_path: Path, tls_mode: str) -> None:
    """A certificate from another CA fails with 'certificate verify failed' and the CA used."""
    _, cert, key = make_ca(tmp_path / "server")
    other_ca, _, _ = make_ca(tmp_path / "client")
    with start_peer(tmp_path, [], cert=cert, key=key) as peer:
        with pytest.raises(TransportError) as caught:
            connect(peer.port, other_ca, tls_mode=tls_mode)
        message = str(caught.value)
        assert "certificate verify failed" in message
        assert str(other_ca) in message
        assert not isinstance(caught.value, KernelTLSUnavailable)


def test_wrong_host_name_says_expected_and_found(tmp_path: Path) -> None:
    """A valid certificate for another name fails naming the expected and the certified names."""
    ca, _, _ = make_ca(tmp_path)
    cert, key = make_wrong_host_cert(tmp_path)
    with (
        start_peer(tmp_path, [], cert=cert, key=key, connections=2) as peer,
        pytest.raises(TransportError) as caught,
    ):
        connect(peer.port, ca)
    message = str(caught.value)
    assert "hostname mismatch" in message
    assert "expected 'localhost'" in message
    assert "'wrong.example'" in message


def test_close_notify_from_the_server_reads_as_end_of_stream(tmp_path: Path) -> None:
    """The server's close_notify makes receive_into return 0 after the data before it."""
    ca, cert, key = make_ca(tmp_path)
    with start_peer(tmp_path, [["send", "bye"], ["close_notify"]], cert=cert, key=key) as peer:
        transport = connect(peer.port, ca)
        assert receive(transport) == b"bye"
        assert transport.receive_into(BUFFER) == 0
        transport.close()  # answers with our close_notify, which ends the server's unwrap()
        assert peer.wait_for("unwrapped")


def test_fin_without_close_notify_reads_as_end_of_stream(tmp_path: Path) -> None:
    """A TLS server that only closes TCP ends the stream with 0 too."""
    ca, cert, key = make_ca(tmp_path)
    with start_peer(tmp_path, [["send", "abrupt"], ["fin"]], cert=cert, key=key) as peer:
        transport = connect(peer.port, ca)
        assert receive(transport) == b"abrupt"
        transport.close()


@pytest.mark.parametrize("tls", [False, True])
def test_reset_by_the_server_is_a_transport_error(tmp_path: Path, tls: bool) -> None:
    """A TCP reset from the server makes receive_into raise TransportError."""
    ca, cert, key = make_ca(tmp_path)
    steps = [["recv", 4], ["reset"]]
    tls_files = {"cert": cert, "key": key} if tls else {}
    with start_peer(tmp_path, steps, **tls_files) as peer:  # type: ignore[arg-type]
        if tls:
            transport = connect(peer.port, ca)
        else:
            transport = open_transport("127.0.0.1", peer.port, tls=False)
        send(transport, b"ping")
        with pytest.raises(TransportError, match="ECONNRESET"):
            receive(transport)
        transport.close()


def test_refused_connection_is_a_transport_error() -> None:
    """Connecting to a closed port fails with 'refused' and the address."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    with pytest.raises(TransportError, match="refused") as caught:
        open_transport("127.0.0.1", port, tls=True, timeout=5)
    assert caught.value.address == f"127.0.0.1:{port}"


def test_silent_server_times_out_the_handshake() -> None:
    """A server that accepts but never answers the ClientHello times out within the timeout."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # the backlog accepts for us
        started = time.monotonic()
        with pytest.raises(TransportError, match="timed out"):
            open_transport("127.0.0.1", listener.getsockname()[1], tls=True, timeout=0.3)
        assert time.monotonic() - started < 2


def test_a_server_that_is_not_tls_is_named(tmp_path: Path) -> None:
    """A plain HTTP answer to the ClientHello fails with 'does not speak TLS'."""
    with (
        start_peer(tmp_path, [["send", "HTTP/1.1 400 Bad Request\r\n\r\n"]]) as peer,
        pytest.raises(TransportError, match="does not speak TLS"),
    ):
        open_transport("127.0.0.1", peer.port, tls=True, timeout=5)


def test_send_after_close_is_refused(tmp_path: Path) -> None:
    """A closed transport refuses to send."""
    with start_peer(tmp_path, [["wait_eof"]]) as peer:
        transport = open_transport("127.0.0.1", peer.port, tls=False)
        transport.close()
        with pytest.raises(TransportError, match="closed"):
            transport.send(b"late")


def test_unknown_tls_mode_is_a_programming_error() -> None:
    """open_transport rejects a tls_mode outside TLS_MODES."""
    with pytest.raises(ValueError, match="tls_mode"):
        open_transport("127.0.0.1", 1, tls=True, tls_mode="fast")
