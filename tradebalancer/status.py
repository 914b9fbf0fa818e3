"""What the service tells the world about itself, and when: the stats line, STATUS, READY, WATCHDOG.

Owns the timing of the service manager's messages (systemd.py sends them) and of the stats
line (stats.py writes it): a stats line and a STATUS= update every ``stats_interval``;
READY=1 once the first connection attempt has settled; WATCHDOG=1 at the interval the manager
asked for. Must not touch: the numbers themselves (the parts keep them in ``Stats``), the
loop (it asks ``deadline()`` and calls ``tick``).

READY=1 waits for the first attempt to settle, streaming (or every channel refused) or failed
and retrying, so that
``systemctl start`` fails on a refused key (exit 77 comes before READY); a feed that accepts
the connection but does not answer holds it back ``READY_WAIT`` seconds at most (systemd's
start timeout is 90 s by default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .stats import Stats
from .systemd import Notifier

__all__ = ["READY_WAIT", "StatusReporter"]

logger = logging.getLogger(__name__)

READY_WAIT = 20.0


class StatusReporter:
    """The service's periodic messages: stats line, STATUS=, READY=, WATCHDOG=."""

    def __init__(self, notifier: Notifier, stats: Stats, interval: float, now: float) -> None:
        self.notifier = notifier
        self.stats = stats
        self.interval = interval
        self._next_stats = now + interval
        self._ready_by: float | None = now + READY_WAIT  # None once READY=1 is sent
        watchdog = notifier.watchdog_interval
        self._next_watchdog: float | None = now if watchdog else None

    @property
    def ready(self) -> bool:
        """READY=1 was sent."""
        return self._ready_by is None

    def retime(self, interval: float, now: float) -> None:
        """A reloaded stats interval: the next line is due ``interval`` from now at the latest."""
        self.interval = interval
        self._next_stats = min(self._next_stats, now + interval)

    def deadline(self) -> float:
        """When ``tick`` next has something to send."""
        timers = (self._next_stats, self._ready_by, self._next_watchdog)
        return min(t for t in timers if t is not None)

    def tick(self, now: float, account: Callable[[float], None]) -> None:
        """Send what is due; ``account`` brings the stats up to date before a stats line."""
        stats, notifier = self.stats, self.notifier
        if self._ready_by is not None and (
            stats.state in ("streaming", "refused", "reconnecting") or now >= self._ready_by
        ):
            self._ready_by = None
            notifier.ready(stats.status_line(stats.rates(now)))
        if now >= self._next_stats:
            account(now)
            rates = stats.rates(now)
            logger.info("%s", stats.log_line(rates))
            notifier.status(stats.status_line(rates))
            self._next_stats = now + self.interval
        if self._next_watchdog is not None and now >= self._next_watchdog:
            # Sent from the loop itself: a wedged loop stops petting and systemd restarts us.
            notifier.watchdog()
            assert notifier.watchdog_interval is not None
            self._next_watchdog = now + notifier.watchdog_interval
