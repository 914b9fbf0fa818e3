"""Tests for tradebalancer.transport.session: key material checked against a real TLS server.

This machine has no kernel TLS, so the tests play the kernel: they take the CryptoInfo a
hand-off would install, decrypt the server's next records with `cryptography` and encrypt a
record the server must accept, building nonces and additional data from the RFCs (RFC 8446
5.2-5.3, RFC 5246 6.2.3.3 with RFC 5288 3, RFC 7905 2) as the kernel does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st
from tlsca import make_ca
from tlspeer import start_peer

from tradebalancer.errors import KernelTLSUnavailable, TransportError
from tradebalancer.transport import kernel as tls_kernel
from tradebalancer.transport import keys as tls_keys
from tradebalancer.transport import session as tls_session

PAIRS = [
    ("1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", tls_keys.TLS_CIPHER_AES_GCM_128),
    ("1.2", "ECDHE-ECDSA-AES256-GCM-SHA384", tls_keys.TLS_CIPHER_AES_GCM_256),
    ("1.2", "ECDHE-ECDSA-CHACHA20-POLY1305", tls_keys.TLS_CIPHER_CHACHA20_POLY1305),
    ("1.3", "TLS_AES_128_GCM_SHA256", tls_keys.TLS_CIPHER_AES_GCM_128),
    ("1.3", "TLS_AES_256_GCM_SHA384", tls_keys.TLS_CIPHER_AES_GCM_256),
    ("1.3", "TLS_CHACHA20_POLY1305_SHA256", tls_keys.TLS_CIPHER_CHACHA20_POLY1305),
]
SERVER_TEXT = "records the kernel would decrypt"
CLIENT_TEXT = "a record the kernel would encrypt"


# -- the kernel's record layer, played by the test ------------------------------------------


class KernelRecords:
    """One direction of a record layer keyed exactly as the kernel would be by ``info``."""

    def __init__(self, info: tls_keys.CryptoInfo) -> None:
        self.info = info
        self.seq = info.rec_seq
        self.explicit = int.from_bytes(info.iv, "big")  # TLS 1.2 AES-GCM transmit counter
        gcm = info.cipher_type != tls_keys.TLS_CIPHER_CHACHA20_POLY1305
        self.aead = AESGCM(info.key) if gcm else ChaCha20Poly1305(info.key)
        self.explicit_nonce = gcm and info.version == tls_keys.TLS_1_2_VERSION

    def _xor_nonce(self, seq: int) -> bytes:
        base = int.from_bytes(self.info.salt + self.info.iv, "big")
        return (base ^ seq).to_bytes(12, "big")

    def open(self, header: bytes, body: bytes, seq: int) -> tuple[int, bytes]:
        """Decrypt one record read from the server: (content type, plaintext)."""
        if self.info.version == tls_keys.TLS_1_3_VERSION:
            inner = self.aead.decrypt(self._xor_nonce(seq), body, header).rstrip(b"\0")
            return inner[-1], inner[:-1]
        if self.explicit_nonce:
            nonce, body = self.info.salt + body[:8], body[8:]
        else:
            nonce = self._xor_nonce(seq)
        aad = seq.to_bytes(8, "big") + header[:3] + (len(body) - 16).to_bytes(2, "big")
        return header[0], self.aead.decrypt(nonce, body, aad)

    def seal(self, content_type: int, plaintext: bytes) -> bytes:
        """Encrypt one record to the server, as the next record the kernel would send."""
        seq = self.seq
        self.seq += 1
        if self.info.version == tls_keys.TLS_1_3_VERSION:
            length = len(plaintext) + 1 + 16
            header = bytes([tls_kernel.APPLICATION_DATA, 3, 3]) + length.to_bytes(2, "big")
            inner = plaintext + bytes([content_type])
            return header + self.aead.encrypt(self._xor_nonce(seq), inner, header)
        aad = seq.to_bytes(8, "big") + bytes([content_type, 3, 3])
        aad += len(plaintext).to_bytes(2, "big")
        prefix = b""
        if self.explicit_nonce:
            prefix = self.explicit.to_bytes(8, "big")
            self.explicit += 1
            nonce = self.info.salt + prefix
        else:
            nonce = self._xor_nonce(seq)
        body = prefix + self.aead.encrypt(nonce, plaintext, aad)
        return bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big") + body


def read_raw_record(sock: socket.socket) -> tuple[bytes, bytes]:
    """One record straight from the socket: (header, body)."""
    sock.settimeout(5)
    header = _exactly(sock, 5)
    return header, _exactly(sock, int.from_bytes(header[3:5], "big"))


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def handshake(
    ca: Path, port: int, *, kernel: bool = True
) -> tuple[socket.socket, tls_session.Session]:
    """Connect and complete the handshake the way the connector does."""
    context = tls_session.create_context(kernel=kernel, ca_file=str(ca))
    key_log = tls_session.KeyLog(context)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    session = tls_session.Session(context, "localhost", f"127.0.0.1:{port}", key_log=key_log)
    session.handshake(sock, time.monotonic() + 5)
    return sock, session


def peer_options(version: str, cipher: str) -> dict[str, str]:
    """start_peer arguments pinning ``version`` and ``cipher``."""
    if version == "1.3":
        return {"tls_version": version, "ciphersuites": cipher}
    return {"tls_version": version, "ciphers": cipher}


def receive_application_data(
    sock: socket.socket, records: KernelRecords, size: int
) -> tuple[bytes, int, list[tuple[bytes, bytes]]]:
    """Decrypt records until ``size`` bytes of application data came: (data, tickets, raw)."""
    data, tickets, raw = b"", 0, []
    while len(data) < size:
        header, body = read_raw_record(sock)
        raw.append((header, body))
        content_type, plaintext = records.open(header, body, records.seq)
        records.seq += 1
        if content_type == tls_kernel.HANDSHAKE and plaintext[:1] == b"\x04":
            tickets += 1  # TLS 1.3 NewSessionTicket, which the kernel hands up as type 22
        else:
            assert content_type == tls_kernel.APPLICATION_DATA
            data += plaintext
    return data, tickets, raw


# -- key material against a real server ----------------------------------------------------


@pytest.mark.parametrize(("version", "cipher", "cipher_type"), PAIRS)
def test_hand_off_right_after_the_handshake(
    tmp_path: Path, version: str, cipher: str, cipher_type: int
) -> None:
    """Crypto info derived right after the handshake decrypts the next records and encrypts one."""
    ca, cert, key = make_ca(tmp_path)
    steps = [["send", SERVER_TEXT[:10]], ["send", SERVER_TEXT[10:]], ["recv", len(CLIENT_TEXT)]]
    with start_peer(tmp_path, steps, cert=cert, key=key, **peer_options(version, cipher)) as peer:
        sock, session = handshake(ca, peer.port)
        assert peer.wait_for("handshake")["cipher"] == cipher
        tx, rx = session.crypto_info()
        first_seq = 0 if version == "1.3" else 1  # TLS 1.2: each Finished was record 0
        assert (tx.rec_seq, rx.rec_seq) == (first_seq, first_seq)
        assert tx.cipher_type == rx.cipher_type == cipher_type
        assert tx.version == rx.version == (0x0304 if version == "1.3" else 0x0303)
        assert tx.key != rx.key

        records = KernelRecords(rx)
        data, tickets, raw = receive_application_data(sock, records, len(SERVER_TEXT))
        assert data.decode() == SERVER_TEXT
        assert tickets == (2 if version == "1.3" else 0)  # Python servers send two tickets
        # Negative control: one sequence number off and nothing decrypts.
        header, body = raw[0]
        with pytest.raises(InvalidTag):
            KernelRecords(rx).open(header, body, rx.rec_seq + 1)

        sock.sendall(KernelRecords(tx).seal(tls_kernel.APPLICATION_DATA, CLIENT_TEXT.encode()))
        assert peer.wait_for("received")["data"] == CLIENT_TEXT
        sock.close()


@pytest.mark.parametrize(("version", "cipher", "cipher_type"), PAIRS)
def test_hand_off_after_application_data_in_user_space(
    tmp_path: Path, version: str, cipher: str, cipher_type: int
) -> None:
    """After records went through OpenSSL, the crypto info continues their sequence numbers."""
    ca, cert, key = make_ca(tmp_path)
    steps = [["recv", 5], ["send", "world"], ["send", SERVER_TEXT], ["recv", len(CLIENT_TEXT)]]
    with start_peer(tmp_path, steps, cert=cert, key=key, **peer_options(version, cipher)) as peer:
        sock, session = handshake(ca, peer.port)
        before_tx, before_rx = session.tx_seq, session.rx_seq
        session.object.write(b"hello")
        hello_record = session.data_to_send()
        sock.sendall(hello_record)
        assert peer.wait_for("received")["data"] == "hello"
        reply = b""
        deadline = time.monotonic() + 5
        while reply != b"world":  # one record at a time, as a websocket upgrade would be read
            assert session.receive_record(sock, deadline)
            try:
                reply += session.object.read(100)
            except ssl.SSLWantReadError:
                continue

        tx, rx = session.crypto_info()
        assert tx.rec_seq == before_tx + 1
        tickets = 2 if version == "1.3" else 0
        assert rx.rec_seq == before_rx + tickets + 1
        assert tx.cipher_type == cipher_type
        if version == "1.2" and cipher_type != tls_keys.TLS_CIPHER_CHACHA20_POLY1305:
            # The kernel's first explicit nonce follows the one OpenSSL last used (RFC 5288 3).
            assert int.from_bytes(tx.iv, "big") == int.from_bytes(hello_record[5:13], "big") + 1

        data, _, _ = receive_application_data(sock, KernelRecords(rx), len(SERVER_TEXT))
        assert data.decode() == SERVER_TEXT
        sock.sendall(KernelRecords(tx).seal(tls_kernel.APPLICATION_DATA, CLIENT_TEXT.encode()))
        assert peer.wait_for("received")["data"] == CLIENT_TEXT
        sock.close()


def test_hand_off_refuses_while_data_waits_in_openssl(tmp_path: Path) -> None:
    """Decrypted data not yet read from OpenSSL makes crypto_info refuse rather than lose it."""
    ca, cert, key = make_ca(tmp_path)
    with start_peer(tmp_path, [["send", "unread"], ["wait_eof"]], cert=cert, key=key) as peer:
        sock, session = handshake(ca, peer.port)
        deadline = time.monotonic() + 5
        while not session.object.pending():
            session.receive_record(sock, deadline)
            try:
                session.object.read(1)
            except ssl.SSLWantReadError:
                continue
        with pytest.raises(ValueError, match="still inside OpenSSL"):
            session.crypto_info()
        sock.close()


def test_key_log_lives_in_memory_and_is_freed(tmp_path: Path) -> None:
    """The key log is an anonymous memory file, open only until the handshake ends."""
    ca, cert, key = make_ca(tmp_path)

    def memory_files() -> list[str]:
        links = []
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):
                links.append(os.readlink(f"/proc/self/fd/{name}"))
        return [link for link in links if "tradebalancer-tls-keys" in link]

    with start_peer(tmp_path, [["wait_eof"]], cert=cert, key=key) as peer:
        assert memory_files() == []  # no test before this one leaked a key log
        context = tls_session.create_context(kernel=True, ca_file=str(ca))
        key_log = tls_session.KeyLog(context)
        # The memory file, and OpenSSL's own descriptor of it (opened through /proc/self/fd).
        assert memory_files() == ["/memfd:tradebalancer-tls-keys (deleted)"] * 2
        assert context.keylog_filename.startswith("/proc/self/fd/")
        sock = socket.create_connection(("127.0.0.1", peer.port), timeout=5)
        session = tls_session.Session(context, "localhost", "test", key_log=key_log)
        session.handshake(sock, time.monotonic() + 5)
        assert memory_files() == []
        assert context.keylog_filename is None
        assert session.crypto_info()  # the secrets were read before the file went away
        sock.close()


def test_user_mode_context_keeps_openssl_default_ciphers() -> None:
    """Only a kernel context restricts TLS 1.2 to the AEAD suites the kernel takes."""
    kernel = {c["name"] for c in tls_session.create_context(kernel=True).get_ciphers()}
    user = {c["name"] for c in tls_session.create_context(kernel=False).get_ciphers()}
    tls12 = {name for name in kernel if not name.startswith("TLS_")}
    assert tls12 and all(("TLSv1.2", name) in tls_keys.SUITES for name in tls12)
    assert user > kernel


def test_handshake_errors_are_transport_errors(tmp_path: Path) -> None:
    """A server that is not TLS fails the handshake with TransportError saying so."""
    listener = socket.create_server(("127.0.0.1", 0))
    sock = socket.create_connection(listener.getsockname(), timeout=5)
    conn, _ = listener.accept()
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    session = tls_session.Session(tls_session.create_context(kernel=True), "localhost", "here")
    with pytest.raises(TransportError, match="does not speak TLS"):
        session.handshake(sock, time.monotonic() + 5)
    for s in (sock, conn, listener):
        s.close()


# -- the pure parts ----------------------------------------------------------------------


@given(st.lists(st.binary(max_size=40), max_size=8), st.data())
def test_record_counter_follows_any_split(bodies: list[bytes], data: st.DataObject) -> None:
    """RecordCounter counts records and keeps the last body prefix however the stream is cut."""
    stream = b"".join(bytes([23, 3, 3]) + len(b).to_bytes(2, "big") + b for b in bodies)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    counter = tls_session.RecordCounter()
    start = 0
    for cut in [*cuts, len(stream)]:
        counter.scan(stream[start:cut])
        start = cut
    assert counter.records == len(bodies)
    assert counter.at_boundary
    assert counter.last_prefix == (bodies[-1][:8] if bodies else b"")


# -- the kernel interface on this machine ------------------------------------------------


def _ulp_available() -> bool:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, tls_kernel.TCP_ULP, b"tls")
        except OSError as exc:
            return exc.errno != errno.ENOENT
    return True


@pytest.mark.skipif(_ulp_available(), reason="the tls module is loaded here")
def test_install_without_the_module_names_it(tmp_path: Path) -> None:
    """Without the tls module, the hand-off fails before touching the session and says modprobe."""
    ca, cert, key = make_ca(tmp_path)
    steps = [["send", "still readable"], ["recv", 2]]
    with start_peer(tmp_path, steps, cert=cert, key=key) as peer:
        sock, session = handshake(ca, peer.port)
        with pytest.raises(KernelTLSUnavailable, match=r"modprobe tls.*|ENOENT") as caught:
            session.hand_off(sock)
        assert "ENOENT" in str(caught.value) and "modprobe tls" in str(caught.value)
        # Nothing was handed over: OpenSSL carries on with the same session.
        deadline = time.monotonic() + 5
        text = b""
        while text != b"still readable":
            assert session.receive_record(sock, deadline)
            with contextlib.suppress(ssl.SSLWantReadError):
                text += session.object.read(100)
        session.object.write(b"ok")
        sock.sendall(session.data_to_send())
        assert peer.wait_for("received")["data"] == "ok"
        sock.close()
