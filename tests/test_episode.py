"""A condition that comes and goes: one line to start, a summary per tick, one line to end."""

from __future__ import annotations

import logging

import pytest

from tradebalancer.episode import Episode

logger = logging.getLogger("tradebalancer.test_episode")


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [(record.levelname, record.getMessage()) for record in caplog.records]


def test_an_episode_is_told_in_three_kinds_of_line(caplog: pytest.LogCaptureFixture) -> None:
    """Start (WARNING, the caller's words), a summary per tick while it lasts, the end."""
    caplog.set_level(logging.INFO, logger=logger.name)
    episode = Episode(logger, "backpressure", "reading paused")
    episode.start(1.0, "backpressure: worker 1 is behind")
    episode.stop(1.5)
    episode.start(2.0, "not logged: the episode is under way")
    episode.stop(2.25)
    episode.tick(5.0, "worker 1 is behind")
    episode.start(6.0, "not logged")
    episode.tick(10.0, "worker 1 is still behind")  # on across the tick
    episode.stop(11.0)
    episode.tick(15.0, "unused")  # came on after the last tick? no, but it was on: a summary
    episode.tick(20.0, "unused")  # a quiet interval: the end
    assert lines(caplog) == [
        ("WARNING", "backpressure: worker 1 is behind"),
        (
            "WARNING",
            "backpressure goes on: reading paused 2 times for 0.8 s of the last 4.0 s; "
            "worker 1 is behind",
        ),
        (
            "WARNING",
            "backpressure goes on: reading paused once for 4.0 s of the last 5.0 s; "
            "worker 1 is still behind",
        ),
        ("WARNING", "backpressure goes on: reading paused for 1.0 s of the last 5.0 s; unused"),
        ("INFO", "backpressure over after 10.0 s: reading paused 3 times, for 5.8 s in all"),
    ]
    assert episode.episodes == 1 and not episode.active


def test_five_pauses_a_second_for_13_s_make_a_handful_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A slow worker toggled backpressure about five times a second: 132 lines in 13 s."""
    caplog.set_level(logging.INFO, logger=logger.name)
    episode = Episode(logger, "backpressure", "reading paused")
    next_tick = 5.0
    for step in range(65):  # on for 0.1 s every 0.2 s, 0 to 12.9 s
        now = step * 0.2
        episode.start(now, "backpressure: started")
        episode.stop(now + 0.1)
        if now + 0.2 >= next_tick:
            episode.tick(now + 0.2, "detail")
            next_tick += 5.0
    episode.tick(15.0, "detail")
    episode.tick(20.0, "detail")
    kinds = [message.split(":")[0] for _, message in lines(caplog)]
    assert kinds == ["backpressure"] + ["backpressure goes on"] * 3 + [
        "backpressure over after 12.9 s"
    ]
    assert "reading paused 65 times, for 6.5 s in all" in lines(caplog)[-1][1]
    assert episode.episodes == 1


def test_a_new_episode_after_the_end_opens_with_its_own_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    episode = Episode(logger, "backpressure", "reading paused")
    episode.start(0.0, "first")
    episode.stop(0.1)
    episode.tick(5.0, "d")
    episode.tick(10.0, "d")
    episode.start(11.0, "second")
    assert [message for _, message in lines(caplog)][-1] == "second"
    assert episode.episodes == 2


def test_seconds_on_count_every_episode_and_the_one_under_way() -> None:
    """The lifetime total (backpressure_seconds_total) survives summaries and episode ends."""
    episode = Episode(logging.getLogger("test.episode"), "backpressure", "reading paused")
    episode.start(0.0, "on")
    episode.stop(1.5)
    episode.start(2.0, "on")
    episode.tick(3.0, "")  # a summary while on: counted up to here, and on from here
    assert episode.seconds_on(3.5) == pytest.approx(3.0)
    episode.stop(4.0)
    episode.tick(10.0, "")  # the episode ends
    episode.tick(20.0, "")
    assert episode.seconds_on(20.0) == pytest.approx(3.5)
    episode.start(30.0, "on")
    assert episode.seconds_on(31.0) == pytest.approx(4.5)
