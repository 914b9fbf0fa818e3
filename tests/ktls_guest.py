"""The guest half of test_ktls_vm.py: kernel TLS checks run inside the Debian 12 VM.

The VM script runs this file as the unprivileged user nobody, with the installed package's
Python (``/usr/lib/tradebalancer/venv/bin/python``, so the tradebalancer under test is the one
the .deb installed), in two phases:

    python ktls_guest.py without-module PLAN RESULTS   # the tls module is not loaded
    python ktls_guest.py with-module PLAN RESULTS      # root ran `modprobe tls`

PLAN is the JSON the host wrote (cipher pairs, sizes, certificates, replay runs); RESULTS a
directory that receives ``PHASE.json``: one record of facts per scenario (what was negotiated,
what the kernel reads back, byte counts, how the stream ended, /proc/net/tls_stat deltas).
The host holds the facts to their expectations; this side only observes, prints each record
as a checklist line, and never stops at a failed scenario (its traceback goes in the record).

Peers: Python's ssl server (tests/tlspeer.py), ``openssl s_server`` (Debian's openssl CLI),
the installed ``tradebalancer replay`` serving wss itself, and nginx terminating TLS in front of
``tradebalancer replay`` serving ws.
The guest has no ``cryptography``: key material is checked by reading it back from the kernel
(``getsockopt(SOL_TLS, TLS_TX/TLS_RX)`` returns the whole crypto_info on Linux 6.1, keys
included) and by data round trips with real servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import stopstress
from tlspeer import pattern, receive, send, start_peer

from tradebalancer.errors import KernelTLSUnavailable, TransportError
from tradebalancer.transport import Transport, open_transport
from tradebalancer.transport import kernel as tls_kernel
from tradebalancer.transport import keys as tls_keys
from tradebalancer.transport import session as tls_session

Facts = dict[str, Any]
SCENARIO_SECONDS = 120  # a scenario that takes longer is stuck: its record says so
STOP_STRESS_SECONDS = 600  # sixty balancers started and stopped under TCG
BALANCER = "/usr/bin/tradebalancer"
BOGUS_RECORD_TYPE = 99  # no TLS content type (RFC 8446 5.1): a server must answer with an alert


# -- observing the kernel ---------------------------------------------------------------------


def read_tls_stat() -> dict[str, int]:
    """The counters of /proc/net/tls_stat (empty when the tls module is not loaded)."""
    try:
        text = Path("/proc/net/tls_stat").read_text()
    except FileNotFoundError:
        return {}
    counters = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            counters[name] = int(value)
    return counters


def stat_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that changed, by how much."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def tls_module_loaded() -> bool:
    """Whether the tls module is in /proc/modules."""
    return any(line.split()[0] == "tls" for line in Path("/proc/modules").read_text().splitlines())


def _layout(info: tls_keys.CryptoInfo) -> dict[str, slice]:
    """Where each field of ``info.pack()`` lies (include/uapi/linux/tls.h)."""
    offsets, start = {}, 4
    for name, size in (("iv", len(info.iv)), ("key", len(info.key)), ("salt", len(info.salt))):
        offsets[name] = slice(start, start + size)
        start += size
    offsets["rec_seq"] = slice(start, start + 8)
    return offsets


def read_back(sock: socket.socket, tx: tls_keys.CryptoInfo, rx: tls_keys.CryptoInfo) -> Facts:
    """What getsockopt(SOL_TLS, TLS_TX/TLS_RX) returns, compared with what was handed over.

    Never reports key bytes: only whether each field matches, and the public numbers.
    """
    facts: Facts = {}
    for direction, option, info in (("tx", tls_kernel.TLS_TX, tx), ("rx", tls_kernel.TLS_RX, rx)):
        expected = info.pack()
        got = sock.getsockopt(tls_kernel.SOL_TLS, option, len(expected))
        layout = _layout(info)
        facts[f"{direction}_readback_matches"] = got == expected
        facts[f"{direction}_readback_differs_in"] = [
            name
            for name, where in (("header", slice(0, 4)), *layout.items())
            if got[where] != expected[where]
        ]
        facts[f"{direction}_version"] = f"{int.from_bytes(got[0:2], sys.byteorder):#06x}"
        facts[f"{direction}_cipher_type"] = int.from_bytes(got[2:4], sys.byteorder)
        facts[f"{direction}_derived_rec_seq"] = info.rec_seq
        facts[f"{direction}_rec_seq"] = int.from_bytes(got[layout["rec_seq"]], "big")
        facts[f"{direction}_key_read_back"] = len(got[layout["key"]]) == len(info.key)
    return facts


def read_sequence(sock: socket.socket, tx: tls_keys.CryptoInfo, rx: tls_keys.CryptoInfo) -> Facts:
    """The kernel's current sequence numbers (and TLS 1.2 AES-GCM transmit nonce) now."""
    facts: Facts = {}
    for direction, option, info in (("tx", tls_kernel.TLS_TX, tx), ("rx", tls_kernel.TLS_RX, rx)):
        got = sock.getsockopt(tls_kernel.SOL_TLS, option, len(info.pack()))
        layout = _layout(info)
        facts[f"{direction}_rec_seq_after"] = int.from_bytes(got[layout["rec_seq"]], "big")
        if direction == "tx" and info.version == tls_keys.TLS_1_2_VERSION and info.salt:
            # TLS 1.2 AES-GCM: the kernel sends its explicit nonce and counts it up per record.
            nonce = int.from_bytes(got[layout["iv"]], "big") - int.from_bytes(info.iv, "big")
            facts["tx_explicit_nonce_advance"] = nonce
    return facts


