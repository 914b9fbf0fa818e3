"""Kernel TLS: hand a verified TLS session from OpenSSL to the Linux kernel (kTLS).

Owns the TLS client session (an ``ssl.SSLObject`` over memory BIOs), the secrets it yields,
the kernel's ``crypto_info`` structures, the ``setsockopt`` hand-off and, after it, the
kernel's record interface (``recvmsg`` control messages, alerts). Must not touch: connecting,
socket lifetime, the event loop, websockets (``transport.py`` owns the socket and calls this).
Only the standard library is used at run time.

Design, after Documentation/networking/tls.rst and include/uapi/linux/tls.h:

* OpenSSL does the verified handshake on an ``SSLObject``; the socket's bytes are fed to it
  one TLS record at a time (RFC 8446 5.1 / RFC 5246 6.2 header: type, version, length), so
  nothing past a record boundary is ever taken from the socket: whatever the server sends
  after its Finished stays in the socket for the kernel to decrypt.
* The traffic secrets come from OpenSSL's key log (``SSLContext.keylog_filename``), pointed
  at an anonymous memory file (``memfd_create``), never a disk file; it is zeroed, truncated
  and closed right after the handshake. The secrets then live only in this process until the
  hand-off (Python cannot scrub ``bytes``; nothing here logs or keeps them afterwards).
* Keys: TLS 1.3 per RFC 8446 7.1/7.3 (HKDF-Expand-Label "key" / "iv" of the traffic secret
  0); TLS 1.2 per RFC 5246 6.3 (PRF "key expansion"; AEAD suites have no MAC keys; GCM takes
  a 4-byte implicit IV, RFC 5288 3; ChaCha20-Poly1305 a 12-byte IV, RFC 7905 2).
* Sequence numbers: every record after the handshake is counted in both directions while the
  session is still in user space, so the hand-off may happen right after the handshake or
  after some application data (a websocket upgrade) went through OpenSSL. TLS 1.3 starts at
  0 (the Finished messages use the handshake keys); TLS 1.2 at 1 (each Finished was record 0
  under the new keys).
* TLS 1.2 AES-GCM explicit nonce (RFC 5288 3): the kernel writes ``crypto_info.iv`` into the
  first record it sends and increments it per record. OpenSSL starts its nonce counter at a
  random value, so the transmit IV continues from the nonce of the last record OpenSSL sent:
  no nonce is ever used twice with the key. On receive the kernel reads the nonce from each
  record, so the receive IV only mirrors the sequence number.
* Hand-off order: TCP_ULP, then TLS_RX, then TLS_TX. If TCP_ULP or TLS_RX fails nothing was
  handed over (a "tls" ULP without crypto state passes bytes through) and OpenSSL carries on
  with the same session. If TLS_TX alone fails, receive stays in the kernel and transmit stays
  with OpenSSL, whose transmit state was never used by anybody else: sound, as the two
  directions of TLS have independent keys and sequence numbers.
* After the hand-off, ``recvmsg`` returns one control record at a time with its type in a
  ``SOL_TLS``/``TLS_GET_RECORD_TYPE`` message; ``ControlRecords`` decides what each means.
  A TLS 1.3 KeyUpdate (RFC 8446 4.6.3) is not followed: the connection ends with an error and
  is made again (Debian 12's Linux 6.1 cannot take new keys at all; newer kernels pause the
  receive side with EKEYEXPIRED until they get them).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import os
import socket
import ssl
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import KernelTLSUnavailable, TransportError

# include/uapi/linux/tls.h and include/linux/socket.h; Python 3.11 names none of them.
SOL_TLS = 282
TCP_ULP = 31
TLS_TX = 1
TLS_RX = 2
TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2
TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54

# TLS record content types (RFC 8446 5.1).
CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA = 20, 21, 22, 23
RECORD_HEADER_SIZE = 5
MAX_RECORD_SIZE = 2**14 + 2048  # the largest TLSCiphertext.length any version allows
CLOSE_NOTIFY = b"\x01\x00"  # alert level warning, description close_notify (RFC 8446 6.1)

# What kernels from 5.11 on take for TLS 1.2 (Debian 12 ships 6.1); every TLS 1.3 suite
# OpenSSL enables by default is AES-GCM or ChaCha20-Poly1305, so only 1.2 is restricted.
KERNEL_TLS12_CIPHERS = ":".join(
    f"ECDHE-{auth}-{cipher}"
    for cipher in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305")
    for auth in ("ECDSA", "RSA")
)


@dataclass(frozen=True)
class Suite:
    """A cipher suite as the kernel sees it."""

    cipher_type: int
    key_size: int
    salt_size: int  # the implicit part of the nonce; 0 for ChaCha20-Poly1305
    hash_name: str

    @property
    def iv_size(self) -> int:
        """Size of crypto_info.iv: the whole 12-byte nonce base minus the salt."""
        return 12 - self.salt_size


_AES_128 = Suite(TLS_CIPHER_AES_GCM_128, 16, 4, "sha256")
_AES_256 = Suite(TLS_CIPHER_AES_GCM_256, 32, 4, "sha384")
_CHACHA = Suite(TLS_CIPHER_CHACHA20_POLY1305, 32, 0, "sha256")
SUITES: Mapping[tuple[str, str], Suite] = {
    ("TLSv1.3", "TLS_AES_128_GCM_SHA256"): _AES_128,
    ("TLSv1.3", "TLS_AES_256_GCM_SHA384"): _AES_256,
    ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256"): _CHACHA,
    **{("TLSv1.2", f"ECDHE-{auth}-AES128-GCM-SHA256"): _AES_128 for auth in ("ECDSA", "RSA")},
    **{("TLSv1.2", f"ECDHE-{auth}-AES256-GCM-SHA384"): _AES_256 for auth in ("ECDSA", "RSA")},
    **{("TLSv1.2", f"ECDHE-{auth}-CHACHA20-POLY1305"): _CHACHA for auth in ("ECDSA", "RSA")},
}


@dataclass(frozen=True, repr=False)
class CryptoInfo:
    """One direction's ``struct tls12_crypto_info_*``, exactly as handed to the kernel."""

    version: int  # TLS_1_2_VERSION or TLS_1_3_VERSION
    cipher_type: int
    key: bytes
    iv: bytes
    salt: bytes
    rec_seq: int  # the sequence number of the next record

    def pack(self) -> bytes:
        """The struct's bytes: u16 version, u16 cipher_type (host order), iv, key, salt, rec_seq."""
        return (
            struct.pack("=HH", self.version, self.cipher_type)
            + self.iv
            + self.key
            + self.salt
            + self.rec_seq.to_bytes(8, "big")
        )

    def __repr__(self) -> str:  # never show key material
        return (
            f"CryptoInfo(version={self.version:#06x}, cipher={self.cipher_type}, "
            f"rec_seq={self.rec_seq})"
        )


