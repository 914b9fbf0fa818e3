"""sd_notify over a real AF_UNIX datagram socket, the watchdog interval, journald log lines."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tradebalancer.systemd import JournalFormatter, Notifier, under_journal, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()


def test_messages_reach_the_notify_socket(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY, STATUS, WATCHDOG and STOPPING arrive as sd_notify datagrams."""
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    notifier.ready("connecting: wss://x")
    notifier.status("streaming")
    notifier.status("streaming")  # unchanged: not sent again
    notifier.watchdog()
    notifier.stopping("stopping")
    notifier.close()
    received = [sock.recv(4096).decode() for _ in range(4)]
    assert received == [
        "READY=1\nSTATUS=connecting: wss://x",
        "STATUS=streaming",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping",
    ]


def test_abstract_notify_socket_names_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """An '@' NOTIFY_SOCKET is the abstract namespace, as systemd may hand out."""
    name = f"tradebalancer-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier()
        notifier.watchdog()
        notifier.close()
        assert sock.recv(100) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_without_a_service_manager_nothing_is_sent() -> None:
    """With no NOTIFY_SOCKET the notifier is disabled and calls are no-ops."""
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")
    notifier.watchdog()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "garbage"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], expected: float | None
) -> None:
    """WATCHDOG=1 is due at half the manager's timeout, and only for the process it names."""
    assert watchdog_interval(environ) == expected


def test_watchdog_pid_matching_this_process_enables_it() -> None:
    """WATCHDOG_PID equal to our pid keeps the watchdog on."""
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1.0


def test_journal_lines_carry_the_priority_and_fold_tracebacks() -> None:
    """Each record is one line with an sd-daemon <N> prefix matching its level."""
    formatter = JournalFormatter("%(name)s: %(message)s")
    record = logging.LogRecord(
        "tradebalancer.service", logging.WARNING, "", 0, "slow %s", ("w1",), None
    )
    assert formatter.format(record) == "<4>tradebalancer.service: slow w1"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        error = logging.LogRecord("x", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    line = formatter.format(error)
    assert line.startswith("<3>x: failed | Traceback")
    assert "\n" not in line


def test_under_journal_compares_device_and_inode_of_stderr(tmp_path: Path) -> None:
    """JOURNAL_STREAM counts only if it names the stream we actually write to."""
    with open(tmp_path / "log", "w") as f:
        stat = os.fstat(f.fileno())
        assert under_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}, f.fileno())
        assert not under_journal({"JOURNAL_STREAM": "1:2"}, f.fileno())
        assert not under_journal({}, f.fileno())