class InstallRecorder:
    """Records what ``tls_kernel.install`` is given (it still runs unchanged) during a ``with``.

    open_transport derives and installs the crypto info in one call; recording the call is
    the only way to compare what the kernel reads back with what the code derived. The
    recorder takes the place of ``install`` in ``ktls``, where ``Session.hand_off`` finds it.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[socket.socket, tls_keys.CryptoInfo, tls_keys.CryptoInfo]] = []
        self._real = tls_kernel.install

    def __enter__(self) -> InstallRecorder:
        tls_session.install = self._install
        return self

    def __exit__(self, *exc_info: object) -> None:
        tls_session.install = self._real

    def _install(
        self, sock: socket.socket, tx: tls_keys.CryptoInfo, rx: tls_keys.CryptoInfo, address: str
    ) -> str | None:
        self.calls.append((sock, tx, rx))
        return self._real(sock, tx, rx, address)


# -- moving bytes ---------------------------------------------------------------------------


def digits(size: int) -> bytes:
    """``size`` bytes of decimal digits: no ``openssl s_server`` command letter can appear."""
    return (b"0123456789" * (size // 10 + 1))[:size]


def send_bogus_record(sock: socket.socket) -> None:
    """Have the kernel send one record of a content type TLS does not define."""
    control = [(tls_kernel.SOL_TLS, tls_kernel.TLS_SET_RECORD_TYPE, bytes([BOGUS_RECORD_TYPE]))]
    sock.sendmsg([b"\x00"], control)


def ending(transport: Transport, deadline: float) -> str:
    """How the stream ends after what was expected: "eof", or the TransportError's message."""
    try:
        rest = receive(transport, None, deadline)
    except TransportError as exc:
        return f"TransportError: {exc.message}"
    return "eof" if not rest else f"eof after {len(rest)} unexpected bytes"


# -- peers ----------------------------------------------------------------------------------


class OpenSSLServer:
    """``openssl s_server`` for one connection: stdin goes to the client, stdout to a file."""

    def __init__(self, directory: Path, pair: dict[str, Any], cert: str, key: str) -> None:
        self.output_path = directory / f"s_server-{pair['label']}-{time.monotonic_ns()}.out"
        if pair["version"] == "1.3":
            versions = ["-tls1_3", "-ciphersuites", pair["openssl"]]
        else:
            versions = ["-tls1_2", "-cipher", pair["openssl"]]
        argv = ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", cert, "-key", key]
        with self.output_path.open("wb") as output:
            self.process = subprocess.Popen(
                [*argv, *versions, "-naccept", "1"],
                stdin=subprocess.PIPE,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.port = 0
        self._writers: list[threading.Thread] = []
        deadline = time.monotonic() + 30
        while not self.port:
            for line in self.output().splitlines():
                if line.startswith(b"ACCEPT "):
                    self.port = int(line.rsplit(b":", 1)[1])
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"s_server did not start: {self.output()[-2000:]!r}")
            time.sleep(0.05)

    def output(self) -> bytes:
        """Everything s_server wrote so far (its messages and the client's bytes)."""
        return self.output_path.read_bytes()

    def feed(self, data: bytes) -> None:
        """Write ``data`` to s_server's stdin from a thread (it sends it to the client)."""
        stdin = self.process.stdin
        assert stdin is not None

        def write() -> None:
            with contextlib.suppress(OSError):
                stdin.write(data)
                stdin.flush()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        self._writers.append(writer)

    def unread(self) -> int:
        """Bytes written to s_server's stdin that it has not read yet (FIONREAD of the pipe)."""
        assert self.process.stdin is not None
        queued = fcntl.ioctl(self.process.stdin, termios.FIONREAD, b"\0" * 4)
        return int(struct.unpack("i", queued)[0])

    def wait_read(self, deadline: float) -> None:
        """Wait until s_server has read everything written to its stdin (or has exited)."""
        while self.unread() and self.process.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"s_server left {self.unread()} bytes of its stdin unread")
            time.sleep(0.01)

    def command(self, letter: str) -> None:
        """An s_server command ("k": send a KeyUpdate, "r": renegotiate), alone in its read().

        s_server (apps/s_server.c, sv_body) takes a read() that starts with the letter and a
        newline as the command, whatever its length, and drops the rest of that read: the pipe
        must be empty before the letter goes in, and again before anything else does. Data
        fed right after the letter used to share its read now and then, and was lost.
        """
        deadline = time.monotonic() + 30
        for writer in self._writers:
            writer.join(30)
        self.wait_read(deadline)
        stdin = self.process.stdin
        assert stdin is not None
        with contextlib.suppress(OSError):  # two bytes into an empty pipe: never blocks
            stdin.write(f"{letter}\n".encode())
            stdin.flush()
        self.wait_read(deadline)

    def wait_output(self, needle: bytes, deadline: float) -> bool:
        """Wait until s_server's output contains ``needle``; False at the deadline."""
        while needle not in self.output():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self) -> int | None:
        """Stop s_server (it has usually exited after its one connection); its exit status."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(2)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        return self.process.returncode

    def tail_after(self, marker: bytes) -> str:
        """s_server's messages after ``marker`` (the client's data), for the record."""
        output = self.output()
        index = output.rfind(marker)
        after = output[index + len(marker) :] if index >= 0 else output[-600:]
        return after.decode(errors="replace").strip()[:600]

    def cipher_line(self) -> str:
        """s_server's "CIPHER is ..." line."""
        for line in self.output().splitlines():
            if line.startswith(b"CIPHER is "):
                return line.decode(errors="replace")
        return ""


