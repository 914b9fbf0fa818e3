"""Talking to the service manager: sd_notify messages and journald-friendly log lines.

Owns the notify socket (through sdnotify) and the log format. Holds no logic of its own: the
service decides when it is ready, what its status is and when to pet the watchdog.

sd_notify(3): READY=1 once the service is up, STATUS=<one line> for ``systemctl status``,
WATCHDOG=1 at least every WATCHDOG_USEC (we send at half of it, the man page's advice), and
STOPPING=1 when shutdown begins. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

Logging: under journald (JOURNAL_STREAM names our stderr) each record is one line with an
sd-daemon ``<N>`` priority prefix (sd-daemon(3)) and no timestamp, since the journal stamps it;
on a terminal, a human line with the time.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping

import sdnotify

# sd-daemon(3) priorities, as syslog(3) numbers them.
_PRIORITIES = {
    logging.CRITICAL: 2,  # SD_CRIT
    logging.ERROR: 3,  # SD_ERR
    logging.WARNING: 4,  # SD_WARNING
    logging.INFO: 6,  # SD_INFO
    logging.DEBUG: 7,  # SD_DEBUG
}


class Notifier:
    """Sends sd_notify messages to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self.watchdog_interval = watchdog_interval(environ)
        self._last_status = ""

    def ready(self, status: str) -> None:
        """Tell the manager the service is up (READY=1) with its first status line."""
        self._send(f"READY=1\nSTATUS={status}")
        self._last_status = status

    def status(self, status: str) -> None:
        """Publish one status line for ``systemctl status`` (sent only when it changed)."""
        if status != self._last_status:
            self._send(f"STATUS={status}")
            self._last_status = status

    def watchdog(self) -> None:
        """Pet the watchdog: the event loop is making progress."""
        self._send("WATCHDOG=1")

    def reloading(self, monotonic_usec: int) -> None:
        """RELOADING=1: a reload began (READY=1 ends it); MONOTONIC_USEC as systemd 253+
        requires for Type=notify-reload, harmless to older ones."""
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def stopping(self, status: str) -> None:
        """Tell the manager shutdown has begun (STOPPING=1)."""
        self._send(f"STOPPING=1\nSTATUS={status}")

    def close(self) -> None:
        """Close the notify socket."""
        if self._notifier is not None and self._notifier.socket is not None:
            self._notifier.socket.close()
        self._notifier = None

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Return how often to send WATCHDOG=1 (half of WATCHDOG_USEC), or None if not asked to.

    WATCHDOG_PID, when set, names the process the watchdog is meant for (sd_watchdog_enabled(3)).
    """
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


def under_journal(environ: Mapping[str, str], stream: int = 2) -> bool:
    """True if ``stream`` is connected to journald (JOURNAL_STREAM is its device:inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(stream)
    except (ValueError, OSError):
        return False
    return stat.st_dev == device and stat.st_ino == inode


class JournalFormatter(logging.Formatter):
    """One line per record with an sd-daemon priority prefix; tracebacks folded onto it."""

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record`` as ``<N>logger: message`` on a single line."""
        text = super().format(record)
        priority = _PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>" + text.replace("\n", " | ")


def format_line(
    level: int, name: str, message: str, environ: Mapping[str, str] | None = None
) -> str:
    """One log line as ``configure_logging`` would write it, for code that cannot log.

    A signal handler must not use logging (signals.py); it writes this with ``os.write``.
    """
    environ = os.environ if environ is None else environ
    if under_journal(environ):
        return f"<{_PRIORITIES.get(level, 6)}>{name}: {message}\n"
    stamp = time.strftime("%H:%M:%S")
    return f"{stamp} {logging.getLevelName(level):<7} {name}: {message}\n"


def configure_logging(verbose: bool = False, environ: Mapping[str, str] | None = None) -> None:
    """Send log records to stderr, in journald's format under systemd, for humans otherwise."""
    environ = os.environ if environ is None else environ
    handler = logging.StreamHandler(sys.stderr)
    if under_journal(environ):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # websockets logs every frame at DEBUG; keep it out even in verbose mode.
    logging.getLogger("websockets").setLevel(logging.WARNING)