def hkdf_expand_label(
    secret: bytes, label: bytes, context: bytes, length: int, hash_name: str
) -> bytes:
    """HKDF-Expand-Label of RFC 8446 7.1 (HKDF-Expand of RFC 5869 2.3 with a TLS 1.3 info)."""
    full_label = b"tls13 " + label
    info = (
        struct.pack("!HB", length, len(full_label)) + full_label + bytes([len(context)]) + context
    )
    output, block = b"", b""
    counter = 1
    while len(output) < length:
        block = hmac.digest(secret, block + info + bytes([counter]), hash_name)
        output += block
        counter += 1
    return output[:length]


def tls12_prf(secret: bytes, label: bytes, seed: bytes, length: int, hash_name: str) -> bytes:
    """The TLS 1.2 PRF of RFC 5246 5: P_hash(secret, label + seed)."""
    seed = label + seed
    output, a = b"", seed
    while len(output) < length:
        a = hmac.digest(secret, a, hash_name)
        output += hmac.digest(secret, a + seed, hash_name)
    return output[:length]


def derive_crypto_info(
    version: str,
    cipher: str,
    secrets: Mapping[str, bytes],
    *,
    client_random: bytes,
    server_random: bytes | None,
    tx_seq: int,
    rx_seq: int,
    tx_nonce: bytes | None = None,
) -> tuple[CryptoInfo, CryptoInfo]:
    """The client's (transmit, receive) kernel parameters for a session.

    ``version`` and ``cipher`` are what ``SSLObject.version()``/``cipher()[0]`` say; ``secrets``
    maps NSS key log labels to this session's secrets; ``tx_nonce`` is the TLS 1.2 AES-GCM
    explicit nonce of the next record sent (the sequence number if None). Raises ValueError,
    with a reason fit for a log, when the kernel cannot take this session.
    """
    suite = SUITES.get((version, cipher))
    if suite is None:
        raise ValueError(f"cipher {cipher} ({version}) is not supported by kernel TLS")
    if version == "TLSv1.3":
        infos = []
        for label, seq in (
            ("CLIENT_TRAFFIC_SECRET_0", tx_seq),
            ("SERVER_TRAFFIC_SECRET_0", rx_seq),
        ):
            secret = _secret(secrets, label)
            key = hkdf_expand_label(secret, b"key", b"", suite.key_size, suite.hash_name)
            iv = hkdf_expand_label(secret, b"iv", b"", 12, suite.hash_name)
            salt, iv = iv[: suite.salt_size], iv[suite.salt_size :]
            infos.append(CryptoInfo(TLS_1_3_VERSION, suite.cipher_type, key, iv, salt, seq))
        return infos[0], infos[1]
    if server_random is None:
        raise ValueError("the ServerHello was not seen, so the TLS 1.2 keys cannot be derived")
    master_secret = _secret(secrets, "CLIENT_RANDOM")
    fixed_iv = 12 if suite.salt_size == 0 else suite.salt_size  # RFC 7905 2 / RFC 5288 3
    block = tls12_prf(
        master_secret,
        b"key expansion",
        server_random + client_random,
        2 * (suite.key_size + fixed_iv),
        suite.hash_name,
    )
    client_key, server_key = block[: suite.key_size], block[suite.key_size : 2 * suite.key_size]
    client_iv = block[2 * suite.key_size : 2 * suite.key_size + fixed_iv]
    server_iv = block[2 * suite.key_size + fixed_iv :]
    if suite.salt_size == 0:  # ChaCha20-Poly1305: the nonce is iv XOR sequence, as in 1.3
        tx = CryptoInfo(TLS_1_2_VERSION, suite.cipher_type, client_key, client_iv, b"", tx_seq)
        rx = CryptoInfo(TLS_1_2_VERSION, suite.cipher_type, server_key, server_iv, b"", rx_seq)
        return tx, rx
    explicit = tx_nonce if tx_nonce is not None else tx_seq.to_bytes(8, "big")
    tx = CryptoInfo(TLS_1_2_VERSION, suite.cipher_type, client_key, explicit, client_iv, tx_seq)
    rx_iv = rx_seq.to_bytes(8, "big")  # unused: the kernel reads each record's explicit nonce
    rx = CryptoInfo(TLS_1_2_VERSION, suite.cipher_type, server_key, rx_iv, server_iv, rx_seq)
    return tx, rx


