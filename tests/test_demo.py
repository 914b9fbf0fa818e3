"""examples/demo.sh (``make demo``), run as a real shell script with its real processes."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_PORT = 9943  # examples/demo.toml's url


@pytest.fixture
def demo_port_taken() -> Iterator[None]:
    """127.0.0.1:9943 listened on by a socket that never answers (or already taken)."""
    with socket.socket() as other:
        try:
            other.bind(("127.0.0.1", DEMO_PORT))
            other.listen()
        except OSError as exc:  # taken by another program: the case under test all the same
            if exc.errno != errno.EADDRINUSE:
                raise
        yield


@pytest.mark.usefixtures("demo_port_taken")
def test_demo_stops_when_its_port_is_taken() -> None:
    """With 9943 taken, the demo stops at once, saying why, and starts no balancer."""
    # It used to start the balancer anyway, which then waited on whatever held the port.
    with subprocess.Popen(
        ["sh", "examples/demo.sh"],
        cwd=REPO,
        env={**os.environ, "PY": sys.executable},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its process group: the balancer and its workers too
    ) as demo:
        try:
            out, err = demo.communicate(timeout=30)
        finally:
            if demo.returncode is None:  # still running: it started the balancer
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 64, err
    assert "starting feed" not in err  # the balancer's first line
    assert f"--port: 127.0.0.1:{DEMO_PORT} is already in use" in err
    assert err.splitlines()[-1].startswith(
        f"demo: the replay feed could not listen on 127.0.0.1:{DEMO_PORT}, where "
        "examples/demo.toml connects (exit 64, the reason above); stop what holds the port"
    )
    assert out == ""
