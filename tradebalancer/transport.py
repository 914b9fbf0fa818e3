"""The transport: the one owner of the feed's socket.

Owns connecting (TCP with TCP_NODELAY), the verified TLS handshake, the kernel TLS hand-off
and its fallback, then moving bytes: non-blocking receive straight into the caller's buffer,
a send queue, close_notify on close. Must not touch: websockets, events, the event loop (the
service polls ``fileno()``); how a session is handed to the kernel lives in ``ktls.py`` and
``tlssocket.py``.

Each direction runs in one of three modes:

* ``none``: plain TCP (ws://); ``recv_into`` is one ``recv_into`` syscall.
* ``kernel``: kernel TLS; ``recvmsg_into`` decrypts straight into the caller's buffer and may
  fill it with many records in one call; ``send`` hands plaintext to the kernel.
* ``user``: OpenSSL (``ktls.Session``) over memory BIOs; ciphertext is read into the free
  part of the caller's buffer, copied into OpenSSL, and decrypted back into that buffer.

``tls_mode`` "auto" tries the kernel and keeps going in user space on any failure, with the
reason in ``fallback_reason`` (the TLS session is never restarted for that: OpenSSL simply
keeps the session it negotiated). If the server accepts none of the ciphers kernel TLS takes,
"auto" connects again with OpenSSL's default ciphers. If the kernel takes receive but not
transmit, transmit stays with OpenSSL (see tlssocket.py: the directions are independent) and
``fallback_reason`` says so. "kernel" raises KernelTLSUnavailable instead of any fallback;
"user" never tries.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import cast

from . import ktls, tlssocket
from .errors import KernelTLSUnavailable, TransportError
from .tlssocket import describe_os_error

logger = logging.getLogger(__name__)

TLS_MODES = ("auto", "kernel", "user")

# OpenSSL verify codes (x509_vfy.h) meaning the chain is fine but the name is not.
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
# What a server answers when it shares no cipher with the client's list.
_NO_SHARED_CIPHER = ("HANDSHAKE_FAILURE", "NO_SHARED_CIPHER", "INSUFFICIENT_SECURITY")
_PROBE_TIMEOUT = 3.0  # for the second look at a certificate whose name did not match


class Transport:
    """A connected, non-blocking byte stream to the feed: plain TCP, user TLS or kernel TLS.

    ``address`` is "host:port" for messages; ``tls`` is "none", "user" or "kernel" (kernel when
    either direction is); ``tx_mode``/``rx_mode`` say it per direction; ``fallback_reason``
    says why tls_mode "auto" did not put both directions in the kernel (None otherwise);
    ``tls_version`` and ``cipher`` name what was negotiated (None without TLS).
    """

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        *,
        tx_mode: str = "none",
        rx_mode: str = "none",
        fallback_reason: str | None = None,
        session: ktls.Session | None = None,
    ) -> None:
        self.address = address
        self.tx_mode = tx_mode
        self.rx_mode = rx_mode
        self.tls = (
            "none" if session is None else ("kernel" if "kernel" in (tx_mode, rx_mode) else "user")
        )
        self.fallback_reason = fallback_reason
        self.tls_version = session.object.version() if session is not None else None
        cipher = session.object.cipher() if session is not None else None
        self.cipher = cipher[0] if cipher else None
        self._sock = sock
        self._session = session
        self._control = tlssocket.ControlRecords(session.version) if session is not None else None
        self._outgoing = bytearray()
        self._eof = False
        self._closed = False

    def fileno(self) -> int:
        """The socket's file descriptor, to poll (readable: call recv_into; writable: flush)."""
        return self._sock.fileno()

    # -- receiving ---------------------------------------------------------------------------

    def recv_into(self, buffer: memoryview) -> int:
        """Put received plaintext into ``buffer``; return its length, 0 at end of stream.

        Non-blocking: raises BlockingIOError when nothing is available now (poll, then call
        again), TransportError when the connection or the TLS session broke. Call it until it
        raises BlockingIOError: user-space TLS may hold decrypted data the socket no longer
        signals.
        """
        if self._eof:
            return 0
        if self.rx_mode == "kernel":
            assert self._control is not None
            count = tlssocket.receive_into(self._sock, buffer, self._control, self.address)
        elif self.rx_mode == "user":
            count = self._receive_user(buffer)
        else:
            try:
                count = self._sock.recv_into(buffer)
            except BlockingIOError:
                raise
            except OSError as exc:
                raise TransportError(self.address, f"receive: {describe_os_error(exc)}") from exc
        if count == 0:
            self._eof = True
        return count

    def _receive_user(self, buffer: memoryview) -> int:
        session = self._session
        assert session is not None
        # SSLObject.read(len, buffer) returns a count (typeshed says bytes).
        read = cast("Callable[[int, memoryview], int]", session.object.read)
        sock = self._sock
        filled, size = 0, len(buffer)
        try:
            while filled < size:
                try:
                    count = read(size - filled, buffer[filled:])
                except ssl.SSLWantReadError:
                    count = -1
                except ssl.SSLZeroReturnError:  # close_notify (older Pythons raise)
                    count = 0
                if count > 0:
                    filled += count
                    continue
                if count == 0:  # close_notify: CPython's read returns 0 for it
                    self._eof = True
                    break
                # OpenSSL needs more ciphertext: the free part of the buffer holds it briefly
                # (the BIO copies it), so no other buffer is needed.
                try:
                    got = sock.recv_into(buffer[filled:])
                except BlockingIOError:
                    if filled:
                        break
                    raise
                if got == 0:  # FIN without close_notify: the stream ends all the same
                    self._eof = True
                    break
                session.feed(buffer[filled : filled + got])
        except BlockingIOError:
            raise
        except ssl.SSLError as exc:
            raise TransportError(self.address, f"TLS error: {exc.reason or exc}") from exc
        except OSError as exc:
            raise TransportError(self.address, f"receive: {describe_os_error(exc)}") from exc
        finally:
            if session.outgoing.pending:  # e.g. OpenSSL answering a TLS 1.3 KeyUpdate
                self._outgoing += session.data_to_send()
        if self._outgoing:
            self.flush()
        return filled

    # -- sending -----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue ``data`` and write what the socket takes now; never blocks."""
        if self._closed:
            raise TransportError(self.address, "send on a closed connection")
        if self.tx_mode == "user":
            assert self._session is not None
            try:
                self._session.object.write(data)
            except ssl.SSLError as exc:
                raise TransportError(self.address, f"TLS error: {exc.reason or exc}") from exc
            self._outgoing += self._session.data_to_send()
        else:
            self._outgoing += data
        self.flush()

    def wants_write(self) -> bool:
        """True while queued bytes remain (poll the socket for writability, then flush)."""
        return bool(self._outgoing)

    def flush(self) -> None:
        """Write as much of the queue as the socket takes now."""
        outgoing = self._outgoing
        while outgoing:
            try:
                sent = self._sock.send(outgoing)
            except BlockingIOError:
                return
            except OSError as exc:
                raise TransportError(self.address, f"send: {describe_os_error(exc)}") from exc
            del outgoing[:sent]

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Send close_notify if TLS (best effort, never blocks), then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(TransportError):
            self.flush()
        # A close_notify behind bytes still queued would arrive out of order: skip it then.
        if not self._outgoing:
            with contextlib.suppress(OSError):
                if self.tx_mode == "kernel":
                    tlssocket.send_close_notify(self._sock)
                elif self.tx_mode == "user" and self._session is not None:
                    with contextlib.suppress(ssl.SSLError):  # WantRead: the reply is not awaited
                        self._session.object.unwrap()
                    self._sock.send(self._session.data_to_send())
        self._sock.close()


