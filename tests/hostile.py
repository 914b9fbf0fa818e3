"""A hostile feed server for tests: the feed's real handshake, or a stall at any step of it.

``HostileFeed`` listens on 127.0.0.1 (ws://, or wss:// with a certificate) and serves each
connection in a thread of its own, in plain blocking code, with websockets' sans-I/O
``ServerProtocol`` for the framing. What it does is a ``Script``: where to stop answering
(``stall_at``), and otherwise the frames to stream once the client has subscribed. It records
how far each connection got (``reached``), so a test can act at a known step of the client.

It depends on the tradebalancer package only for its synthetic trades, so the Debian guest
can run it with the package's own Python.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

CONNECTED = b'[{"ev":"status","status":"connected","message":"Connected Successfully"}]'
AUTH_SUCCESS = b'[{"ev":"status","status":"auth_success","message":"authenticated"}]'

# The steps of a connection, in order; ``stall_at`` names the one the server never answers.
STEPS = ("accept", "tls", "upgrade", "greeting", "auth", "subscribe", "stream")


@dataclass
class Script:
    """What the server does with each connection."""

    stall_at: str | None = None  # a STEPS name: everything before it is answered, it is not
    frames: Sequence[bytes] = ()  # data messages sent once subscribed, then a close (1000)
    frame_interval: float = 0.0  # seconds between two data messages
    close_after_stream: bool = True


@dataclass
class HostileFeed:
    """The server: ``with HostileFeed(script) as feed: ... feed.url ...``."""

    script: Script = field(default_factory=Script)
    certfile: str | None = None
    keyfile: str | None = None
    reached: list[str] = field(default_factory=list)  # per connection, in order: its last step
    passed: set[str] = field(default_factory=set)  # every step some connection reached
    errors: list[str] = field(default_factory=list)  # what broke a connection's thread, if not I/O

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.port = self._listener.getsockname()[1]
        self._context: ssl.SSLContext | None = None
        if self.certfile:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(self.certfile, self.keyfile)
        self._stopping = threading.Event()
        self._step = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, name="hostile-accept", daemon=True)

    @property
    def url(self) -> str:
        """The feed's URL."""
        return f"{'wss' if self._context else 'ws'}://127.0.0.1:{self.port}/stocks"

    def __enter__(self) -> HostileFeed:
        if self.script.stall_at != "accept":  # a stall at accept: the kernel's backlog answers
            self._accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving: close the listener and every connection, join the threads."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in [self._accepter, *self._threads]:
            if thread.is_alive():
                thread.join(5)

    def wait_for(self, step: str, timeout: float = 30.0) -> bool:
        """Wait until some connection has reached ``step``; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._step:
            while step not in self.passed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._step.wait(remaining)
        return True

    # -- serving ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _reach(self, index: int, step: str) -> bool:
        """Record that connection ``index`` reached ``step``; False if the script stalls here."""
        with self._step:
            self.reached[index] = step
            self.passed.add(step)
            self._step.notify_all()
        return self.script.stall_at != step

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._converse(sock)
        except (OSError, EOFError):  # the client went away (a stopped balancer, a reset)
            pass
        except Exception as exc:  # a test reads ``errors``: a thread must not die loud
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _converse(self, sock: socket.socket) -> None:
        with self._step:
            index = len(self.reached)
            self.reached.append("accept")
            self.passed.add("accept")
            self._step.notify_all()
        if self._context is not None:
            if not self._reach(index, "tls"):
                return self._hold(sock)
            sock = self._context.wrap_socket(sock, server_side=True)
            self._sockets.append(sock)
        connection = _Connection(sock)
        request = connection.request()
        if not self._reach(index, "upgrade"):
            return self._hold(sock)
        connection.accept(request)
        if not self._reach(index, "greeting"):
            return self._hold(sock)
        connection.send_text(CONNECTED)
        connection.message()  # auth
        if not self._reach(index, "auth"):
            return self._hold(sock)
        connection.send_text(AUTH_SUCCESS)
        subscribe = connection.message()
        if not self._reach(index, "subscribe"):
            return self._hold(sock)
        for channel in _params(subscribe):
            connection.send_text(
                b'[{"ev":"status","status":"success","message":"subscribed to: %s"}]'
                % channel.encode()
            )
        if not self._reach(index, "stream"):
            return self._hold(sock)
        for frame in self.script.frames:
            if self._stopping.is_set():
                return None
            connection.send_text(frame)
            if self.script.frame_interval:
                time.sleep(self.script.frame_interval)
        if self.script.close_after_stream:
            connection.close(1000, "end of script")
        return self._hold(sock)

    def _hold(self, sock: socket.socket) -> None:
        """Keep the connection open and unanswered until the client goes or the server stops."""
        with contextlib.suppress(OSError, ssl.SSLError):
            sock.settimeout(0.2)
            while not self._stopping.is_set():
                try:
                    if not sock.recv(65536):
                        return
                except TimeoutError:
                    continue


class _Connection:
    """One client's websocket, blocking: requests, messages in, frames out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.protocol = ServerProtocol()
        self._events: list[object] = []

    def _next_event(self) -> object:
        while not self._events:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.protocol.receive_data(data)
            self._events += self.protocol.events_received()
            self._flush()  # pongs, close replies
        return self._events.pop(0)

    def request(self) -> Request:
        event = self._next_event()
        assert isinstance(event, Request)
        return event

    def accept(self, request: Request) -> None:
        self.protocol.send_response(self.protocol.accept(request))
        self._flush()

    def message(self) -> bytes:
        while True:
            event = self._next_event()
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                return bytes(event.data)

    def send_text(self, data: bytes) -> None:
        self.protocol.send_text(data)
        self._flush()

    def close(self, code: int, reason: str) -> None:
        self.protocol.send_close(code, reason)
        self._flush()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)


def _params(message: bytes) -> Iterator[str]:
    import json

    params = json.loads(message).get("params", "")
    return (p.strip() for p in str(params).split(",") if p.strip())