def peer_options(pair: dict[str, Any]) -> dict[str, str]:
    """start_peer arguments pinning the pair's version and cipher."""
    if pair["version"] == "1.3":
        return {"tls_version": "1.3", "ciphersuites": pair["python"]}
    return {"tls_version": "1.2", "ciphers": pair["python"]}


def connect(port: int, ca: str, tls_mode: str) -> Transport:
    """open_transport to 127.0.0.1:port as "localhost", verified against ``ca``."""
    return open_transport(
        "127.0.0.1",
        port,
        tls=True,
        tls_mode=tls_mode,
        ca_file=ca,
        server_hostname="localhost",
        timeout=30,
    )


def describe(transport: Transport) -> Facts:
    """The transport's own account of itself."""
    return {
        "tls": transport.tls,
        "tx_mode": transport.tx_mode,
        "rx_mode": transport.rx_mode,
        "tls_version": transport.tls_version,
        "cipher": transport.cipher,
        "fallback_reason": transport.fallback_reason,
    }


def handshake_in_user_space(port: int, ca: str) -> tuple[socket.socket, tls_session.Session]:
    """Connect and run the verified handshake the way the connector does, without a hand-off."""
    context = tls_session.create_context(kernel=True, ca_file=ca)
    key_log = tls_session.KeyLog(context)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    session = tls_session.Session(context, "localhost", f"127.0.0.1:{port}", key_log=key_log)
    session.handshake(sock, time.monotonic() + 30)
    return sock, session


def read_in_user_space(sock: socket.socket, session: tls_session.Session, size: int) -> bytes:
    """``size`` bytes of application data through OpenSSL, one record at a time."""
    data = b""
    deadline = time.monotonic() + 30
    while len(data) < size:
        if not session.receive_record(sock, deadline):
            raise TransportError(session.address, "end of stream in user space")
        with contextlib.suppress(ssl.SSLWantReadError):
            data += session.object.read(size - len(data))
    return data


def wait_queued(sock: socket.socket, at_least: int, deadline: float) -> int:
    """Wait until ``at_least`` bytes wait unread in ``sock`` (SIOCINQ); how many do then."""
    while True:
        queued = struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]
        if queued >= at_least or time.monotonic() > deadline:
            return int(queued)
        time.sleep(0.01)


TCP_CLOSE_WAIT = 8  # include/net/tcp_states.h
_TCP_STATES = {1: "ESTABLISHED", 8: "CLOSE_WAIT", 7: "CLOSE"}


def wait_tcp_state(sock: socket.socket, state: int, deadline: float) -> str:
    """Wait until ``sock`` is in TCP ``state`` (tcp_info's first byte); the state's name then."""
    while True:
        now = struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]
        if now == state or time.monotonic() > deadline:
            return _TCP_STATES.get(now, str(now))
        time.sleep(0.01)


def hand_off_now(
    sock: socket.socket, session: tls_session.Session
) -> tuple[Transport, tls_keys.CryptoInfo, tls_keys.CryptoInfo, Facts]:
    """Hand the session to the kernel now; the transport over it, what was derived, facts."""
    tx, rx = session.crypto_info()
    partial = session.hand_off(sock)
    sock.setblocking(False)
    address = session.address
    transport = Transport(sock, address, tx_mode="kernel", rx_mode="kernel", session=session)
    return transport, tx, rx, {"partial_hand_off": partial}


# -- the scenarios with the module loaded -------------------------------------------------


