"""Opening the connection to the feed without ever blocking the event loop.

Owns establishing a connection: the name lookup, the TCP connect, the verified TLS handshake,
the kernel TLS hand-off and its fallback, each a step the loop takes when the socket is ready,
all within one timeout; then it hands the socket over to a Transport (stream.py). Must not
touch: websockets, events, the event loop itself (the service polls ``pollable()``); how a
session is handed to the kernel lives in session.py and kernel.py.

``tls_mode`` "auto" tries the kernel and keeps going in user space on any failure, with the
reason in ``fallback_reason`` (the TLS session is never restarted for that: OpenSSL simply
keeps the session it negotiated). If the server accepts none of the ciphers kernel TLS takes,
"auto" connects again with OpenSSL's default ciphers. If the kernel takes receive but not
transmit, transmit stays with OpenSSL (see kernel.py: the directions are independent) and
``fallback_reason`` says so. "kernel" raises KernelTLSUnavailable instead of any fallback;
"user" never tries.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import KernelTLSUnavailable, TransportError
from .kernel import describe_os_error
from .session import KeyLog, Session, create_context
from .stream import Transport

logger = logging.getLogger(__name__)

TLS_MODES = ("auto", "kernel", "user")

# OpenSSL verify codes (x509_vfy.h) meaning the chain is fine but the name is not.
_NAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
# What a server answers when it shares no cipher with the client's list.
_NO_SHARED_CIPHER = ("HANDSHAKE_FAILURE", "NO_SHARED_CIPHER", "INSUFFICIENT_SECURITY")
# For the second look at a certificate whose name did not match: short, since it blocks the
# loop (a stop waits for it), and it only adds detail to an error the log shows anyway.
_PROBE_TIMEOUT = 1.0


class Connector:
    """Opens a Transport without ever blocking the caller: one step whenever its fd is ready.

    Phases: ``resolving`` (getaddrinfo, in a thread of its own unless the host is an address:
    a resolver that does not answer must not stall the event loop), ``connecting`` (a
    non-blocking connect to each address in turn, as ``socket.create_connection`` tries them),
    ``handshaking`` (the verified TLS handshake, record by record), then the kernel TLS
    hand-off, which does not wait. The caller polls ``pollable()`` for ``events()`` and calls
    ``step(now)`` when it is ready or ``deadline`` has passed, until ``step`` returns the
    Transport; ``step`` raises TransportError (KernelTLSUnavailable for tls_mode "kernel") when
    the attempt failed, and the timeout covers all the phases together. ``close()`` abandons an
    attempt at any point (a stop: nothing here outlives it but a resolver thread, which ends on
    its own).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool,
        tls_mode: str = "auto",
        ca_file: str | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
        now: float,
    ) -> None:
        if tls_mode not in TLS_MODES:
            raise ValueError(f"tls_mode must be one of {TLS_MODES}, got {tls_mode!r}")
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.tls = tls
        self.tls_mode = tls_mode
        self.ca_file = ca_file
        self.hostname = server_hostname or host
        self.timeout = timeout
        self.deadline = now + timeout
        self.phase = "resolving"
        self._lookup: _Lookup | None = _Lookup(host, port)
        self._addresses: list[_Address] = []
        self._current: _Address = (0, ())  # the address being tried
        self._errors: list[OSError] = []
        self._sock: socket.socket | None = None
        self._session: Session | None = None
        self._key_log: KeyLog | None = None
        self._context: ssl.SSLContext | None = None
        self._mode = tls_mode  # "user" after the no-shared-cipher fallback of "auto"
        self.fallback_reason: str | None = None
        self._events = selectors.EVENT_READ

    def pollable(self) -> socket.socket:
        """The socket to poll now: it changes from phase to phase and from address to address.

        Tell them apart by identity, not by ``fileno()``: a closed socket's number is free at
        once, and the next address's socket usually gets it.
        """
        if self._lookup is not None:
            return self._lookup.pollable()
        assert self._sock is not None
        return self._sock

    def events(self) -> int:
        """``selectors.EVENT_READ`` or ``EVENT_WRITE``: what ``pollable()`` must be ready for."""
        return self._events

    def step(self, now: float) -> Transport | None:
        """Go as far as possible without blocking; the Transport once connected, else None."""
        try:
            if now >= self.deadline:
                raise TransportError(self.address, self._timed_out())
            if self._lookup is not None:
                if not self._lookup.done:
                    return None
                self._resolved()
            while True:
                if self.phase == "connecting":
                    if not self._connect_next():
                        return None
                    if not self.tls:
                        return self._connected_plain()
                    self._start_tls()
                transport = self._handshake()
                if transport is not None or self.phase == "handshaking":
                    return transport
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Abandon the attempt: the socket, the session and its key log. Idempotent."""
        if self._lookup is not None:
            self._lookup.close()
            self._lookup = None
        self._drop_attempt()

    # -- the phases ------------------------------------------------------------------------

    def _timed_out(self) -> str:
        where = {
            "resolving": f"resolving {self.host!r}",
            "connecting": "connecting",
            "handshaking": "in the TLS handshake",
        }[self.phase]
        return f"timed out {where} (connect_timeout {self.timeout:g} s)"

    def _resolved(self) -> None:
        lookup = self._lookup
        assert lookup is not None
        self._lookup = None
        lookup.close()
        if lookup.error is not None:
            raise TransportError(
                self.address, f"cannot resolve {self.host!r}: {lookup.error.strerror}"
            ) from lookup.error
        self._addresses = list(lookup.addresses)
        self.phase = "connecting"

    def _connect_next(self) -> bool:
        """Finish the pending connect or start the next; True once one is established."""
        while True:
            sock = self._sock
            if sock is not None:  # a connect in progress: writable means it ended
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error == 0:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return True
                self._errors.append(OSError(error, os.strerror(error)))
                sock.close()
                self._sock = None
            if not self._addresses:
                raise self._connect_error()
            family, address = self._current = self._addresses.pop(0)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setblocking(False)
            self._sock = sock
            error = sock.connect_ex(address)
            if error in (errno.EINPROGRESS, errno.EAGAIN):
                self._events = selectors.EVENT_WRITE
                return False
            if error != 0:
                self._errors.append(OSError(error, os.strerror(error)))
                sock.close()
                self._sock = None
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return True

    def _connect_error(self) -> TransportError:
        last = self._errors[-1] if self._errors else OSError(errno.EHOSTUNREACH, "no address")
        if last.errno == errno.ECONNREFUSED:
            return TransportError(self.address, "connection refused: is the server listening?")
        return TransportError(self.address, f"cannot connect: {describe_os_error(last)}")

    def _connected_plain(self) -> Transport:
        sock, self._sock = self._sock, None
        assert sock is not None
        return Transport(sock, self.address)

    def _start_tls(self) -> None:
        assert self._sock is not None
        kernel = self._mode != "user"
        try:
            self._context = create_context(kernel=kernel, ca_file=self.ca_file)
        except OSError as exc:
            raise TransportError(
                self.address, f"cannot load the CA file {self.ca_file}: {exc}"
            ) from exc
        self._key_log = None
        if kernel:
            try:
                self._key_log = KeyLog(self._context)
            except OSError as exc:
                reason = f"OpenSSL's key log cannot be kept in memory: {exc}"
                if self._mode == "kernel":
                    raise KernelTLSUnavailable(self.address, reason) from exc
                self.fallback_reason = reason
        self._session = Session(self._context, self.hostname, self.address, key_log=self._key_log)
        self.phase = "handshaking"

    def _handshake(self) -> Transport | None:
        """Advance the TLS handshake; the Transport when done, None to wait (or to retry)."""
        session, sock = self._session, self._sock
        assert session is not None and sock is not None
        try:
            events = session.step_handshake(sock)
        except TransportError as exc:
            if not self._no_shared_cipher(exc):
                raise _explain(
                    exc, self.host, self.port, self.hostname, self.ca_file, self.deadline
                ) from exc.__cause__
            # "auto": the server takes none of the ciphers kernel TLS does; try OpenSSL's own.
            self._drop_attempt()
            self._mode = "user"
            self.fallback_reason = (
                f"the server accepts none of the ciphers kernel TLS takes "
                f"({getattr(exc.__cause__, 'reason', exc)}); connected again with OpenSSL's "
                "default ciphers"
            )
            self._addresses = [self._current]  # the address that answered, again
            self.phase = "connecting"
            return None
        if events:
            self._events = events
            return None
        return self._hand_off()

    def _no_shared_cipher(self, exc: TransportError) -> bool:
        cause = exc.__cause__
        if self._mode == "user" or not isinstance(cause, ssl.SSLError):
            return False
        if not any(reason in str(cause.reason) for reason in _NO_SHARED_CIPHER):
            return False
        if self._mode == "kernel":
            reason = f"the server accepts none of the ciphers kernel TLS takes ({cause.reason})"
            raise KernelTLSUnavailable(self.address, reason) from exc
        return True

    def _hand_off(self) -> Transport:
        session, sock = self._session, self._sock
        assert session is not None and sock is not None
        tx_mode = rx_mode = "user"
        if self._key_log is not None:
            try:
                partial = session.hand_off(sock)
            except KernelTLSUnavailable as exc:
                if self._mode == "kernel":
                    raise
                self.fallback_reason = exc.message
            else:
                rx_mode = "kernel"
                if partial is None:
                    tx_mode = "kernel"
                elif self._mode == "kernel":
                    raise KernelTLSUnavailable(self.address, partial)
                else:
                    self.fallback_reason = f"transmit stays in user space: {partial}"
        logger.debug(
            "%s: %s %s, transmit in %s space, receive in %s space",
            self.address,
            session.object.version(),
            (session.object.cipher() or ("?",))[0],
            tx_mode,
            rx_mode,
        )
        self._sock = self._session = None
        self._key_log = None
        self.phase = "connected"
        return Transport(
            sock,
            self.address,
            tx_mode=tx_mode,
            rx_mode=rx_mode,
            fallback_reason=self.fallback_reason,
            session=session,
        )

    def _drop_attempt(self) -> None:
        if self._session is not None:
            self._session.abandon()
            self._session = None
        if self._key_log is not None:
            self._key_log.close()
            self._key_log = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_Address = tuple[int, tuple[Any, ...]]  # (address family, socket address)


def _addresses(infos: Sequence[tuple[Any, ...]]) -> list[_Address]:
    return [(int(info[0]), tuple(info[4])) for info in infos]


class _Lookup:
    """getaddrinfo for a host, in a daemon thread unless it is an address; a pipe says done."""

    def __init__(self, host: str, port: int) -> None:
        self.addresses: list[_Address] = []  # (family, sockaddr), in getaddrinfo's order
        self.error: socket.gaierror | None = None
        self.done = False
        self._read, write = socket.socketpair()
        self._read.setblocking(False)
        try:
            self.addresses = _addresses(
                socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
            )
        except socket.gaierror:
            pass
        else:
            self.done = True
            write.send(b"x")
            write.close()
            return
        thread = threading.Thread(
            target=self._run, args=(host, port, write), name="resolve", daemon=True
        )
        thread.start()

    def _run(self, host: str, port: int, write: socket.socket) -> None:
        try:
            self.addresses = _addresses(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except socket.gaierror as exc:
            self.error = exc
        except OSError as exc:  # e.g. EAI_SYSTEM
            self.error = socket.gaierror(exc.errno, exc.strerror)
        self.done = True
        with contextlib.suppress(OSError):  # the connector may have given up and closed its end
            write.send(b"x")
        write.close()

    def pollable(self) -> socket.socket:
        """Readable once the lookup is done."""
        return self._read

    def close(self) -> None:
        """Stop listening for the answer (the thread, if any, finishes on its own)."""
        self._read.close()


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

    A Connector run to its end, waiting in poll: blocking, bounded by ``timeout`` in all, for
    callers that may wait (tests, tools); the transport returned is non-blocking. TLS verifies
    against the system CAs or ``ca_file`` and checks ``server_hostname`` (default ``host``,
    also sent as SNI). See the module docstring for ``tls_mode``. Raises TransportError saying
    what failed, KernelTLSUnavailable for tls_mode "kernel".
    """
    connector = Connector(
        host,
        port,
        tls=tls,
        tls_mode=tls_mode,
        ca_file=ca_file,
        server_hostname=server_hostname,
        timeout=timeout,
        now=time.monotonic(),
    )
    with selectors.DefaultSelector() as selector:
        while (transport := connector.step(time.monotonic())) is None:
            pollable = connector.pollable()
            selector.register(pollable, connector.events())
            selector.select(max(connector.deadline - time.monotonic(), 0.0))
            selector.unregister(pollable)
    return transport


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
    context = create_context(kernel=False, ca_file=ca_file)
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
