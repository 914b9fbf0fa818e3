"""The delay behind the market: an event's own timestamp found in a frame, and the warning."""

from __future__ import annotations

import logging

import pytest

from tradebalancer.delay import DelayWatch, event_time
from tradebalancer.histogram import DELAY_BOUNDS, Histogram, quantile
from tradebalancer.replay.stream import restamp

TRADE = b'{"ev":"T","sym":"A","p":1.5,"s":1,"t":%d,"q":7,"trft":1704205799998}'


@pytest.mark.parametrize(
    ("frame", "seconds"),
    [
        (b"[" + TRADE % 1704205800000 + b"]", 1704205800.0),  # milliseconds
        (b"[" + TRADE % 1704205800000123 + b"]", 1704205800.000123),  # microseconds
        (b"[" + TRADE % 1704205800000123456 + b"]", 1704205800.000123456),  # nanoseconds
        (b'[{"ev":"T","t": 1704205800000}]', 1704205800.0),  # a space after the colon
        (b"[" + TRADE % 1 + b"," + TRADE % 1704205801000 + b"]", 1704205801.0),  # the last
        (b'[{"ev":"Q","sym":"A"}]', None),  # no "t"
        (b'[{"ev":"T","t":"soon"}]', None),  # not a number
    ],
)
def test_the_last_events_t_is_found_in_any_unit(frame: bytes, seconds: float | None) -> None:
    """Milliseconds, microseconds or nanoseconds since the epoch, from the last event only."""
    found = event_time(frame)
    assert found == pytest.approx(seconds) if seconds is not None else found is None


def test_restamp_sets_the_last_t_and_nothing_else() -> None:
    """The replay's --delay rewrites the last event's "t" only, in milliseconds."""
    frame = b"[" + TRADE % 1 + b"," + TRADE % 2 + b"]"
    stamped = restamp(frame, 1800000000.25)
    assert stamped == b"[" + TRADE % 1 + b"," + TRADE % 1800000000250 + b"]"
    assert event_time(stamped) == pytest.approx(1800000000.25)


def test_the_warning_needs_a_sustained_delay_and_comes_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over the line for `after` seconds warns once; a burst does not; coming back says so."""
    watch = DelayWatch(logging.getLogger("test.delay"), threshold=5.0, after=10.0)
    with caplog.at_level(logging.INFO, "test.delay"):
        for now in range(0, 9):
            watch.sample(7.0, float(now))  # a burst of 8 s
        watch.sample(0.1, 9.0)
        assert not caplog.records and not watch.behind
        for now in range(10, 25):
            watch.sample(6.0 + now / 10, float(now))
        assert watch.behind and watch.episodes == 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0].getMessage().startswith("8.0 s behind the feed's timestamps for 10 s")
        watch.sample(0.05, 26.0)
    assert caplog.records[-1].getMessage().startswith("back within 5 s of the feed's timestamps")
    assert not watch.behind


def test_a_threshold_of_zero_never_warns(caplog: pytest.LogCaptureFixture) -> None:
    """delay_warning = 0 turns the warning off; the samples still count elsewhere."""
    watch = DelayWatch(logging.getLogger("test.delay"), threshold=0.0, after=0.0)
    for now in range(100):
        watch.sample(1000.0, float(now))
    assert not watch.behind and not caplog.records


def test_quantiles_interpolate_within_buckets_between_two_readings() -> None:
    """Only what was counted between the readings counts, interpolated as Prometheus does."""
    histogram = Histogram(DELAY_BOUNDS)
    for _ in range(1000):
        histogram.observe(50.0)  # before: must not count
    before = histogram.reading()
    for value in [0.02] * 90 + [0.2] * 9 + [400.0]:
        histogram.observe(value)
    after = histogram.reading()
    assert quantile(DELAY_BOUNDS, before, after, 0.5) == pytest.approx(0.01 + 0.015 * 50 / 90)
    assert 0.1 < (quantile(DELAY_BOUNDS, before, after, 0.95) or 0) <= 0.25
    assert quantile(DELAY_BOUNDS, before, after, 1.0) == 300.0  # +Inf: the highest bound
    assert quantile(DELAY_BOUNDS, after, after, 0.5) is None
    assert histogram.count == 1100 and histogram.counts[-1] == 1


def test_turning_the_warning_off_ends_the_episode() -> None:
    """delay_warning = 0 by a reload while behind: the flag (and its gauge) goes back to 0."""
    watch = DelayWatch(logging.getLogger("test.delay"), threshold=1.0, after=2.0)
    for now in range(5):
        watch.sample(9.0, float(now))
    assert watch.behind
    watch.threshold = 0.0  # what Forwarder.reconfigure does
    watch.sample(9.0, 6.0)
    assert not watch.behind


@pytest.mark.parametrize(
    ("t", "seconds"),
    [(b"1733486400", 1733486400.0), (b"12345", None), (b"-1733486400000", None), (b"1e12", None)],
)
def test_seconds_are_seconds_and_small_numbers_no_time(t: bytes, seconds: float | None) -> None:
    """Ten digits are seconds since the epoch; what cannot be a time of ours is none."""
    found = event_time(b'[{"ev":"T","t":' + t + b"}]")
    assert found == seconds