class Scenarios:
    """Every check of the with-module phase; each method returns the facts it saw."""

    def __init__(self, plan: dict[str, Any], work: Path) -> None:
        self.plan = plan
        self.work = work
        self.ec = plan["certificates"]["ec"]
        self.rsa = plan["certificates"]["rsa"]
        self.immediate_bytes: int = plan["immediate_bytes"]
        self.deferred_bytes: int = plan["deferred_bytes"]

    def directory(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def python_immediate(self, pair: dict[str, Any]) -> Facts:
        """Python's ssl server; hand-off right after the handshake (open_transport, kernel)."""
        size = self.immediate_bytes
        steps = [["echo", size], ["send_pattern", size], ["close_notify"]]
        tmp = self.directory(f"python-immediate-{pair['label']}")
        facts: Facts = {}
        deadline = time.monotonic() + SCENARIO_SECONDS - 10
        cert, key = Path(self.ec["cert"]), Path(self.ec["key"])
        with (
            start_peer(tmp, steps, cert=cert, key=key, **peer_options(pair)) as peer,
            InstallRecorder() as recorder,
        ):
            before = read_tls_stat()
            transport = connect(peer.port, self.ec["ca"], "kernel")
            try:
                facts |= describe(transport)
                facts["server_cipher"] = peer.wait_for("handshake")["cipher"]
                sock, tx, rx = recorder.calls[-1]
                facts |= read_back(sock, tx, rx)
                facts["tls_stat_while_open"] = stat_delta(before, read_tls_stat())
                send(transport, pattern(size), deadline)
                facts["sent"] = size
                facts["server_echo_intact"] = peer.wait_for("echoed", 60)["intact"]
                data = receive(transport, 2 * size, deadline)
                facts["received"] = len(data)
                facts["received_intact"] = data == pattern(size) + pattern(size)
                facts |= read_sequence(sock, tx, rx)
                facts["end"] = ending(transport, deadline)  # the server's close_notify
                control = transport._control  # the transport keeps its count of skipped records
                facts["tickets_skipped"] = control.tickets if control is not None else None
            finally:
                transport.close()  # close_notify, which ends the server's unwrap()
            facts["server_saw_close_notify"] = (
                peer.wait_for("unwrapped", 30)["event"] == "unwrapped"
            )
        return facts

    def peer_gone_before_hand_off(self) -> Facts:
        """The server hangs up after the handshake, before the hand-off: a lost connection."""
        pair = self.plan["pairs"][-1]
        tmp = self.directory("peer-gone-before-hand-off")
        cert, key = Path(self.ec["cert"]), Path(self.ec["key"])
        facts: Facts = {"pair": pair["label"]}
        with start_peer(tmp, [["fin"]], cert=cert, key=key, **peer_options(pair)) as peer:
            sock, session = handshake_in_user_space(peer.port, self.ec["ca"])
            try:
                facts["tcp_state"] = wait_tcp_state(sock, TCP_CLOSE_WAIT, time.monotonic() + 20)
                try:
                    session.hand_off(sock)
                except KernelTLSUnavailable as exc:
                    facts |= {"raised": "KernelTLSUnavailable", "message": str(exc)}
                except TransportError as exc:
                    facts |= {"raised": "TransportError", "message": str(exc)}
                else:
                    facts["raised"] = None
            finally:
                sock.close()
        return facts

    def python_deferred(self, pair: dict[str, Any]) -> Facts:
        """Python's ssl server; data both ways through OpenSSL first, then the hand-off.

        The server sends its "world" and, at once, a pattern behind it: OpenSSL takes only the
        record with "world", so the pattern's records wait in the socket at the hand-off and
        the kernel must decrypt them from the right sequence number on.
        """
        size = self.deferred_bytes
        steps = [["recv", 5], ["send", "world"], ["send_pattern", size], ["echo", size]]
        steps.append(["wait_eof"])
        tmp = self.directory(f"python-deferred-{pair['label']}")
        facts: Facts = {}
        deadline = time.monotonic() + SCENARIO_SECONDS - 10
        cert, key = Path(self.ec["cert"]), Path(self.ec["key"])
        with start_peer(tmp, steps, cert=cert, key=key, **peer_options(pair)) as peer:
            before = read_tls_stat()
            sock, session = handshake_in_user_space(peer.port, self.ec["ca"])
            facts["server_cipher"] = peer.wait_for("handshake")["cipher"]
            session.object.write(b"hello")
            sock.sendall(session.data_to_send())
            facts["user_space_sent_intact"] = peer.wait_for("received")["data"] == "hello"
            facts["user_space_received_intact"] = read_in_user_space(sock, session, 5) == b"world"
            facts["queued_at_hand_off"] = wait_queued(sock, 1, time.monotonic() + 10)
            transport, tx, rx, handed = hand_off_now(sock, session)
            try:
                facts |= handed | describe(transport) | read_back(sock, tx, rx)
                facts["tls_stat_while_open"] = stat_delta(before, read_tls_stat())
                data = receive(transport, size, deadline)
                facts["received_first"] = len(data)
                facts["received_in_flight_intact"] = data == pattern(size)
                send(transport, pattern(size), deadline)
                facts["sent"] = size
                facts["server_echo_intact"] = peer.wait_for("echoed", 60)["intact"]
                data += receive(transport, size, deadline)
                facts["received"] = len(data)
                facts["received_intact"] = data == pattern(size) + pattern(size)
                facts |= read_sequence(sock, tx, rx)
                send_bogus_record(sock)  # the server answers with a fatal alert
                facts["end"] = ending(transport, deadline)
            finally:
                transport.close()
            error = peer.wait_for("error", 30)
            facts["server_error"] = f"{error['type']}: {error['message']}"
        return facts

    def openssl_immediate(self, pair: dict[str, Any]) -> Facts:
        """openssl s_server; hand-off right after the handshake; a KeyUpdate or HelloRequest."""
        size = self.immediate_bytes
        tmp = self.directory(f"openssl-immediate-{pair['label']}")
        facts: Facts = {}
        deadline = time.monotonic() + SCENARIO_SECONDS - 10
        server = OpenSSLServer(tmp, pair, self.rsa["cert"], self.rsa["key"])
        try:
            with InstallRecorder() as recorder:
                before = read_tls_stat()
                transport = connect(server.port, self.rsa["ca"], "kernel")
            try:
                facts |= describe(transport)
                sock, tx, rx = recorder.calls[-1]
                facts |= read_back(sock, tx, rx)
                facts["tls_stat_while_open"] = stat_delta(before, read_tls_stat())
                server.feed(digits(size))
                data = receive(transport, size, deadline)
                facts["received"] = len(data)
                facts["received_intact"] = data == digits(size)
                send(transport, pattern(size), deadline)
                facts["sent"] = size
                facts["server_received_intact"] = server.wait_output(pattern(size), deadline)
                facts["server_cipher"] = server.cipher_line()
                facts |= read_sequence(sock, tx, rx)
                control = transport._control  # the transport keeps its count of skipped records
                facts["tickets_skipped"] = control.tickets if control is not None else None
                if pair["version"] == "1.3":
                    server.command("k")  # SSL_key_update(): a KeyUpdate record
                    facts["end"] = ending(transport, deadline)
                else:
                    server.command("r")  # SSL_renegotiate(): a HelloRequest, which we ignore
                    server.feed(digits(1000))
                    after = receive(transport, 1000, deadline)
                    facts["data_after_hello_request_intact"] = after == digits(1000)
            finally:
                transport.close()
            if pair["version"] == "1.2":
                # s_server prints DONE for a close_notify, ERROR for a TCP close without one.
                server.wait_output(b"CONNECTION CLOSED", deadline)
                after = server.tail_after(pattern(size))
                facts["server_after_close"] = after[:300]
                facts["hello_request_sent"] = "SSL_do_handshake -> 1" in after
                facts["server_close_status"] = next(
                    (line for line in after.splitlines() if line in ("DONE", "ERROR")), None
                )
        finally:
            facts["server_exit"] = server.close()
        return facts

    def openssl_deferred(self, pair: dict[str, Any]) -> Facts:
        """openssl s_server; data both ways through OpenSSL first, then the hand-off; an alert."""
        size = self.deferred_bytes
        tmp = self.directory(f"openssl-deferred-{pair['label']}")
        facts: Facts = {}
        deadline = time.monotonic() + SCENARIO_SECONDS - 10
        server = OpenSSLServer(tmp, pair, self.rsa["cert"], self.rsa["key"])
        try:
            before = read_tls_stat()
            sock, session = handshake_in_user_space(server.port, self.rsa["ca"])
            session.object.write(b"hello\n")
            sock.sendall(session.data_to_send())
            facts["user_space_sent_intact"] = server.wait_output(b"hello\n", deadline)
            server.feed(b"world\n")
            facts["user_space_received_intact"] = read_in_user_space(sock, session, 6) == b"world\n"
            transport, tx, rx, handed = hand_off_now(sock, session)
            try:
                facts |= handed | describe(transport) | read_back(sock, tx, rx)
                facts["tls_stat_while_open"] = stat_delta(before, read_tls_stat())
                server.feed(digits(size))
                data = receive(transport, size, deadline)
                facts["received"] = len(data)
                facts["received_intact"] = data == digits(size)
                send(transport, pattern(size), deadline)
                facts["sent"] = size
                facts["server_received_intact"] = server.wait_output(pattern(size), deadline)
                facts["server_cipher"] = server.cipher_line()
                facts |= read_sequence(sock, tx, rx)
                send_bogus_record(sock)  # s_server's OpenSSL answers with a fatal alert
                facts["end"] = ending(transport, deadline)
            finally:
                transport.close()
            server.wait_output(b"CONNECTION CLOSED", deadline)
            facts["server_after_bogus_record"] = server.tail_after(pattern(size))[:300]
        finally:
            facts["server_exit"] = server.close()
        return facts


# -- the balancer -------------------------------------------------------------------------


def signal_state(pid: int) -> dict[str, str]:
    """A process's signal masks and pending sets, state, threads and wait channel (/proc)."""
    state: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.startswith("Sig") or name in ("ShdPnd", "State", "Threads"):
                state[name] = value.strip()
        state["wchan"] = Path(f"/proc/{pid}/wchan").read_text()
    return state


class Balancer:
    """``tradebalancer run feed`` (the installed command) with bench/sink.py workers."""

    unstopped: dict[str, str] | None = None  # what /proc said when SIGTERM went unheeded

    def __init__(self, work: Path, plan: dict[str, Any], run: dict[str, Any], url: str) -> None:
        self.directory = work / f"balancer-{run['name']}"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.workers: int = plan["workers"]
        expect = self.directory / "expect.json"
        expect.write_text(json.dumps(run["expect"]))
        sink = plan["sink"]
        command = (
            f'["{{{{ python }}}}", "{sink}", "--pipes", "{{{{ pipes | join(\',\') }}}}", '
            f'"--pipe-count", "{{{{ pipe_count }}}}", '
            f'"--report", "{{{{ workdir }}}}/report-{{{{ worker }}}}.json", '
            f'"--expect-file", "{expect}", '
            f'"--done", "{{{{ workdir }}}}/done-{{{{ worker }}}}.json"]'
        )
        config = self.directory / "tradebalancer.toml"
        config.write_text(
            f"""
[feeds.feed]
url = "{url}"
subscribe = ["T.*"]
api_key_file = ""
pipes = {plan["pipes"]}
workers = {self.workers}
pipe_size = 1048576
working_directory = "{self.directory}"
command = {command}
stats_interval = 1.0
reconnect.initial = 0.2
reconnect.max = 1.0
tls = "{run["tls"]}"
ca_file = "{run["ca"]}"
"""
        )
        self.log_path = self.directory / "balancer.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MASSIVE", "POLYGON"))}
        env["MASSIVE_API_KEY"] = plan["api_key"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [BALANCER, "--verbose", "--config", str(config), "run", "feed"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def log(self) -> str:
        """The balancer's log so far."""
        return self.log_path.read_text(errors="replace")

    def wait_until(self, predicate: Callable[[], bool], seconds: float) -> bool:
        """Wait for ``predicate`` while the balancer runs; False if it exited or time ran out."""
        deadline = time.monotonic() + seconds
        while not predicate():
            if self.process.poll() is not None or time.monotonic() > deadline:
                return predicate()
            time.sleep(0.1)
        return True

    def all_done(self) -> bool:
        """Whether every sink has read all the events its pipes expect."""
        return all((self.directory / f"done-{w}.json").exists() for w in range(self.workers))

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed after 60 s: status -9, and ``unstopped`` set)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.unstopped = signal_state(self.process.pid)
            self.process.kill()
            return self.process.wait()

    def reports(self) -> dict[str, Any]:
        """Per pipe: the sink's count and CRC-32 of every message, in order."""
        pipes: dict[str, Any] = {}
        for worker in range(self.workers):
            path = self.directory / f"report-{worker}.json"
            if path.exists():
                pipes |= json.loads(path.read_text())["pipes"]
        return pipes

    def lines(self, *needles: str) -> list[str]:
        """The log lines containing any of ``needles``."""
        return [line for line in self.log().splitlines() if any(n in line for n in needles)]


class Replay:
    """``tradebalancer replay`` (the installed command): the synthetic feed, wss or ws."""

    def __init__(self, directory: Path, plan: dict[str, Any], run: dict[str, Any]) -> None:
        argv = [BALANCER, "replay", "--host", "127.0.0.1", "--port", str(run["replay_port"])]
        argv += ["--events", str(run["events"]), "--seed", str(run["seed"])]
        argv += ["--accept-key", plan["api_key"]]
        if run.get("disconnect_after") is not None:
            argv += ["--disconnect-after", str(run["disconnect_after"])]
        if run.get("nginx_port") is None:  # nginx terminates TLS in front of a ws:// feed
            certificates = plan["certificates"][run["certificate"]]
            argv += ["--certfile", certificates["cert"], "--keyfile", certificates["key"]]
        self.log_path = directory / "replay.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        self.url = self.process.stdout.readline().decode().strip() if ready else ""
        if not self.url:
            self.stop()
            raise RuntimeError(f"the replay feed did not start: {self.log()[-2000:]}")
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def log(self) -> str:
        """The replay feed's log so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM unless it ended by itself (the stream is over), then its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            status = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return status

    def stats(self) -> Facts:
        """Its closing line: connections and events sent (-1 when it did not say)."""
        found = re.search(r"replay feed stopped: (\d+) connections, (\d+) events", self.log())
        connections, events = (int(found[1]), int(found[2])) if found else (-1, -1)
        return {"replay_connections": connections, "replay_events_sent": events}


def trouble_before_end_of_replay(log: str) -> list[str]:
    """WARNING and ERROR lines before the feed's "end of replay" close (or in all the log).

    Empty means the whole stream went over the first connection: the reconnects after the
    end are the feed being over, not kernel TLS failing.
    """
    lines = log.splitlines()
    end = next((i for i, line in enumerate(lines) if "end of replay" in line), len(lines))
    return [
        line
        for line in lines[:end]
        if (" WARNING " in line or " ERROR " in line) and "kernel TLS not used" not in line
    ]


def balancer_run(plan: dict[str, Any], work: Path, name: str) -> Facts:
    """One replay feed through the balancer, every event counted per pipe by the sinks."""
    run = plan["runs"][name]
    certificates = plan["certificates"][run["certificate"]]
    behind_nginx = run.get("nginx_port") is not None
    directory = work / f"balancer-{name}"
    directory.mkdir(parents=True, exist_ok=True)
    facts: Facts = {}
    started = time.monotonic()
    replay = Replay(directory, plan, run)
    try:
        port = run["nginx_port"] if behind_nginx else replay.port
        url = f"wss://localhost:{port}/stocks"
        facts["url"] = url
        before = read_tls_stat()
        balancer = Balancer(work, plan, run | {"ca": certificates["ca"]}, url)
        try:
            connected = balancer.wait_until(lambda: "TLS: " in balancer.log(), 60)
            facts["tls_stat_while_connected"] = stat_delta(before, read_tls_stat())
            if run["expect_exit"] is None:
                facts["all_delivered"] = connected and balancer.wait_until(
                    balancer.all_done, run["seconds"]
                )
            else:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    balancer.process.wait(60)
        finally:
            facts["exit_code"] = balancer.stop()
            if balancer.unstopped is not None:
                facts["unstopped"] = balancer.unstopped
    finally:
        facts["replay_exit"] = replay.stop()
    facts["seconds"] = round(time.monotonic() - started, 1)
    facts |= replay.stats()
    log = balancer.log()
    facts["tls_lines"] = balancer.lines("TLS: ", "kernel TLS", "tls kernel module", "modprobe")
    facts["fallback_lines"] = balancer.lines("kernel TLS not used")
    facts["negotiated"] = balancer.lines("transmit in")  # the connector's debug line
    facts["connections"] = len(balancer.lines("(TLS: "))  # service.py's "connected" line
    facts["end_of_replay_seen"] = "end of replay" in log
    facts["trouble_before_end"] = trouble_before_end_of_replay(log)[:10]
    facts["reports"] = balancer.reports()
    facts["log_tail"] = log[-3000:]
    facts["api_key_in_log"] = plan["api_key"] in log
    return facts


def nginx_access_log(plan: dict[str, Any]) -> Facts:
    """What nginx logged about the balancer's connection (protocol and cipher it chose)."""
    path = Path(plan["nginx_access_log"])
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return {"access_log": lines[-5:]}


# -- the scenarios without the module -------------------------------------------------------


def transport_without_module(plan: dict[str, Any], work: Path, tls_mode: str) -> Facts:
    """open_transport when the tls module is absent: auto falls back, kernel refuses."""
    ec = plan["certificates"]["ec"]
    size = plan["deferred_bytes"]
    steps = [["echo", size], ["wait_eof"]] if tls_mode == "auto" else [["wait_eof"]]
    tmp = work / f"transport-{tls_mode}"
    tmp.mkdir(parents=True, exist_ok=True)
    facts: Facts = {"tls_module_loaded": tls_module_loaded()}
    deadline = time.monotonic() + SCENARIO_SECONDS - 10
    with start_peer(tmp, steps, cert=Path(ec["cert"]), key=Path(ec["key"])) as peer:
        try:
            transport = connect(peer.port, ec["ca"], tls_mode)
        except KernelTLSUnavailable as exc:
            facts["raised"] = f"KernelTLSUnavailable: {exc.message}"
            return facts
        try:
            facts |= describe(transport)
            send(transport, pattern(size), deadline)
            facts["server_echo_intact"] = peer.wait_for("echoed", 60)["intact"]
            facts["received_intact"] = receive(transport, size, deadline) == pattern(size)
        finally:
            transport.close()
        facts["server_saw_close_notify"] = peer.wait_for("eof", 30)["close_notify"]
    facts["tls_module_loaded_after"] = tls_module_loaded()
    return facts


def ulp_as_this_user() -> Facts:
    """What setting TCP_ULP "tls" does for this (unprivileged) user."""
    listener = socket.create_server(("127.0.0.1", 0))
    facts: Facts = {"uid": os.getuid(), "effective_capabilities": _capabilities()}
    with listener, socket.create_connection(listener.getsockname()) as sock:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, tls_kernel.TCP_ULP, b"tls")
        except OSError as exc:
            facts["tcp_ulp"] = tls_kernel.describe_os_error(exc)
        else:
            facts["tcp_ulp"] = "set"
    facts["tls_module_loaded"] = tls_module_loaded()
    return facts


