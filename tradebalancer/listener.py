"""The balancer's own small HTTP server, served by its event loop: control socket and metrics.

Owns listening sockets (TCP or unix), the clients they accept, reading one request from each,
writing the answer the caller's handler gives, and closing. Knows nothing of what is asked:
a handler maps (method, path) to a response. Must not touch: the feed, the pipes, the workers.

Why in the loop and not prometheus_client's server thread: a thread would take the GIL from
the hot path for the few milliseconds a scrape takes (CPython hands it over every 5 ms), it
would be alive across the fork of every worker (a lock it holds then stays held in the child),
and a reload asked over the control socket must run in the loop anyway. A request is small and
answered at once; one client costs an accept, a read, a write and a close, and the listener
takes at most ``MAX_CLIENTS`` at a time, each for ``CLIENT_TIMEOUT`` seconds at most, so a
stuck or hostile client cannot hold the loop or its memory.

HTTP/1.0 with ``Connection: close``: every response ends with the connection, which is what
Prometheus, curl and ``tradebalancer status`` expect of a tiny server.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .address import Address

__all__ = ["Client", "Handler", "Listener", "Response", "open_listener", "text"]

logger = logging.getLogger(__name__)

MAX_CLIENTS = 32
CLIENT_TIMEOUT = 5.0
MAX_REQUEST = 8192  # bytes of request line and headers
MAX_BODY = 1 << 20  # a body is read and dropped (none is used), up to this

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS |= {409: "Conflict", 413: "Content Too Large", 500: "Internal Server Error"}


@dataclass(frozen=True)
class Response:
    """What a handler answers: status, content type, body."""

    status: int
    content_type: str
    body: bytes

    def encode(self) -> bytes:
        """The response as it goes on the wire."""
        head = (
            f"HTTP/1.0 {self.status} {_REASONS.get(self.status, 'Error')}\r\n"
            f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        return head.encode("ascii") + self.body


Handler = Callable[[str, str], Response]  # (method, path) -> response


def text(status: int, body: str) -> Response:
    """A plain-text response."""
    return Response(status, "text/plain; charset=utf-8", body.encode())


class Client:
    """One accepted connection: read a request, write the answer, close."""

    def __init__(self, sock: socket.socket, listener: Listener, now: float) -> None:
        self.sock = sock
        self.listener = listener
        self.deadline = now + CLIENT_TIMEOUT
        self._request = bytearray()
        self._answer: memoryview | None = None
        self._body_left = 0  # bytes of the request's body still to read (and drop)
        self.done = False

    def fileno(self) -> int:
        """The socket's fd (for the poller)."""
        return self.sock.fileno()

    @property
    def writing(self) -> bool:
        """The request was read; the answer is being written."""
        return self._answer is not None

    def serve(self) -> None:
        """Read what came, answer once the request is whole, write what the socket takes."""
        try:
            if self._answer is None:
                self._read()
            if self._answer is not None:
                sent = self.sock.send(self._answer)
                self._answer = self._answer[sent:]
                self.done = not self._answer
        except BlockingIOError:
            pass
        except OSError:
            self.done = True  # the client went away: nothing to tell it

    def _read(self) -> None:
        data = self.sock.recv(MAX_REQUEST)
        if not data:
            self.done = True
            return
        if self._body_left:  # a body nothing here uses, read so that closing resets nothing
            self._body_left = max(0, self._body_left - len(data))
            if not self._body_left:
                self._answer = memoryview(self._respond().encode())
            return
        self._request += data
        end = self._request.find(b"\r\n\r\n")
        if end < 0:
            if len(self._request) >= MAX_REQUEST:
                self._answer = memoryview(text(400, "request too large\n").encode())
            return
        head = bytes(self._request[:end]).decode("latin-1")
        length = _content_length(head)
        if length is None or length > MAX_BODY:
            status, why = (400, "bad Content-Length") if length is None else (413, "body too large")
            self._answer = memoryview(text(status, why + "\n").encode())
            return
        received = len(self._request) - (end + 4)  # of the body, with the head
        del self._request[end:]
        self._body_left = max(0, length - received)
        if not self._body_left:
            self._answer = memoryview(self._respond().encode())

    def _respond(self) -> Response:
        line = bytes(self._request).decode("latin-1").split("\r\n", 1)[0]
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return text(400, "not an HTTP/1.x request\n")
        try:
            return self.listener.handler(parts[0], parts[1].split("?", 1)[0])
        except Exception:
            logger.exception("answering %s %s failed (this is a bug, please report it)", *parts[:2])
            return text(500, "internal error: see the journal\n")

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()
        self.listener.clients -= 1


class Listener:
    """A listening socket and the handler of its requests."""

    def __init__(self, sock: socket.socket, address: Address, handler: Handler, name: str):
        self.sock = sock
        self.address = address
        self.handler = handler
        self.name = name  # "metrics", "control": for the log
        self.clients = 0

    def fileno(self) -> int:
        """The listening socket's fd (for the poller)."""
        return self.sock.fileno()

    def accept(self, now: float) -> list[Client]:
        """Accept every pending connection; refuse (close) those over ``MAX_CLIENTS``."""
        clients: list[Client] = []
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return clients
            except OSError as exc:  # EMFILE and the like: try again at the next wake-up
                logger.warning("%s listener: cannot accept: %s", self.name, exc.strerror)
                return clients
            if self.clients >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            self.clients += 1
            clients.append(Client(sock, self, now))

    def close(self) -> None:
        """Close the listening socket (and remove a unix socket's file)."""
        self.sock.close()
        if self.address.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.address.path)


def open_listener(address: Address, handler: Handler, name: str, *, mode: int = 0o600) -> Listener:
    """Listen on ``address``; OSError with the reason if it cannot be done.

    A unix socket gets ``mode`` (only its owner and root may connect); a socket file left by a
    balancer that is gone is replaced, one that still answers is not.
    """
    if address.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            _remove_stale(address.path)
            # Made with its mode (the loop is the only thread: the umask is briefly ours),
            # never chmod-ed after the bind, which a symlink raced in could redirect.
            umask = os.umask(0o777 & ~mode)
            try:
                sock.bind(address.path)
            finally:
                os.umask(umask)
        except OSError:
            sock.close()
            raise
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
        except OSError:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        address = Address("tcp", host=host, port=port)  # port 0: the one the kernel chose
    sock.listen(MAX_CLIENTS)
    sock.setblocking(False)
    return Listener(sock, address, handler, name)


def _content_length(head: str) -> int | None:
    """The request's Content-Length (0 if none); None if it is not a number."""
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().casefold() == "content-length":
            value = value.strip()
            return int(value) if value.isdigit() else None
    return 0


def _remove_stale(path: str) -> None:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)  # a live listener with a full backlog must not hang the start
    try:
        probe.connect(path)
    except BlockingIOError:
        pass  # alive, and busy
    except ConnectionRefusedError:
        os.unlink(path)  # nobody answers: a balancer that is gone left it
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process answers on {path}")