def open_transport(
    host: str,
    port: int,
    *,
    tls: bool,
    tls_mode: str = "auto",
    ca_file: str | None = None,
    server_hostname: str | None = None,
    timeout: float = 10.0,
) -> Transport:
    """Connect to ``host:port`` (TCP_NODELAY), with a verified TLS handshake if ``tls``.

    Blocking, bounded by ``timeout`` in all; the transport returned is non-blocking. TLS
    verifies against the system CAs or ``ca_file`` and checks ``server_hostname`` (default
    ``host``, also sent as SNI). See the module docstring for ``tls_mode``. Raises
    TransportError saying what failed, KernelTLSUnavailable for tls_mode "kernel".
    """
    if tls_mode not in TLS_MODES:
        raise ValueError(f"tls_mode must be one of {TLS_MODES}, got {tls_mode!r}")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    deadline = time.monotonic() + timeout
    if not tls:
        sock = _connect(host, port, address, deadline, timeout)
        sock.setblocking(False)
        return Transport(sock, address)
    try:
        return _open_tls(host, port, address, tls_mode, ca_file, server_hostname, deadline, timeout)
    except TransportError as exc:
        cause = exc.__cause__
        if tls_mode == "user" or not isinstance(cause, ssl.SSLError):
            raise
        if not any(reason in str(cause.reason) for reason in _NO_SHARED_CIPHER):
            raise
        reason = f"the server accepts none of the ciphers kernel TLS takes ({cause.reason})"
        if tls_mode == "kernel":
            raise KernelTLSUnavailable(address, reason) from exc
        fallback = f"{reason}; connected again with OpenSSL's default ciphers"
    transport = _open_tls(host, port, address, "user", ca_file, server_hostname, deadline, timeout)
    transport.fallback_reason = fallback
    return transport


