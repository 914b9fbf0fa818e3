"""The TLS client session: a verified handshake in OpenSSL, then its hand-off to the kernel.

Owns the TLS client session (an ``ssl.SSLObject`` over memory BIOs), the secrets it yields
(OpenSSL's key log) and the counting of its records, which says when the session can be handed
to the kernel and with which sequence numbers. Must not touch: connecting, socket lifetime, the
event loop, websockets (``connector.py`` and ``stream.py`` own the socket and call this), the
key schedule (``keys.py``), the kernel's socket options and records (``kernel.py``).
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
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import socket
import ssl
import time

from ..errors import KernelTLSUnavailable, TransportError
from .kernel import CHANGE_CIPHER_SPEC, HANDSHAKE, describe_os_error, install
from .keys import TLS_1_2_VERSION, TLS_1_3_VERSION, CryptoInfo, derive_crypto_info

# The TLS record header (RFC 8446 5.1 / RFC 5246 6.2).
RECORD_HEADER_SIZE = 5
MAX_RECORD_SIZE = 2**14 + 2048  # the largest TLSCiphertext.length any version allows

# What kernels from 5.11 on take for TLS 1.2 (Debian 12 ships 6.1); every TLS 1.3 suite
# OpenSSL enables by default is AES-GCM or ChaCha20-Poly1305, so only 1.2 is restricted.
KERNEL_TLS12_CIPHERS = ":".join(
    f"ECDHE-{auth}-{cipher}"
    for cipher in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305")
    for auth in ("ECDSA", "RSA")
)


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
        self._unsent = bytearray()  # handshake records OpenSSL wrote that the socket did not take
        self._partial = bytearray()  # the record being received during the handshake
        self._handshake_returned = False

    # -- the handshake -----------------------------------------------------------------------

    def step_handshake(self, sock: socket.socket) -> int:
        """Advance the handshake over the non-blocking ``sock``; return what to wait for.

        0 once the handshake is complete (call ``hand_off`` or go on in user space);
        ``selectors.EVENT_READ`` or ``EVENT_WRITE`` when the socket must be ready first. Reads
        one record at a time and never past a record boundary. Raises TransportError, caused
        by the ``ssl.SSLError`` or ``OSError`` behind it; the key log is closed then, as it is
        once the handshake completes.
        """
        try:
            while True:
                if self._unsent:
                    try:
                        sent = sock.send(self._unsent)
                    except BlockingIOError:
                        return selectors.EVENT_WRITE
                    del self._unsent[:sent]
                    continue
                if self._handshake_returned:
                    self._finish_handshake(complete=True)
                    return 0
                try:
                    self.object.do_handshake()
                except ssl.SSLWantReadError:
                    self._unsent += self.data_to_send()
                    if not self._unsent and not self._receive_record_nowait(sock):
                        return selectors.EVENT_READ
                    continue
                self._unsent += self.data_to_send()
                self._handshake_returned = True
        except ssl.SSLError as exc:
            with contextlib.suppress(OSError):  # the alert OpenSSL wrote tells the server why
                sock.send(self.outgoing.read(), socket.MSG_DONTWAIT)
            self._finish_handshake(complete=False)
            raise TransportError(
                self.address, f"TLS handshake failed: {exc.reason or exc}"
            ) from exc
        except OSError as exc:
            self._finish_handshake(complete=False)
            raise TransportError(
                self.address, f"TLS handshake failed: {describe_os_error(exc)}"
            ) from exc
        except TransportError:
            self._finish_handshake(complete=False)
            raise

    def handshake(self, sock: socket.socket, deadline: float) -> None:
        """Run the whole handshake over ``sock`` until ``deadline`` (monotonic), waiting in poll.

        ``step_handshake`` for callers that can wait (tests, tools); the socket's blocking mode
        and timeout are given back after. Raises TransportError, on timeout too.
        """
        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            while events := self.step_handshake(sock):
                remaining = max(deadline - time.monotonic(), 0.0)
                reading = events == selectors.EVENT_READ
                waited = select.select(
                    [sock] if reading else [], [] if reading else [sock], [], remaining
                )
                if not any(waited[:2]):
                    self.abandon()
                    raise TransportError(self.address, "timed out in the TLS handshake")
        finally:
            sock.settimeout(timeout)

    def abandon(self) -> None:
        """Give up a handshake that has not completed: close the key log, forget the secrets."""
        self._finish_handshake(complete=False)

    def _finish_handshake(self, *, complete: bool) -> None:
        if self._key_log is not None:
            if complete and self.client_random is not None:
                self._secrets = self._key_log.read(self.client_random)
            self._key_log.close()
            self._key_log = None
        if complete and not self.handshake_done:
            self.handshake_done = True
            self._sent_base, self._received_base = self._sent.records, self._received.records

    def _receive_record_nowait(self, sock: socket.socket) -> bool:
        """Read on toward the end of the current record, feeding it once whole.

        False when the socket has nothing more now. Asks for no more than the record's own
        bytes, so whatever follows the server's Finished stays in the socket for the kernel.
        """
        partial = self._partial
        while True:
            if len(partial) < RECORD_HEADER_SIZE:
                need = RECORD_HEADER_SIZE - len(partial)
            else:
                need = RECORD_HEADER_SIZE + int.from_bytes(partial[3:5], "big") - len(partial)
                if need == 0:
                    header, body = bytes(partial[:RECORD_HEADER_SIZE]), bytes(partial[5:])
                    partial.clear()
                    self._accept_record(header, body)
                    return True
            try:
                chunk = sock.recv(need)
            except BlockingIOError:
                return False
            if not chunk:
                where = "in the TLS handshake" if not partial else "inside a record"
                raise TransportError(self.address, f"the server closed the connection {where}")
            partial += chunk
            if len(partial) == RECORD_HEADER_SIZE:
                self._check_header(bytes(partial))

    def receive_record(self, sock: socket.socket, deadline: float) -> bool:
        """Read exactly one record from the blocking ``sock`` and feed it; False at EOF."""
        header = _receive_exactly(sock, RECORD_HEADER_SIZE, deadline)
        if not header:
            return False
        length = self._check_header(header) if len(header) == RECORD_HEADER_SIZE else 0
        body = _receive_exactly(sock, length, deadline)
        if len(header) < RECORD_HEADER_SIZE or len(body) < length:
            raise TransportError(self.address, "the server closed the connection inside a record")
        self._accept_record(header, body)
        return True

    def _check_header(self, header: bytes) -> int:
        """Return the body length a record header announces, or raise: not TLS at all."""
        kind, length = header[0], int.from_bytes(header[3:5], "big")
        if kind not in (20, 21, 22, 23) or header[1:2] != b"\x03" or length > MAX_RECORD_SIZE:
            raise TransportError(
                self.address,
                f"the server does not speak TLS (it sent {header!r}); is it the right port?",
            )
        return length

    def _accept_record(self, header: bytes, body: bytes) -> None:
        """Note what the handshake needs of a whole record (the server's random), feed it."""
        kind = header[0]
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
