"""The service's numbers, in one place: counters, rates, the stats log line and the STATUS line.

Owns the counters the event loop bumps and the arithmetic that turns two snapshots into rates.
The loop bumps plain integer attributes (an attribute add is the cheapest thing CPython does);
everything else happens once per stats interval. No I/O, no clock: ``now`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .units import format_size


@dataclass
class Stats:
    """Counters since the service started, plus the state the status line shows."""

    events: int = 0
    bytes: int = 0  # payload bytes of the events forwarded (without the 4-byte headers)
    frames: int = 0  # websocket data messages
    received_bytes: int = 0  # plaintext read from the transport by connections that are over
    fast_frames: int = 0
    slow_frames: int = 0
    rejected_frames: int = 0
    unkeyed_events: int = 0
    refused_events: int = 0  # too long for the pipe format: never written
    reconnects: int = 0
    reconnect_kinds: dict[str, int] = field(default_factory=dict)  # Outcome.kind -> count
    reloads: dict[str, int] = field(default_factory=dict)  # applied, refused, invalid
    worker_restarts: int = 0
    backpressure_episodes: int = 0
    largest_backlog: int = 0
    largest_backlog_worker: int | None = None
    state: str = "starting"
    url: str = ""
    tls: str = "-"  # e.g. "kernel", "user", "kernel tx/user rx", "none"
    refused_channels: tuple[str, ...] = ()  # the subscriptions the feed refused
    started_at: float | None = None  # when counting began: the first rates run from there
    started_wall: float = 0.0  # the same moment in seconds since the epoch
    _last: dict[str, float] = field(default_factory=dict, repr=False)

    def count(self, table: dict[str, int], key: str) -> None:
        """Add one to ``table[key]`` (reconnects by kind, reloads by result)."""
        table[key] = table.get(key, 0) + 1

    def rates(self, now: float) -> dict[str, float]:
        """Return per-second rates since the previous call (the first call: since the start).

        Over less than a millisecond there is no rate to speak of: 0, not a count divided by
        almost nothing (the first READY line used to show 2,000,000,000 events/s).
        """
        start = self.started_at if self.started_at is not None else now
        last = self._last or {"at": start, "events": 0, "bytes": 0, "frames": 0}
        elapsed = now - last["at"]
        rates = {
            name: (getattr(self, name) - last[name]) / elapsed if elapsed >= 1e-3 else 0.0
            for name in ("events", "bytes", "frames")
        }
        self._last = {"at": now, "events": self.events, "bytes": self.bytes, "frames": self.frames}
        return rates

    def log_line(self, rates: dict[str, float]) -> str:
        """The periodic INFO line."""
        return (
            f"{rates['events']:,.0f} events/s, {rates['bytes'] / 1e6:.1f} MB/s, "
            f"{rates['frames']:,.0f} frames/s; slow path {self.slow_frames}, "
            f"rejected {self.rejected_frames}; largest backlog {self._backlog()}; "
            f"reconnects {self.reconnects}, worker restarts {self.worker_restarts}"
        )

    def status_line(self, rates: dict[str, float]) -> str:
        """The STATUS= line for ``systemctl status``: state first, then the numbers."""
        refused = f" (refused: {','.join(self.refused_channels)})" if self.refused_channels else ""
        return (
            f"{self.state}{refused}: {self.url} TLS {self.tls}; "
            f"{rates['events']:,.0f} ev/s, {rates['bytes'] / 1e6:.1f} MB/s; "
            f"backlog {self._backlog()}; reconnects {self.reconnects}, "
            f"worker restarts {self.worker_restarts}"
        )

    def _backlog(self) -> str:
        if not self.largest_backlog:
            return "0"
        return f"{format_size(self.largest_backlog)} (worker {self.largest_backlog_worker})"
