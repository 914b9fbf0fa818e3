"""A scripted TLS (or plain TCP) server in a child process, on 127.0.0.1, for tests.

The parent calls ``start_peer(...)``; the child (this file run as a program) listens on port
0, prints ``{"port": N}``, then for each connection runs the steps and prints one JSON line
per event ("handshake", "received", "eof", "error", ...). A child process, not a thread,
because TLS 1.3 cipher suites can only be forced through OPENSSL_CONF at process start.

Steps (JSON lists): ["send", text], ["send_pattern", n] (n bytes of ``pattern(n)``),
["recv", n] (read exactly n bytes), ["echo", n] (read n bytes, send them back),
["wait_eof"], ["close_notify"], ["fin"], ["reset"], ["sleep", seconds].
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tradebalancer.transport import Transport

_OPENSSL_CONF = """openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_section
[ssl_section]
system_default = system_default_section
[system_default_section]
Ciphersuites = {ciphersuites}
"""


def pattern(size: int) -> bytes:
    """``size`` bytes that are unlikely to line up by accident (a 251-byte cycle)."""
    cycle = bytes(range(251))
    return (cycle * (size // 251 + 1))[:size]


# -- the client's side of a conversation with the peer, through a tradebalancer Transport ----

_BUFFER = memoryview(bytearray(4 << 20))  # the service's receive buffer is 1-4 MiB


def receive(transport: Transport, size: int | None = None, deadline: float | None = None) -> bytes:
    """Read ``size`` bytes (None: to end of stream) as the service does: poll, then drain.

    Raises TimeoutError past ``deadline`` (CLOCK_MONOTONIC; default: 10 s from now).
    """
    deadline = time.monotonic() + 10.0 if deadline is None else deadline
    data = bytearray()
    while size is None or len(data) < size:
        try:
            count = transport.receive_into(_BUFFER)
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"received {len(data)} of {size} bytes") from None
            select.select([transport.fileno()], [], [], remaining)
            continue
        if count == 0:
            break
        data += _BUFFER[:count]
    return bytes(data)


def send(transport: Transport, data: bytes, deadline: float | None = None) -> None:
    """Send ``data``, flushing whenever the socket is writable, until the queue is empty.

    Raises TimeoutError past ``deadline`` (CLOCK_MONOTONIC; default: 10 s from now).
    """
    deadline = time.monotonic() + 10.0 if deadline is None else deadline
    transport.send(data)
    while transport.wants_write():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the send queue did not drain")
        select.select([], [transport.fileno()], [], remaining)
        transport.flush()


class Peer:
    """The parent's handle on a running peer: its port and the events it reports."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        assert process.stdout is not None
        first = json.loads(process.stdout.readline() or b"{}")
        if "port" not in first:
            raise RuntimeError(f"the peer did not start: {first}")
        self.port: int = first["port"]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._events.put(json.loads(line))

    def event(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next event the peer reported (waits up to ``timeout`` seconds)."""
        return self._events.get(timeout=timeout)

    def wait_for(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """Skip events until one of ``kind`` arrives, and return it."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.event(max(deadline - time.monotonic(), 0.01))
            if event["event"] == kind:
                return event


@contextlib.contextmanager
def start_peer(
    tmp_path: Path,
    steps: Sequence[Sequence[Any]] = (),
    *,
    cert: Path | None = None,
    key: Path | None = None,
    tls_version: str | None = None,
    ciphers: str | None = None,
    ciphersuites: str | None = None,
    connections: int = 1,
) -> Iterator[Peer]:
    """Run a peer for the duration of the ``with`` block; TLS when ``cert`` is given.

    ``tls_version`` "1.2" or "1.3" pins the version; ``ciphers`` sets the TLS 1.2 list,
    ``ciphersuites`` the TLS 1.3 list (through an OPENSSL_CONF file in ``tmp_path``).
    """
    environment = dict(os.environ)
    if ciphersuites is not None:
        conf = tmp_path / f"openssl-{ciphersuites.replace(':', '-')}.cnf"
        conf.write_text(_OPENSSL_CONF.format(ciphersuites=ciphersuites))
        environment["OPENSSL_CONF"] = str(conf)
    config = {
        "cert": str(cert) if cert else None,
        "key": str(key) if key else None,
        "tls_version": tls_version,
        "ciphers": ciphers,
        "steps": [list(step) for step in steps],
        "connections": connections,
    }
    process = subprocess.Popen(
        [sys.executable, __file__, json.dumps(config)],
        stdout=subprocess.PIPE,
        env=environment,
    )
    peer = None
    try:
        peer = Peer(process)
        yield peer
    finally:
        process.kill()
        process.wait()
        if peer is not None:
            peer._reader.join(5)  # it ends at the end of the child's output
        if process.stdout is not None:
            process.stdout.close()


# -- the child --------------------------------------------------------------------------------


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _run(conn: socket.socket, steps: list[list[Any]]) -> None:
    for step in steps:
        action = step[0]
        if action == "send":
            conn.sendall(step[1].encode())
        elif action == "send_pattern":
            conn.sendall(pattern(step[1]))
        elif action == "recv":
            data = _receive_exactly(conn, step[1])
            _emit(event="received", data=data.decode("latin-1"))
        elif action == "echo":
            data = _receive_exactly(conn, step[1])
            conn.sendall(data)
            _emit(event="echoed", size=len(data), intact=data == pattern(len(data)))
        elif action == "wait_eof":
            try:
                while conn.recv(65536):
                    pass
                _emit(event="eof", close_notify=isinstance(conn, ssl.SSLSocket))
            except ssl.SSLEOFError:  # suppress_ragged_eofs=False: FIN without close_notify
                _emit(event="eof", close_notify=False)
        elif action == "close_notify":
            assert isinstance(conn, ssl.SSLSocket)
            conn.unwrap()  # sends close_notify and waits for the client's
            _emit(event="unwrapped")
        elif action == "fin":
            if isinstance(conn, ssl.SSLSocket):
                socket.socket.shutdown(conn, socket.SHUT_WR)  # no close_notify first
            else:
                conn.shutdown(socket.SHUT_WR)
        elif action == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return
        elif action == "sleep":
            time.sleep(step[1])
        else:
            raise ValueError(f"unknown step {step}")


def _main(config: dict[str, Any]) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    context = None
    if config["cert"]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(config["cert"], config["key"])
        version = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}.get(
            config["tls_version"] or ""
        )
        if version is not None:
            context.minimum_version = context.maximum_version = version
        if config["ciphers"]:
            context.set_ciphers(config["ciphers"])
    _emit(port=listener.getsockname()[1])
    for _ in range(config["connections"]):
        conn, _ = listener.accept()
        try:
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True, suppress_ragged_eofs=False)
                assert isinstance(conn, ssl.SSLSocket)
                cipher = conn.cipher()
                _emit(event="handshake", version=conn.version(), cipher=cipher and cipher[0])
            _run(conn, config["steps"])
        except Exception as exc:
            _emit(event="error", type=type(exc).__name__, message=str(exc))
        finally:
            conn.close()
    _emit(event="done")


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
