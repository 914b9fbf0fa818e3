"""A connected stream to the feed: plain TCP, TLS in user space, or TLS in the kernel.

Owns the socket once a Connector has established it (connector.py), until it is closed: a
non-blocking receive straight into the caller's buffer, a send queue, close_notify on close.
Must not touch: connecting, websockets, events, the event loop (the service polls
``fileno()``).

Each direction runs in one of three modes:

* ``none``: plain TCP (ws://); ``receive_into`` is one ``recv_into`` syscall.
* ``kernel``: kernel TLS; ``recvmsg_into`` decrypts straight into the caller's buffer and may
  fill it with many records in one call (kernel.py); ``send`` hands plaintext to the kernel.
* ``user``: OpenSSL (session.py) over memory BIOs; ciphertext is read into the free part of the
  caller's buffer, copied into OpenSSL, and decrypted back into that buffer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Callable
from typing import cast

from ..errors import TransportError
from . import kernel
from .kernel import describe_os_error
from .session import Session


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
        session: Session | None = None,
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
        self._control = kernel.ControlRecords(session.version) if session is not None else None
        self._outgoing = bytearray()
        self._eof = False
        self._closed = False

    def fileno(self) -> int:
        """The socket's file descriptor, to poll (readable: call recv_into; writable: flush)."""
        return self._sock.fileno()

    def pollable(self) -> socket.socket:
        """The socket itself, to poll and to tell apart from an earlier one with its number."""
        return self._sock

    # -- receiving ---------------------------------------------------------------------------

    def receive_into(self, buffer: memoryview) -> int:
        """Put received plaintext into ``buffer``; return its length, 0 at end of stream.

        Non-blocking: raises BlockingIOError when nothing is available now (poll, then call
        again), TransportError when the connection or the TLS session broke. A count short of
        ``len(buffer)`` means the socket was drained then, and poll says when more is there
        (user-space TLS reads on until the socket has nothing, so that no decrypted data is
        left where the poll cannot see it), unless the read reached the end of the stream
        (``at_eof``): a close_notify read behind the data leaves nothing for the poll to
        signal, and the next call returns 0.
        """
        if self._eof:
            return 0
        if self.rx_mode == "kernel":
            assert self._control is not None
            count = kernel.receive_into(self._sock, buffer, self._control, self.address)
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

    @property
    def at_eof(self) -> bool:
        """Whether a read reached the end of the stream (the next one returns 0)."""
        return self._eof

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

    def pending_error(self) -> TransportError | None:
        """The error the socket holds (SO_ERROR), e.g. a reset by the peer; None if none."""
        code = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code == 0:
            return None
        return TransportError(self.address, describe_os_error(OSError(code, os.strerror(code))))

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
                    kernel.send_close_notify(self._sock)
                elif self.tx_mode == "user" and self._session is not None:
                    with contextlib.suppress(ssl.SSLError):  # WantRead: the reply is not awaited
                        self._session.object.unwrap()
                    self._sock.send(self._session.data_to_send())
        self._sock.close()