def _capabilities() -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return line.split()[1]
    return "?"


# -- the driver -----------------------------------------------------------------------------


class Recorder:
    """Runs scenarios, each under an alarm, and keeps one record of facts per scenario."""

    def __init__(self) -> None:
        self.records: list[Facts] = []
        signal.signal(signal.SIGALRM, self._on_alarm)

    @staticmethod
    def _on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"the scenario took more than {SCENARIO_SECONDS} s")

    def run(
        self,
        name: str,
        scenario: Callable[[], Facts],
        *,
        limit: int = SCENARIO_SECONDS,
        **labels: Any,
    ) -> Facts:
        """Run ``scenario`` within ``limit`` seconds; record its facts, or what it raised."""
        started = time.monotonic()
        record: Facts = {"name": name, **labels, "error": None}
        signal.alarm(limit)
        try:
            record |= scenario()
        except BaseException as exc:  # the record carries it; the next scenario still runs
            record["error"] = "".join(traceback.format_exception(exc))[-4000:]
            if isinstance(exc, KeyboardInterrupt):
                raise
        finally:
            signal.alarm(0)
        record["seconds"] = round(time.monotonic() - started, 2)
        self.records.append(record)
        print(_checklist_line(record), flush=True)
        return record


def _checklist_line(record: Facts) -> str:
    hidden = {"name", "error", "log_tail", "reports"}
    shown = ", ".join(f"{k}={v}" for k, v in record.items() if k not in hidden)
    mark = "ok" if record["error"] is None else "ERROR"
    line = f"[{mark}] {record['name']}: {shown}"
    if record["error"] is not None:
        line += "\n" + record["error"]
    return line


