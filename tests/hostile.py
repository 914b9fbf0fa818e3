"""A hostile feed server for tests: the feed's real handshake, its variants, stalls, and misdeeds.

``HostileFeed`` listens on 127.0.0.1 (ws://, or wss:// with a certificate) and serves each
connection in a thread of its own, in plain blocking code, with websockets' sans-I/O
``ServerProtocol`` for the framing. What it does is a ``Script``: the words of its greeting,
auth reply and confirmations, the channels it refuses, where to stop answering (``stall_at``),
what to do before the greeting (pings, say), and the actions once the client has subscribed:
text frames, fragments with pings between them, frames dribbled a byte at a time, status
messages, close frames, a TCP reset in the middle of a frame, pauses. It records how far each
connection got (``reached``, ``passed``) and every data frame it sent in full while the client
was connected (``sent``), so a test can check what must have been delivered.

It depends on websockets alone, so the Debian guest can run it with the package's own Python.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

CONNECTED = b'[{"ev":"status","status":"connected","message":"Connected Successfully"}]'
AUTH_SUCCESS = b'[{"ev":"status","status":"auth_success","message":"authenticated"}]'

# The steps of a connection, in order; ``stall_at`` names the one the server never answers.
STEPS = ("accept", "tls", "upgrade", "greeting", "auth", "subscribe", "stream")

# An action: ("text", frame), ("fragments", frame, pieces), ("fragments+pings", frame, pieces),
# ("dribble", frame), ("status", message), ("ping", payload), ("close", code, reason),
# ("reset-mid-frame", frame), ("fin",) (a TCP FIN, no close frame), ("sleep", seconds),
# ("hold",).
Action = tuple[object, ...]


def status(kind: str, message: str) -> bytes:
    """One status message of the feed."""
    return json.dumps([{"ev": "status", "status": kind, "message": message}]).encode()


@dataclass
class Script:
    """What the server does with each connection."""

    stall_at: str | None = None  # a STEPS name: everything before it is answered, it is not
    frames: Sequence[bytes] = ()  # data messages sent once subscribed (after ``actions``)
    frame_interval: float = 0.0  # seconds between two data messages
    close_after_stream: bool = True  # a close frame (1000) after the frames
    greeting: bytes = CONNECTED
    auth_reply: bytes = AUTH_SUCCESS
    confirm: str = "each"  # "each", "grouped" (one message), "casefold", "reversed", "none"
    refuse: frozenset[str] = frozenset()  # channels answered with an error status instead
    before_greeting: Sequence[Action] = ()  # e.g. pings while the client waits for it
    actions: Iterable[Action] = ()  # once subscribed, before ``frames``; may be endless
    replay: bool = True  # False: only the first connection streams; the next ones stay silent


@dataclass
class HostileFeed:
    """The server: ``with HostileFeed(script) as feed: ... feed.url ...``."""

    script: Script = field(default_factory=Script)
    scripts: Callable[[int], Script] | None = None  # a script per connection index, if given
    certfile: str | None = None
    keyfile: str | None = None
    reached: list[str] = field(default_factory=list)  # per connection, in order: its last step
    passed: set[str] = field(default_factory=set)  # every step some connection reached
    errors: list[str] = field(default_factory=list)  # what broke a connection's thread, if not I/O
    sent: list[bytes] = field(default_factory=list)  # every data frame sent whole, in order
    sent_on: dict[int, list[bytes]] = field(default_factory=dict)  # the same, per connection

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

    def _reach(self, index: int, step: str, script: Script) -> bool:
        """Record that connection ``index`` reached ``step``; False if the script stalls here."""
        with self._step:
            self.reached[index] = step
            self.passed.add(step)
            self._step.notify_all()
        return script.stall_at != step

    def _sent(self, index: int, frame: bytes) -> None:
        """Record a data frame that connection ``index`` sent whole."""
        with self._step:
            self.sent.append(frame)
            self.sent_on[index].append(frame)

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._converse(sock)
        except (OSError, EOFError, InvalidState):  # the client went away (a stopped balancer, a
            pass  # reset), or closed the websocket: nothing more may be sent on it
        except Exception as exc:  # a test reads ``errors``: a thread must not die loud
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def _converse(self, sock: socket.socket) -> None:
        with self._step:
            index = len(self.reached)
            self.reached.append("accept")
            self.passed.add("accept")
            self._step.notify_all()
            script = self.script if self.scripts is None else self.scripts(index)
            self.sent_on[index] = []
        if self._context is not None:
            if not self._reach(index, "tls", script):
                return self._hold(sock)
            sock = self._context.wrap_socket(sock, server_side=True)
            self._sockets.append(sock)
        connection = _Connection(sock)
        request = connection.request()
        if not self._reach(index, "upgrade", script):
            return self._hold(sock)
        connection.accept(request)
        if not self._reach(index, "greeting", script):
            return self._hold(sock)
        for action in script.before_greeting:
            self._act(index, connection, action)
        connection.send_text(script.greeting)
        connection.message()  # auth
        if not self._reach(index, "auth", script):
            return self._hold(sock)
        connection.send_text(script.auth_reply)
        subscribe = connection.message()
        if not self._reach(index, "subscribe", script):
            return self._hold(sock)
        self._answer(script, connection, _params(subscribe))
        if not self._reach(index, "stream", script) or (index > 0 and not script.replay):
            return self._hold(sock, connection)
        for action in script.actions:
            if self._stopping.is_set() or self._act(index, connection, action):
                return None
        for frame in script.frames:
            if self._stopping.is_set():
                return None
            connection.send_text(frame)
            self._sent(index, frame)
            if script.frame_interval:
                time.sleep(script.frame_interval)
        if script.close_after_stream:
            connection.close(1000, "end of script")
        return self._hold(sock, connection)

    def _answer(self, script: Script, connection: _Connection, channels: list[str]) -> None:
        """Confirm (in the script's words) or refuse each subscribed channel."""
        refused = [c for c in channels if c in script.refuse]
        kept = [c for c in channels if c not in script.refuse]
        for channel in refused:
            connection.send_text(status("error", f"not authorized to subscribe to {channel}"))
        if script.confirm == "none" or not kept:
            return
        if script.confirm == "grouped":
            connection.send_text(status("success", f"subscribed to: {', '.join(kept)}"))
            return
        if script.confirm == "reversed":
            kept.reverse()
        for channel in kept:
            shown = channel.swapcase() if script.confirm == "casefold" else channel
            connection.send_text(status("success", f"subscribed to: {shown}"))

    def _act(self, index: int, connection: _Connection, action: Action) -> bool:
        """Do one action; True if the connection is over after it."""
        kind = action[0]
        if kind == "text":
            connection.send_text(action[1])  # type: ignore[arg-type]
            self._sent(index, action[1])  # type: ignore[arg-type]
        elif kind == "status":
            connection.send_text(action[1])  # type: ignore[arg-type]
        elif kind in ("fragments", "fragments+pings"):
            frame, pieces = action[1], action[2]
            connection.send_fragments(frame, pieces, pings=kind == "fragments+pings")  # type: ignore[arg-type]
            self._sent(index, frame)  # type: ignore[arg-type]
        elif kind == "dribble":
            connection.send_text(action[1], dribble=True)  # type: ignore[arg-type]
            self._sent(index, action[1])  # type: ignore[arg-type]
        elif kind == "ping":
            connection.ping(action[1])  # type: ignore[arg-type]
        elif kind == "sleep":
            time.sleep(action[1])  # type: ignore[arg-type]
        elif kind == "close":
            connection.close(action[1], action[2])  # type: ignore[arg-type]
            self._hold(connection.sock)
            return True
        elif kind == "reset-mid-frame":
            connection.reset_mid_frame(action[1])  # type: ignore[arg-type]
            return True
        elif kind == "fin":
            connection.sock.shutdown(socket.SHUT_WR)
            self._hold(connection.sock)
            return True
        elif kind == "text+close_notify":  # wss only: the frame, then TLS's end, in one segment
            connection.send_text_and_close_notify(action[1])  # type: ignore[arg-type]
            self._sent(index, action[1])  # type: ignore[arg-type]
            self._stopping.wait()  # no close frame, no FIN: the socket stays open, silent
            return True
        elif kind == "hold":
            self._hold(connection.sock, connection)
            return True
        else:
            raise ValueError(f"unknown action {kind!r}")
        return False

    def _hold(self, sock: socket.socket, connection: _Connection | None = None) -> None:
        """Keep the connection open until the client goes or the server stops: silent, or,
        with the websocket open (``connection``), answering pings and nothing else."""
        if connection is not None:
            with contextlib.suppress(OSError, ssl.SSLError, EOFError):
                while not self._stopping.is_set():
                    connection.answer_pings()
                    time.sleep(0.05)
            return
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
        self.protocol = ServerProtocol(max_size=None)
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

    def send_text(self, data: bytes, *, dribble: bool = False) -> None:
        self.answer_pings()
        self.protocol.send_text(data)
        self._flush(dribble=dribble)

    def answer_pings(self) -> None:
        """Take what the client sent meanwhile, without waiting: its pings get their pongs
        between two of our frames, as a server that streams still answers them."""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    data = self.sock.recv(65536)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return
                if not data:
                    raise EOFError
                self.protocol.receive_data(data)
                self._events += self.protocol.events_received()
        finally:
            self.sock.setblocking(True)
            self._flush()

    def send_fragments(self, data: bytes, pieces: int, *, pings: bool) -> None:
        """``data`` as one message of ``pieces`` frames, a ping between two if ``pings``."""
        size = -(-len(data) // pieces)
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        for number, chunk in enumerate(chunks):
            last = number == len(chunks) - 1
            if number == 0:
                self.protocol.send_text(chunk, fin=last)
            else:
                self.protocol.send_continuation(chunk, fin=last)
            if pings and not last:
                self.protocol.send_ping(b"between %d" % number)
            self._flush()

    def send_text_and_close_notify(self, data: bytes) -> None:
        """Send ``data`` and a TLS close_notify in one TCP segment (TCP_CORK), then nothing:
        no close frame and no FIN, so a client that reads both at once has nothing more to
        poll for."""
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket), "close_notify needs a wss feed"
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        self.protocol.send_text(data)
        self._flush()
        sock.setblocking(False)
        with contextlib.suppress(ssl.SSLWantReadError):
            sock.unwrap()  # writes the close_notify, then would wait for the client's
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)

    def ping(self, payload: bytes) -> None:
        self.protocol.send_ping(payload)
        self._flush()

    def close(self, code: int, reason: str) -> None:
        self.protocol.send_close(code, reason)
        self._flush()

    def reset_mid_frame(self, data: bytes) -> None:
        """Half of a text frame, then a TCP reset (SO_LINGER 0): the frame never completes."""
        self.protocol.send_text(data)
        wire = b"".join(self.protocol.data_to_send())
        self.sock.sendall(wire[: len(wire) // 2])
        time.sleep(0.2)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def _flush(self, *, dribble: bool = False) -> None:
        for data in self.protocol.data_to_send():
            if not data:
                continue
            if not dribble:
                self.sock.sendall(data)
                continue
            for offset in range(len(data)):  # a byte at a time, as a slow proxy might
                self.sock.sendall(data[offset : offset + 1])
                time.sleep(0.0005)


def _params(message: bytes) -> list[str]:
    params = json.loads(message).get("params", "")
    return [p.strip() for p in str(params).split(",") if p.strip()]
