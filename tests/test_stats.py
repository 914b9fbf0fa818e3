"""The stats: rates between snapshots, the log line and the STATUS line."""

from __future__ import annotations

from tradebalancer.stats import Stats


def test_rates_are_per_second_since_the_previous_snapshot() -> None:
    """Rates divide the counters' growth by the time between two calls."""
    stats = Stats()
    stats.rates(10.0)
    stats.events, stats.bytes, stats.frames = 5000, 2_000_000, 20
    rates = stats.rates(12.0)
    assert rates == {"events": 2500.0, "bytes": 1_000_000.0, "frames": 10.0}
    stats.events += 100
    assert stats.rates(13.0)["events"] == 100.0


def test_log_line_names_every_figure() -> None:
    """The periodic line carries rates, slow path, rejects, backlog, reconnects and restarts."""
    stats = Stats(slow_frames=3, rejected_frames=1, reconnects=2, worker_restarts=4)
    stats.largest_backlog, stats.largest_backlog_worker = 3 << 20, 1
    line = stats.log_line({"events": 1234567.0, "bytes": 135e6, "frames": 4000.0})
    assert line == (
        "1,234,567 events/s, 135.0 MB/s, 4,000 frames/s; slow path 3, rejected 1; "
        "largest backlog 3 MiB (worker 1); reconnects 2, worker restarts 4"
    )


def test_status_line_starts_with_the_state_and_shows_the_tls_path() -> None:
    """STATUS= shows state, URL, TLS path and the numbers an operator looks for."""
    stats = Stats(state="streaming", url="wss://socket.massive.com/stocks", tls="kernel")
    line = stats.status_line({"events": 1000.0, "bytes": 1e5, "frames": 10.0})
    assert line == (
        "streaming: wss://socket.massive.com/stocks TLS kernel; 1,000 ev/s, 0.1 MB/s; "
        "backlog 0; reconnects 0, worker restarts 0"
    )


def test_the_first_rates_run_from_the_start_and_never_divide_by_nothing() -> None:
    """The first READY/STATUS line: rates since the start, not a count over a nanosecond."""
    stats = Stats()
    stats.events, stats.bytes, stats.frames = 2, 220, 1
    assert stats.rates(10.0) == {"events": 0.0, "bytes": 0.0, "frames": 0.0}
    stats = Stats(started_at=10.0)
    stats.events, stats.bytes, stats.frames = 5000, 550_000, 50
    assert stats.rates(15.0) == {"events": 1000.0, "bytes": 110_000.0, "frames": 10.0}
    stats.events += 100
    assert stats.rates(15.0005) == {"events": 0.0, "bytes": 0.0, "frames": 0.0}