def stop_stress(plan: dict[str, Any]) -> Facts:
    """SIGTERM at random moments of the installed balancer's life, over kernel TLS."""
    certificates = plan["certificates"]["ec"]
    setup = stopstress.Setup(
        balancer=[BALANCER],
        certfile=certificates["cert"],
        keyfile=certificates["key"],
        ca_file=certificates["ca"],
        tls="kernel",
        spawn_timeout=120.0,
    )
    stress = plan["stop_stress"]
    outcomes = stopstress.run_trials(
        setup,
        dict.fromkeys(stopstress.SCENARIOS, stress["per_scenario"]),
        seed=stress["seed"],
        parallel=2,
    )
    report = stopstress.summary(outcomes, stress["bound"])
    return {
        "stress_trials": len(outcomes),
        "stress_seed": stress["seed"],
        "stress_scenarios": report["scenarios"],
        "stress_failures": report["failures"],
        "stress_kernel_tls": sum(outcome.kernel_tls for outcome in outcomes),
    }


def run_without_module(plan: dict[str, Any], work: Path, recorder: Recorder) -> None:
    """The checks before `modprobe tls`: nothing may load it, everything must say why."""
    recorder.run("module-absent", ulp_as_this_user)
    recorder.run("transport-auto", lambda: transport_without_module(plan, work, "auto"))
    recorder.run("transport-kernel", lambda: transport_without_module(plan, work, "kernel"))
    for name in ("fallback-auto", "fallback-kernel"):
        recorder.run(f"balancer-{name}", functools.partial(balancer_run, plan, work, name))
    recorder.run("module-still-absent", ulp_as_this_user)


