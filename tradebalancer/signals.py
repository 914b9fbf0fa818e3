"""Signals as facts the event loop reads: record-only handlers and a wakeup fd.

Owns the process's dispositions of SIGTERM, SIGINT, SIGHUP and SIGCHLD while the balancer runs.
Must not touch: what a signal means (the service decides: stop, reload, reap), logging, I/O
beyond the wakeup socket.

Why a handler records and does nothing else. CPython runs a Python signal handler between two
bytecodes of the main thread, and also inside C code that calls ``PyErr_CheckSignals``. One
such place is the flush of every ``BufferedWriter``, stderr's included: after each raw write it
runs the pending handlers while it still holds the stream's lock (Modules/_io/bufferedio.c,
``_bufferedwriter_flush_unlocked``: "We must run signal handlers before blocking another
time"). A signal that lands while a log line is being written (to a file, a pipe or journald's
socket alike; a blocked write makes the window long) runs its handler there. A handler that
logs then re-enters stderr, which raises ``RuntimeError: reentrant call inside
<_io.BufferedWriter name='<stderr>'>``; the exception leaves the handler before it could
record the stop, and the logging call it landed in swallows it ("--- Logging error ---"). That
is how a balancer went on reconnecting for a minute after SIGTERM, never saying it got it. So
the handler only stores the signal number in a dict that already holds the key (no allocation,
no lock, nothing that can fail), and the loop, woken by the byte CPython's C-level handler
writes to the wakeup fd, takes the signals and acts on them at its own pace, logging included.

Two modes. At start-up (``install``: ``python -m tradebalancer`` does it before it imports the
rest of the package) nothing runs yet that a stop would have to wind down, so SIGTERM and
SIGINT end the process at once, with status 0 and one line written straight to stderr with
``os.write`` (no logging, no lock: "SIGTERM received during start-up: stopping"); start-up
takes seconds on a slow machine, and waiting for its end to honour a stop would be waiting for
nothing. Once the service is about to create its pipes and workers it hands the signals to the
loop (``hand_to_loop``): from then on a handler records, the loop acts. Before ``install``,
in the few milliseconds the interpreter needs to start, SIGTERM keeps its default action
(nothing has been started then; systemd counts that as a clean stop). Commands other than
``run`` give the signals back (``release``) once their command line is read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterable
from types import FrameType

from .systemd import format_line

__all__ = ["HANDLED", "Signals", "install", "names", "uninstall"]

# The signals the balancer handles, in the order ``take`` reports them.
HANDLED: tuple[signal.Signals, ...] = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGCHLD,
)

# Recorded even at start-up: SIGHUP (logged by the loop) and SIGCHLD (no worker yet anyway).
_RECORDED_AT_START_UP = frozenset({signal.SIGHUP, signal.SIGCHLD})

_installed: Signals | None = None


class Signals:
    """The handled signals received and not yet taken, and the fd that wakes the loop."""

    def __init__(self) -> None:
        # One key per handled signal, present from the start: the handler's store then never
        # allocates. The value says whether that signal arrived since the last ``take``.
        self._pending: dict[int, bool] = dict.fromkeys(HANDLED, False)
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self.installed = False
        self.deferred = False  # stop signals are the loop's (hand_to_loop), not ended at once

    def fileno(self) -> int:
        """The fd that becomes readable when a handled signal arrives: poll it, then ``take``."""
        return self._read.fileno()

    def install(self) -> None:
        """Handle the signals from now on, start-up mode; idempotent. Main thread only."""
        if self.installed:
            return
        # CPython's C-level handler writes the signal number here the moment a signal lands,
        # so epoll returns at once; the Python handler below runs at the next bytecode.
        self._previous_wakeup = signal.set_wakeup_fd(
            self._write.fileno(), warn_on_full_buffer=False
        )
        for signum in HANDLED:
            handler = self._record if signum in _RECORDED_AT_START_UP else self._stop_at_once
            self._previous[signum] = signal.signal(signum, handler)
        self.installed = True
        self.deferred = False

    def hand_to_loop(self) -> None:
        """From now on SIGTERM and SIGINT are recorded for the loop, not ended at once."""
        self.install()
        for signum in HANDLED:
            signal.signal(signum, self._record)
        self.deferred = True

    def _stop_at_once(self, signum: int, frame: FrameType | None) -> None:
        # Start-up: nothing to wind down. os.write, not logging: see the module docstring.
        name = signal.Signals(signum).name
        line = format_line(
            logging.INFO, "tradebalancer", f"{name} received during start-up: stopping"
        )
        with contextlib.suppress(OSError):
            os.write(2, line.encode(errors="replace"))
        os._exit(0)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # The only thing a handler may safely do here: see the module docstring.
        self._pending[signum] = True

    @property
    def pending(self) -> bool:
        """Whether a handled signal arrived that ``take`` has not reported yet."""
        return True in self._pending.values()

    def take(self) -> list[signal.Signals]:
        """Return (and forget) the handled signals received since the last call, in HANDLED order.

        A signal sent several times between two calls is reported once. Calling this Python
        function lets CPython run any handler still due first, so a signal whose wakeup byte
        was drained is never missed.
        """
        self._drain()
        pending = self._pending
        taken = []
        for signum in HANDLED:
            # A handler running between the test and the store sets True over True: the two
            # arrivals are reported as one, and a later arrival is reported by the next call.
            if pending[signum]:
                pending[signum] = False
                taken.append(signum)
        return taken

    def release(self, *, reraise: bool = True) -> None:
        """Give the signals back to their previous dispositions; re-raise those received.

        For the commands that do not run the loop: a SIGTERM that arrived during start-up then
        does what it would have done without us. ``reraise=False`` forgets them instead (the
        loop is over and has acted on what it took).
        """
        if not self.installed:
            return
        received = self.take() if reraise else []
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self.installed = False
        for signum in received:
            if signum is not signal.SIGCHLD:
                signal.raise_signal(signum)

    def close(self) -> None:
        """Release the signals (forgetting any received) and close the wakeup socket."""
        self.release(reraise=False)
        self._read.close()
        self._write.close()

    def _drain(self) -> None:
        try:
            while self._read.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass


def install() -> Signals:
    """Return the process's Signals, installing them on the first call."""
    global _installed
    if _installed is None:
        _installed = Signals()
    _installed.install()
    return _installed


def uninstall() -> None:
    """Release and close the process's Signals, if installed (a command is over)."""
    global _installed
    if _installed is not None:
        _installed.close()
        _installed = None


def fork() -> int:
    """``os.fork`` with the handled signals blocked across it: the parent gets its mask back,
    the child keeps them blocked until it has reset its dispositions (or exits). Unblocked, a
    SIGTERM meant for the child (its PR_SET_PDEATHSIG, say) could run the balancer's inherited
    handler there, which would record it and let the child go on with the signal gone."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return pid


def names(signals: Iterable[int]) -> str:
    """Format signal numbers for a log line: 'SIGTERM, SIGHUP'."""
    return ", ".join(signal.Signals(signum).name for signum in signals)