def _secret(secrets: Mapping[str, bytes], label: str) -> bytes:
    try:
        return secrets[label]
    except KeyError:
        raise ValueError(f"OpenSSL's key log has no {label} line for this session") from None


def create_context(*, kernel: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context (TLS 1.2+); ``kernel`` keeps TLS 1.2 to ciphers kTLS takes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Renegotiation would change the keys under the kernel; the feed never needs it.
    context.options |= ssl.OP_NO_RENEGOTIATION
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs()
    if kernel:
        context.set_ciphers(KERNEL_TLS12_CIPHERS)
    return context


class KeyLog:
    """OpenSSL's NSS key log for one context, in an anonymous memory file (never on disk)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self._fd = os.memfd_create("tradebalancer-tls-keys", os.MFD_CLOEXEC)
        try:
            # OpenSSL opens the path itself; /proc/self/fd/N reopens the same memory file.
            context.keylog_filename = f"/proc/self/fd/{self._fd}"
        except OSError:
            os.close(self._fd)
            raise

    def read(self, client_random: bytes) -> dict[str, bytes]:
        """The secrets logged for the session with this ClientHello.random, by label."""
        size = os.fstat(self._fd).st_size
        text = os.pread(self._fd, size, 0).decode("ascii", "replace")
        wanted = client_random.hex()
        secrets = {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[1].lower() == wanted:
                with contextlib.suppress(ValueError):
                    secrets[fields[0]] = bytes.fromhex(fields[2])
        return secrets

    def close(self) -> None:
        """Stop logging, overwrite the file with zeros, free it. Idempotent."""
        if self._fd < 0:
            return
        self._context.keylog_filename = None  # type: ignore[assignment]  # None stops logging
        with contextlib.suppress(OSError):
            os.pwrite(self._fd, bytes(os.fstat(self._fd).st_size), 0)
            os.ftruncate(self._fd, 0)
        os.close(self._fd)
        self._fd = -1


class RecordCounter:
    """Counts the TLS records in a byte stream and keeps the first 8 body bytes of the last."""

    def __init__(self) -> None:
        self.records = 0
        self.last_prefix = b""  # for AES-GCM under TLS 1.2: the record's explicit nonce
        self._header = bytearray()
        self._prefix = bytearray()
        self._remaining = 0

    @property
    def at_boundary(self) -> bool:
        """True when the stream so far ends exactly at the end of a record."""
        return not self._header and self._remaining == 0

    def scan(self, data: bytes | memoryview) -> None:
        """Follow ``data``, the next bytes of the stream."""
        i, end = 0, len(data)
        while i < end:
            if self._remaining == 0:
                take = min(RECORD_HEADER_SIZE - len(self._header), end - i)
                self._header += data[i : i + take]
                i += take
                if len(self._header) == RECORD_HEADER_SIZE:
                    self._remaining = int.from_bytes(self._header[3:5], "big")
                    self._header.clear()
                    self._prefix.clear()
                    if self._remaining == 0:
                        self._finish()
                continue
            take = min(self._remaining, end - i)
            if len(self._prefix) < 8:
                self._prefix += data[i : i + min(take, 8 - len(self._prefix))]
            i += take
            self._remaining -= take
            if self._remaining == 0:
                self._finish()

    def _finish(self) -> None:
        self.records += 1
        self.last_prefix = bytes(self._prefix)


class Session:
    """A client TLS session run by OpenSSL over memory BIOs, fed one record at a time.

    It is the whole TLS client until the hand-off, and afterwards serves whatever direction
    the kernel did not take. ``key_log`` (kernel modes only) yields the secrets; it is closed
    when the handshake ends.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        server_hostname: str,
        address: str,
        *,
        key_log: KeyLog | None = None,
    ) -> None:
        self.address = address
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.object = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname=server_hostname
        )
        self.handshake_done = False
        self.client_random: bytes | None = None
        self.server_random: bytes | None = None
        self._key_log = key_log
        self._secrets: dict[str, bytes] = {}
        self._server_changed_cipher = False
        self._sent = RecordCounter()
        self._received = RecordCounter()
        self._sent_base = self._received_base = 0

    # -- the handshake -----------------------------------------------------------------------

    def handshake(self, sock: socket.socket, deadline: float) -> None:
        """Run the verified handshake over the blocking ``sock`` until ``deadline`` (monotonic).

        Raises TransportError, caused by the ``ssl.SSLError`` or ``OSError`` behind it.
        """
        done = False
        try:
            while True:
                try:
                    self.object.do_handshake()
                except ssl.SSLWantReadError:
                    self._send_all(sock, deadline)
                    if not self.receive_record(sock, deadline):
                        raise TransportError(
                            self.address, "the server closed the connection in the TLS handshake"
                        ) from None
                    continue
                self._send_all(sock, deadline)
                done = True
                break
        except ssl.SSLError as exc:
            with contextlib.suppress(OSError):  # the alert OpenSSL wrote tells the server why
                sock.settimeout(0.1)
                sock.send(self.outgoing.read())
            raise TransportError(
                self.address, f"TLS handshake failed: {exc.reason or exc}"
            ) from exc
        except TimeoutError as exc:
            raise TransportError(self.address, "timed out in the TLS handshake") from exc
        except OSError as exc:
            raise TransportError(
                self.address, f"TLS handshake failed: {describe_os_error(exc)}"
            ) from exc
        finally:
            if self._key_log is not None:
                if done and self.client_random is not None:
                    self._secrets = self._key_log.read(self.client_random)
                self._key_log.close()
        self.handshake_done = True
        self._sent_base, self._received_base = self._sent.records, self._received.records

    def receive_record(self, sock: socket.socket, deadline: float) -> bool:
        """Read exactly one record from the blocking ``sock`` and feed it; False at EOF."""
        header = _receive_exactly(sock, RECORD_HEADER_SIZE, deadline)
        if not header:
            return False
        kind, length = header[0], int.from_bytes(header[3:5], "big")
        if kind not in (20, 21, 22, 23) or header[1:2] != b"\x03" or length > MAX_RECORD_SIZE:
            raise TransportError(
                self.address,
                f"the server does not speak TLS (it sent {header!r}); is it the right port?",
            )
        body = _receive_exactly(sock, length, deadline)
        if len(header) < RECORD_HEADER_SIZE or len(body) < length:
            raise TransportError(self.address, "the server closed the connection inside a record")
        if not self.handshake_done:
            if kind == CHANGE_CIPHER_SPEC:
                self._server_changed_cipher = True
            elif (
                kind == HANDSHAKE
                and not self._server_changed_cipher
                and body[:1] == b"\x02"  # ServerHello
                and self.server_random is None
                and len(body) >= 38
            ):
                self.server_random = body[6:38]  # ServerHello.random (RFC 5246 7.4.1.3)
        self.feed(header + body)
        return True

    def _send_all(self, sock: socket.socket, deadline: float) -> None:
        data = self.data_to_send()
        if data:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(data)

    # -- records in and out --------------------------------------------------------------------

    def feed(self, data: bytes | memoryview) -> None:
        """Give OpenSSL bytes received from the server."""
        self._received.scan(data)
        self.incoming.write(data)

    def data_to_send(self) -> bytes:
        """The records OpenSSL wrote since the last call (to send to the server, in order)."""
        data = self.outgoing.read()
        if data:
            if self.client_random is None and len(data) >= 43 and data[0] == HANDSHAKE:
                self.client_random = data[11:43]  # the ClientHello.random of RFC 8446 4.1.2
            self._sent.scan(data)
        return data

    @property
    def version(self) -> int:
        """The negotiated version as the kernel numbers it (0x0303 or 0x0304)."""
        return TLS_1_3_VERSION if self.object.version() == "TLSv1.3" else TLS_1_2_VERSION

    @property
    def tx_seq(self) -> int:
        """The sequence number of the next record this client sends."""
        first = 0 if self.version == TLS_1_3_VERSION else 1
        return first + self._sent.records - self._sent_base

    @property
    def rx_seq(self) -> int:
        """The sequence number of the next record the server sends."""
        first = 0 if self.version == TLS_1_3_VERSION else 1
        return first + self._received.records - self._received_base

    # -- the hand-off --------------------------------------------------------------------------

    def crypto_info(self) -> tuple[CryptoInfo, CryptoInfo]:
        """What a hand-off now would give the kernel: (transmit, receive).

        Raises ValueError with the reason when the session cannot be handed off now: no
        secrets, an unsupported cipher, or data OpenSSL has not delivered or sent yet.
        """
        if not self.handshake_done or self.client_random is None:
            raise ValueError("the TLS handshake is not complete")
        if not self._received.at_boundary or self.incoming.pending or self.object.pending():
            raise ValueError("received data is still inside OpenSSL")
        if not self._sent.at_boundary or self.outgoing.pending:
            raise ValueError("OpenSSL has data that was not sent yet")
        if not self._secrets:
            raise ValueError("OpenSSL's key log gave no secrets for this session")
        cipher = self.object.cipher()
        prefix = self._sent.last_prefix
        tx_nonce = ((int.from_bytes(prefix, "big") + 1) % 2**64).to_bytes(8, "big")
        return derive_crypto_info(
            self.object.version() or "",
            cipher[0] if cipher else "",
            self._secrets,
            client_random=self.client_random,
            server_random=self.server_random,
            tx_seq=self.tx_seq,
            rx_seq=self.rx_seq,
            tx_nonce=tx_nonce if len(prefix) == 8 else None,
        )

    def hand_off(self, sock: socket.socket) -> str | None:
        """Give the session to the kernel (see ``install``); the secrets are forgotten after."""
        try:
            tx, rx = self.crypto_info()
        except ValueError as exc:
            raise KernelTLSUnavailable(self.address, str(exc)) from exc
        finally:
            self.forget_secrets()
        return install(sock, tx, rx, self.address)

    def forget_secrets(self) -> None:
        """Drop the secrets from the key log (no hand-off can follow)."""
        self._secrets = {}