def run_with_module(plan: dict[str, Any], work: Path, recorder: Recorder) -> None:
    """The checks after `modprobe tls`: six pairs x two peers x two orders, then the balancer."""
    scenarios = Scenarios(plan, work)
    first = read_tls_stat()
    recorder.run("tls-stat-before", lambda: {"tls_stat": first})
    for pair in plan["pairs"]:
        for peer, order, scenario in (
            ("python", "immediate", scenarios.python_immediate),
            ("python", "deferred", scenarios.python_deferred),
            ("openssl", "immediate", scenarios.openssl_immediate),
            ("openssl", "deferred", scenarios.openssl_deferred),
        ):
            recorder.run(
                f"{peer}-{order}-{pair['label']}",
                functools.partial(scenario, pair),
                peer=peer,
                order=order,
                pair=pair["label"],
                version=pair["version"],
                cipher_type_expected=pair["cipher_type"],
            )
    last = read_tls_stat()
    recorder.run(
        "tls-stat-after-pairs", lambda: {"tls_stat": last, "delta": stat_delta(first, last)}
    )
    recorder.run("peer-gone-before-hand-off", scenarios.peer_gone_before_hand_off)
    for name in ("direct", "nginx"):
        recorder.run(f"balancer-{name}", functools.partial(balancer_run, plan, work, name))
    recorder.run("nginx-access-log", lambda: nginx_access_log(plan))
    final = read_tls_stat()
    recorder.run("tls-stat-final", lambda: {"tls_stat": final, "delta": stat_delta(first, final)})
    # Last: its dozens of sessions are not in the counts the tls-stat records are held to.
    recorder.run("stop-stress", lambda: stop_stress(plan), limit=STOP_STRESS_SECONDS)


@contextlib.contextmanager
def _in_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def main(argv: list[str]) -> int:
    """``PHASE PLAN RESULTS``: run the phase's scenarios, write RESULTS/PHASE.json."""
    phase, plan_path, results = argv
    plan = json.loads(Path(plan_path).read_text())
    work = Path(plan["work"]) / phase
    work.mkdir(parents=True, exist_ok=True)
    recorder = Recorder()
    print(f"== {phase}: uid {os.getuid()}, kernel {os.uname().release}", flush=True)
    with _in_directory(work):
        if phase == "without-module":
            run_without_module(plan, work, recorder)
        else:
            run_with_module(plan, work, recorder)
    Path(results).mkdir(parents=True, exist_ok=True)
    (Path(results) / f"{phase}.json").write_text(json.dumps(recorder.records, indent=1))
    failed = [r["name"] for r in recorder.records if r["error"] is not None]
    print(f"== {phase}: {len(recorder.records)} scenarios, {len(failed)} raised: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