def _connect(host: str, port: int, address: str, deadline: float, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection(
            (host, port), timeout=max(deadline - time.monotonic(), 0.001)
        )
    except socket.gaierror as exc:
        raise TransportError(address, f"cannot resolve {host!r}: {exc.strerror}") from exc
    except TimeoutError as exc:
        raise TransportError(address, f"timed out connecting (timeout {timeout:g} s)") from exc
    except ConnectionRefusedError as exc:
        raise TransportError(address, "connection refused: is the server listening?") from exc
    except OSError as exc:
        raise TransportError(address, f"cannot connect: {describe_os_error(exc)}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small writes go out at once
    except OSError:
        sock.close()
        raise
    return sock


def _open_tls(
    host: str,
    port: int,
    address: str,
    tls_mode: str,
    ca_file: str | None,
    server_hostname: str | None,
    deadline: float,
    timeout: float,
) -> Transport:
    try:
        context = ktls.create_context(kernel=tls_mode != "user", ca_file=ca_file)
    except OSError as exc:
        raise TransportError(address, f"cannot load the CA file {ca_file}: {exc}") from exc
    hostname = server_hostname or host
    sock = _connect(host, port, address, deadline, timeout)
    key_log: ktls.KeyLog | None = None
    fallback_reason: str | None = None
    try:
        if tls_mode != "user":
            try:
                key_log = ktls.KeyLog(context)
            except OSError as exc:
                fallback_reason = f"OpenSSL's key log cannot be kept in memory: {exc}"
                if tls_mode == "kernel":
                    raise KernelTLSUnavailable(address, fallback_reason) from exc
        session = ktls.Session(context, hostname, address, key_log=key_log)
        try:
            session.handshake(sock, deadline)
        except TransportError as exc:
            raise _explain(exc, host, port, hostname, ca_file, deadline) from exc.__cause__
        finally:
            if key_log is not None:
                key_log.close()
        tx_mode = rx_mode = "user"
        if key_log is not None:
            try:
                partial = session.hand_off(sock)
            except KernelTLSUnavailable as exc:
                if tls_mode == "kernel":
                    raise
                fallback_reason = exc.message
            else:
                rx_mode = "kernel"
                if partial is None:
                    tx_mode = "kernel"
                elif tls_mode == "kernel":
                    raise KernelTLSUnavailable(address, partial)
                else:
                    fallback_reason = f"transmit stays in user space: {partial}"
        sock.setblocking(False)
        logger.debug(
            "%s: %s %s, transmit in %s space, receive in %s space",
            address,
            session.object.version(),
            (session.object.cipher() or ("?",))[0],
            tx_mode,
            rx_mode,
        )
    except BaseException:
        if key_log is not None:
            key_log.close()
        sock.close()
        raise
    return Transport(
        sock,
        address,
        tx_mode=tx_mode,
        rx_mode=rx_mode,
        fallback_reason=fallback_reason,
        session=session,
    )


def _explain(
    error: TransportError,
    host: str,
    port: int,
    hostname: str,
    ca_file: str | None,
    deadline: float,
) -> TransportError:
    """A handshake error with what was expected and found when a certificate was refused."""
    cause = error.__cause__
    if not isinstance(cause, ssl.SSLCertVerificationError):
        return error
    if cause.verify_code in _NAME_MISMATCH:
        names = _certificate_names(host, port, hostname, ca_file, deadline)
        found = f"the certificate is for {', '.join(names)}" if names else "it is not"
        return TransportError(
            error.address,
            f"certificate verify failed: hostname mismatch: expected {hostname!r}, {found}; "
            "set server_hostname if the server is known by another name",
        )
    trusted = f"the CA file {ca_file}" if ca_file else "the system CA store"
    return TransportError(
        error.address,
        f"certificate verify failed: {cause.verify_message} (checked against {trusted})",
    )


def _certificate_names(
    host: str, port: int, hostname: str, ca_file: str | None, deadline: float
) -> list[str]:
    """The names in the server's certificate, read in a second, verified-chain handshake."""
    context = ktls.create_context(kernel=False, ca_file=ca_file)
    context.check_hostname = False  # the chain is still verified
    timeout = min(max(deadline - time.monotonic(), 0.1), _PROBE_TIMEOUT)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=hostname) as tls,
        ):
            certificate = tls.getpeercert() or {}
    except (OSError, ValueError):
        return []
    names = [value for _, value in _pairs(certificate.get("subjectAltName"))]
    if not names:  # an old certificate with only a subject common name
        for rdn in certificate.get("subject", ()):
            names += [value for key, value in _pairs(rdn) if key == "commonName"]
    return [repr(name) for name in names]


def _pairs(value: object) -> list[tuple[str, str]]:
    """The (key, value) pairs of a getpeercert() field, whatever shape it arrived in."""
    if not isinstance(value, tuple):
        return []
    return [
        (str(item[0]), str(item[1])) for item in value if isinstance(item, tuple) and len(item) == 2
    ]
