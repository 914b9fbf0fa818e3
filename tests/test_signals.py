"""Signals: record-only handlers, and a balancer that honours SIGTERM whatever it is doing.

The balancer runs as a real child process (``python -m tradebalancer run``), its stderr a real
pipe; the feed is a port nobody listens on, so it is in its reconnect loop, logging.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tradebalancer import signals

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, *, extra: str = "") -> Path:
    config = tmp_path / "tradebalancer.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [feeds.feed]
            url = "ws://127.0.0.1:9/stocks"
            subscribe = ["T.*"]
            api_key_file = ""
            pipes = 3
            workers = 1
            pipe_size = 65536
            working_directory = "{tmp_path}"
            command = ["{{{{ python }}}}", "-m", "tradebalancer.sample", "--interval", "60"]
            stats_interval = 0.2
            reconnect.initial = 0.001
            reconnect.max = 0.002
            """
        )
        + extra
    )
    return config


def _start(config: Path, **popen: object) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["MASSIVE_API_KEY"] = "test-key"
    env["PYTHONPATH"] = str(REPO)
    argv = [sys.executable, "-m", "tradebalancer", "--config", str(config), "run", "feed"]
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, **popen)  # type: ignore[call-overload,no-any-return]


def _caught(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def _drain(process: subprocess.Popen[bytes], seconds: float) -> bytes:
    """Read the child's stderr until it exits (or ``seconds`` pass); return all of it."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    data = bytearray()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            if process.poll() is not None:
                break
            time.sleep(0.01)
            continue
        if not chunk:
            break
        data += chunk
    return bytes(data)


@pytest.mark.timeout(60)
def test_sigterm_while_stderr_is_a_full_pipe_stops_the_balancer(tmp_path: Path) -> None:
    """SIGTERM that interrupts a blocked log write (journald busy) still stops the balancer.

    The handler used to log: run inside the interrupted stderr write, its logging raised
    "reentrant call", the stop was never recorded and the balancer reconnected on for ever.
    """
    process = _start(_config(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        wchan = ""
        while "pipe_write" not in wchan and time.monotonic() < deadline:
            time.sleep(0.02)
            wchan = Path(f"/proc/{process.pid}/wchan").read_text()
        assert "pipe_write" in wchan, f"the balancer never blocked writing its log ({wchan})"
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # let the handler run inside the blocked write
        log = _drain(process, 20).decode(errors="replace")
        status = process.wait(5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()
    assert "reentrant call" not in log, log[-3000:]
    assert "SIGTERM received: stopping" in log, log[-3000:]
    assert status == 0, log[-3000:]


@pytest.mark.timeout(60)
def test_sighup_reloads_and_sigint_stops(tmp_path: Path) -> None:
    """SIGHUP reloads the unchanged file (the workers live on); SIGINT stops cleanly."""
    log_path = tmp_path / "balancer.log"
    with log_path.open("wb") as log:
        process = _start(_config(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "worker 0 started" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGHUP)
        while "reloaded" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert process.poll() is None, log_path.read_text()[-3000:]
        process.send_signal(signal.SIGINT)
        status = process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text()
    assert "SIGHUP received: reloading" in text
    assert "reloaded: nothing changed" in text
    assert "worker 0 exited" not in text.split("SIGINT received")[0], text[-3000:]
    assert "SIGINT received: stopping" in text
    assert status == 0, text[-3000:]


@pytest.mark.timeout(60)
def test_sigterm_as_soon_as_the_handler_is_in_is_honoured(tmp_path: Path) -> None:
    """SIGTERM the moment the process catches it (before any worker or connection): exit 0, logged.

    With a regular file as stderr too: CPython runs pending handlers inside every buffered
    flush, so a handler that logged used to land in the start-up's own log writes.
    """
    log_path = tmp_path / "balancer.log"
    with log_path.open("wb") as log:
        process = _start(_config(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    try:
        term = 1 << (signal.SIGTERM - 1)
        deadline = time.monotonic() + 20
        while not _caught(process.pid) & term and time.monotonic() < deadline:
            time.sleep(0.0005)
        process.send_signal(signal.SIGTERM)
        status = process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text()
    assert status == 0, text
    assert re.search(r"SIGTERM received( during start-up)?: stopping", text), text
    assert "connected" not in text and "worker 0 started" not in text, text


def test_handlers_only_record_and_take_reports_each_signal_once() -> None:
    """Signals sent twice come out of take() once each, in a fixed order; none is acted on."""
    handled = signals.Signals()
    handled.hand_to_loop()
    try:
        assert handled.take() == []
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.raise_signal(signum)
        assert handled.pending
        assert handled.take() == [signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD]
        assert not handled.pending
        assert handled.take() == []
    finally:
        handled.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_the_wakeup_fd_becomes_readable_on_a_signal() -> None:
    """A signal makes the wakeup fd readable at once, so the loop's epoll returns."""
    import select

    handled = signals.Signals()
    handled.hand_to_loop()
    try:
        handled.take()
        assert select.select([handled.fileno()], [], [], 0)[0] == []
        signal.raise_signal(signal.SIGHUP)
        assert select.select([handled.fileno()], [], [], 1)[0] == [handled.fileno()]
        assert handled.take() == [signal.SIGHUP]
        assert select.select([handled.fileno()], [], [], 0)[0] == []
    finally:
        handled.close()


def test_release_re_raises_what_arrived_for_commands_that_do_not_run() -> None:
    """A SIGHUP recorded during check-config's start-up ends it as SIGHUP would have."""
    code = (
        "import signal\n"
        # as a shell gives it; under nohup(1) SIGHUP comes in ignored, and "as it would have"
        # is then to go on
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
        "from tradebalancer import signals\n"
        "handled = signals.install()\n"
        "signal.raise_signal(signal.SIGHUP)\n"
        "print('still here', flush=True)\n"
        "handled.release()\n"
        "print('not reached', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
    )
    assert result.returncode == -signal.SIGHUP
    assert result.stdout == b"still here\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_during_start_up_ends_the_process_at_once_saying_so(signum: int) -> None:
    """Before the loop takes over, SIGTERM or SIGINT exits 0 at once, with one line on stderr."""
    code = (
        "import signal, time\n"
        "from tradebalancer import signals\n"
        "signals.install()\n"
        f"signal.raise_signal({int(signum)})\n"
        "time.sleep(5)\n"
        "print('not reached', flush=True)\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
    )
    assert time.monotonic() - started < 4
    assert result.returncode == 0
    assert result.stdout == b""
    name = signal.Signals(signum).name
    assert f"tradebalancer: {name} received during start-up: stopping" in result.stderr.decode()
