"""The kernel's TLS socket interface: the hand-off of a session's keys, then its records.

Owns the socket options of include/uapi/linux/tls.h, the ``setsockopt`` hand-off of a
``CryptoInfo`` pair (``install``) with its failures described for a log and, after it, the
kernel's record interface (``recvmsg`` control messages, alerts, close_notify). Must not touch:
OpenSSL and its secrets (``session.py``), the key schedule (``keys.py``), connecting, socket
lifetime, the event loop (``connector.py`` and ``stream.py`` own the socket and call this).
Only the standard library is used at run time.

Design, after Documentation/networking/tls.rst and include/uapi/linux/tls.h:

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

import errno
import os
import socket

from ..errors import KernelTLSUnavailable, TransportError
from .keys import (
    TLS_1_2_VERSION,
    TLS_1_3_VERSION,
    TLS_CIPHER_AES_GCM_128,
    TLS_CIPHER_AES_GCM_256,
    TLS_CIPHER_CHACHA20_POLY1305,
    CryptoInfo,
)

# include/uapi/linux/tls.h and include/linux/socket.h; Python 3.11 names none of them.
SOL_TLS = 282
TCP_ULP = 31
TLS_TX = 1
TLS_RX = 2
TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2

# TLS record content types (RFC 8446 5.1).
CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA = 20, 21, 22, 23
CLOSE_NOTIFY = b"\x01\x00"  # alert level warning, description close_notify (RFC 8446 6.1)


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