def _receive_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    """``size`` bytes from the blocking ``sock``, fewer only at EOF; TimeoutError at deadline."""
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("deadline passed")
        sock.settimeout(remaining)
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def install(sock: socket.socket, tx: CryptoInfo, rx: CryptoInfo, address: str) -> str | None:
    """Hand the session on ``sock`` to the kernel: TCP_ULP "tls", then TLS_RX, then TLS_TX.

    Returns None when both directions are in the kernel, or the reason transmit stayed in user
    space (receive is in the kernel). Raises KernelTLSUnavailable when nothing was handed over:
    the socket then still carries the TLS session untouched; TransportError if the connection
    itself ended before the hand-off (the kernel takes only an established one: ENOTCONN), which
    says nothing about kernel TLS.
    """
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        if exc.errno in _CONNECTION_GONE:
            raise TransportError(
                address, f"the connection ended before the kernel TLS hand-off ({_errno_name(exc)})"
            ) from exc
        raise KernelTLSUnavailable(address, _describe_ulp_error(exc)) from exc
    try:
        sock.setsockopt(SOL_TLS, TLS_RX, rx.pack())
    except OSError as exc:
        raise KernelTLSUnavailable(address, _describe_setup_error("receive", rx, exc)) from exc
    try:
        sock.setsockopt(SOL_TLS, TLS_TX, tx.pack())
    except OSError as exc:
        return _describe_setup_error("transmit", tx, exc)
    return None


