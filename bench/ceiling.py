"""The raw ceiling: a client that does the websocket handshake, then reads and discards.

Owns the upper bound the benchmark compares the balancer with: how fast this machine moves the
replay feed's bytes through one socket into one Python process that does nothing with them.
websockets' sans-I/O ``ClientProtocol`` does the HTTP upgrade and frames the feed's ``auth``
and ``subscribe`` messages; from the subscription on, the socket is read with ``recv_into`` a
1 MiB buffer (the balancer's batch size) and nothing is parsed, until the feed closes.

``run`` serves a stream to it as a child process (``python -m bench.ceiling --url URL
--report FILE``); its report gives the bytes read, the CLOCK_MONOTONIC times of the first and
the last read after subscribing, and its own CPU time over that window.

With ``--latency`` (paced runs) it also takes, after each read, the feed's ``"lt"`` send
timestamps that the read completed: the latency floor of the feed, loopback and one wake-up,
without the balancer, its pipes or a worker's wake-up. A timestamp cut by a read boundary is
skipped (the pattern wants its closing brace).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from .harness import KEY, STREAM_START_TIMEOUT, Feed, Outcome, child_env, open_replay, python
from .source import Pool

BUFFER_SIZE = 1 << 20
_LATENCY = re.compile(rb'"lt":(\d+)\}')


def main(argv: list[str] | None = None) -> int:
    """Connect, subscribe, read to end of stream, write the report."""
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", help="trust this CA (wss://)")
    parser.add_argument("--report", required=True)
    parser.add_argument("--latency", action="store_true", help='take the "lt" timestamps')
    args = parser.parse_args(argv)
    uri = parse_uri(args.url)
    sock: socket.socket = socket.create_connection((uri.host, uri.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if uri.secure:
        context = ssl.create_default_context(cafile=args.ca)
        sock = context.wrap_socket(sock, server_hostname="localhost")
    protocol = ClientProtocol(uri)
    protocol.send_request(protocol.connect())
    _send(sock, protocol)
    _wait_for(sock, protocol, b'"connected"')
    protocol.send_text(json.dumps({"action": "auth", "params": KEY}).encode())
    _send(sock, protocol)
    _wait_for(sock, protocol, b'"auth_success"')
    protocol.send_text(json.dumps({"action": "subscribe", "params": "T.*"}).encode())
    _send(sock, protocol)
    # From here on the bytes are only counted: the ceiling of one socket into one process.
    # Blocking, without a timeout: with one, CPython polls before every receive.
    sock.settimeout(None)
    cpu_start = time.process_time()
    buffer = memoryview(bytearray(BUFFER_SIZE))
    received = 0
    first_ns = last_ns = 0
    recv_into = sock.recv_into
    latencies: list[int] = []
    while count := recv_into(buffer):
        last_ns = time.monotonic_ns()
        if not first_ns:
            first_ns = last_ns
        received += count
        if args.latency:
            latencies += [last_ns - int(t) for t in _LATENCY.findall(buffer[:count])]
    cpu = time.process_time() - cpu_start
    sock.close()
    report = {
        "bytes": received,
        "first_ns": first_ns,
        "last_ns": last_ns,
        "cpu_s": cpu,
        "latency_ns": latencies,
    }
    with open(args.report, "w") as f:
        json.dump(report, f)
    return 0


def _send(sock: socket.socket, protocol: ClientProtocol) -> None:
    """Write what the protocol has to send."""
    for data in protocol.data_to_send():
        if data:
            sock.sendall(data)


def _wait_for(sock: socket.socket, protocol: ClientProtocol, marker: bytes) -> None:
    """Read until a text message containing ``marker`` arrives; exit if the stream ends."""
    while True:
        data = sock.recv(65536)
        if not data:
            raise SystemExit(f"the feed closed the connection before {marker!r}")
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT and marker in event.data:
                return
        if protocol.handshake_exc is not None:
            raise SystemExit(f"websocket upgrade failed: {protocol.handshake_exc}")


if __name__ == "__main__":
    sys.exit(main())


def run(pool: Pool, feed: Feed, ca: Path | None = None) -> Outcome:
    """Serve ``feed`` to the ceiling client; return its rate (nothing is verified but size)."""
    outcome = Outcome(trades=feed.trades, verification="none")
    with tempfile.TemporaryDirectory(prefix="tradebalancer-bench-") as workdir:
        report_path = Path(workdir) / "ceiling.json"
        server = open_replay(pool, feed)
        try:
            argv = [python(), "-m", "bench.ceiling", "--url", server.url]
            if ca is not None:
                argv += ["--ca", str(ca)]
            if feed.timestamps:
                argv.append("--latency")
            done = subprocess.run(
                [*argv, "--report", str(report_path)],
                env=child_env(),
                capture_output=True,
                timeout=STREAM_START_TIMEOUT + feed.trades / 100_000,
                check=False,
            )
        finally:
            server.stop()
        if done.returncode != 0:
            outcome.problems.append(f"ceiling client failed: {done.stderr.decode()[-2000:]}")
            return outcome
        report = json.loads(report_path.read_text())
    outcome.seconds = (report["last_ns"] - report["first_ns"]) / 1e9
    outcome.cpu_ns = int(report["cpu_s"] * 1e9)
    outcome.payload_bytes = pool.payload_bytes(feed.trades)
    outcome.latency_ns = sorted(report["latency_ns"])
    outcome.verified = report["bytes"] > outcome.payload_bytes
    if not outcome.verified:
        outcome.problems.append(
            f"read {report['bytes']} bytes, fewer than the {outcome.payload_bytes} of the events"
        )
    return outcome