# TCP_ULP on a socket the peer closed or reset (the tls module is there, the connection is not).
_CONNECTION_GONE = frozenset({errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE})


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def describe_os_error(exc: OSError) -> str:
    """A socket error for a log line: what happened and the errno's name."""
    if exc.errno is None:
        return str(exc) or type(exc).__name__
    return f"{exc.strerror or os.strerror(exc.errno)} ({_errno_name(exc)})"


def _describe_ulp_error(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return (
            "the tls kernel module is not loaded (TCP_ULP: ENOENT); run `modprobe tls` "
            "or load it at boot with /etc/modules-load.d"
        )
    if exc.errno == errno.ENOPROTOOPT:
        return "this kernel has no TCP upper layer protocols (TCP_ULP: ENOPROTOOPT)"
    return f"the tls upper layer protocol could not be set (TCP_ULP: {describe_os_error(exc)})"


_CIPHER_NAMES = {
    TLS_CIPHER_AES_GCM_128: "AES-128-GCM",
    TLS_CIPHER_AES_GCM_256: "AES-256-GCM",
    TLS_CIPHER_CHACHA20_POLY1305: "ChaCha20-Poly1305",
}


def _describe_setup_error(direction: str, info: CryptoInfo, exc: OSError) -> str:
    option = "TLS_RX" if direction == "receive" else "TLS_TX"
    what = (
        f"TLS {'1.3' if info.version == TLS_1_3_VERSION else '1.2'} "
        f"with {_CIPHER_NAMES.get(info.cipher_type, str(info.cipher_type))}"
    )
    if exc.errno in (errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.ENOENT):
        return (
            f"this kernel cannot {direction} {what} ({option}: {_errno_name(exc)}); "
            "TLS 1.3 needs Linux 5.1, AES-256-GCM 5.2, ChaCha20-Poly1305 5.11"
        )
    return f"kernel TLS {direction} setup failed for {what} ({option}: {describe_os_error(exc)})"


# -- after the hand-off ------------------------------------------------------------------------

_CONTROL_SPACE = socket.CMSG_SPACE(1)
_ALERT_NAMES = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    47: "illegal_parameter",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    80: "internal_error",
    90: "user_canceled",
    100: "no_renegotiation",
    109: "missing_extension",
    110: "unsupported_extension",
    116: "certificate_required",
}
_RECEIVE_ERRORS = {
    errno.EBADMSG: "kernel TLS could not authenticate a record (EBADMSG): the keys or sequence "
    "numbers are out of step with the server",
    errno.EKEYEXPIRED: "the server updated its TLS 1.3 keys (KeyUpdate) and kernel TLS waits for "
    "new keys this service does not install (EKEYEXPIRED)",
    errno.EMSGSIZE: "the server sent a TLS record larger than allowed (EMSGSIZE)",
    errno.EINVAL: "the server sent a TLS record of another version (EINVAL)",
    errno.EBUSY: "kernel TLS refused the read (EBUSY): the session is being changed",
    errno.EIO: "kernel TLS failed (EIO): the session is broken",
    errno.ECONNRESET: "the server reset the connection (ECONNRESET)",
}


class ControlRecords:
    """Sans-I/O: what the non-data records kernel TLS hands back mean to this client.

    Never raises on the server's input: an error is kept in ``error`` for the caller.
    """

    def __init__(self, version: int) -> None:
        self.version = version
        self.error: str | None = None
        self.tickets = 0  # TLS 1.3 NewSessionTickets skipped (resumption is not used)
        self._handshake = bytearray()  # a handshake message may span records (RFC 8446 5.1)

    def receive(self, record_type: int, payload: bytes | memoryview) -> bool:
        """Take one control record; True when the server closed the session (close_notify)."""
        if self.error is not None:
            return False
        if record_type == ALERT:
            return self._receive_alert(bytes(payload))
        if record_type == HANDSHAKE:
            self._handshake += payload
            self._receive_handshake()
            return False
        self.error = f"the server sent an unexpected TLS record (content type {record_type})"
        return False

    def _receive_alert(self, payload: bytes) -> bool:
        if not payload or len(payload) % 2:
            self.error = "the server sent a malformed TLS alert"
            return False
        for level, description in zip(payload[::2], payload[1::2], strict=True):
            if description == 0:
                return True
            # user_canceled precedes close_notify (RFC 8446 6.1); TLS 1.2 warnings are advisory.
            if description == 90 or (level == 1 and self.version == TLS_1_2_VERSION):
                continue
            name = _ALERT_NAMES.get(description, "unknown")
            self.error = f"the server sent a fatal TLS alert: {name} ({description})"
            return False
        return False

    def _receive_handshake(self) -> None:
        buffer = self._handshake
        while len(buffer) >= 4:
            kind, length = buffer[0], int.from_bytes(buffer[1:4], "big")
            if length > 2**16:
                self.error = f"the server sent an oversized handshake message (type {kind})"
                return
            if len(buffer) < 4 + length:
                return
            del buffer[: 4 + length]
            if self.version == TLS_1_3_VERSION and kind == 4:  # NewSessionTicket
                self.tickets += 1
            elif self.version == TLS_1_2_VERSION and kind == 0:
                pass  # HelloRequest: a client may ignore it (RFC 5246 7.4.1.1)
            elif kind == 24:
                self.error = (
                    "the server updated its TLS 1.3 keys (KeyUpdate, RFC 8446 4.6.3), which "
                    "kernel TLS here does not follow; reconnect"
                )
                return
            else:
                self.error = f"the server sent an unexpected handshake message (type {kind})"
                return


def receive_into(
    sock: socket.socket, buffer: memoryview, control: ControlRecords, address: str
) -> int:
    """Application data from a socket whose receive side is in the kernel, into ``buffer``.

    Returns the byte count, 0 at the end of the stream (FIN or close_notify); raises
    BlockingIOError when nothing is there, TransportError when the session broke.
    """
    while True:
        try:
            count, ancillary, _flags, _address = sock.recvmsg_into([buffer], _CONTROL_SPACE)
        except BlockingIOError:
            raise
        except OSError as exc:
            message = _RECEIVE_ERRORS.get(exc.errno or 0) or describe_os_error(exc)
            raise TransportError(address, message) from exc
        record_type = APPLICATION_DATA
        for level, kind, data in ancillary:
            if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and data:
                record_type = data[0]
        if record_type == APPLICATION_DATA:
            return count
        if control.receive(record_type, buffer[:count]):
            return 0
        if control.error is not None:
            raise TransportError(address, control.error)


def send_close_notify(sock: socket.socket) -> None:
    """Have the kernel send a close_notify alert (a record of type 21, tls.rst)."""
    sock.sendmsg(
        [CLOSE_NOTIFY], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([ALERT]))], socket.MSG_DONTWAIT
    )
