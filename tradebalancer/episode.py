"""A condition that comes and goes many times a second, told as one episode.

Owns the log lines of a repeated condition such as backpressure, which a slow worker turns on
and off about five times a second (two lines each, 132 lines in 13 s, before): one line when an
episode starts, one summary per stats interval while it lasts (how often, for how long in
all), one line when a whole stats interval has passed without it. The caller says when the
condition starts and stops and calls ``tick`` at each stats tick; the words of the first line
and of the summaries' detail are the caller's. No I/O but the logger it is given, no clock.
"""

from __future__ import annotations

import logging

__all__ = ["Episode"]


class Episode:
    """One repeated condition's episodes, for the log."""

    def __init__(self, logger: logging.Logger, name: str, action: str) -> None:
        self.logger = logger
        self.name = name  # "backpressure"
        self.action = action  # what the condition does, for the summaries: "reading paused"
        self.active = False  # an episode is under way (it may be off right now)
        self.on = False  # the condition holds right now
        self.episodes = 0
        self._started_at = 0.0
        self._since = 0.0  # when the condition last came on
        self._times = self._total = 0  # turned on: this episode, since the last tick
        self._held = self._held_total = 0.0  # seconds on: since the last tick, this episode
        self._held_ever = 0.0  # seconds on, every episode, up to the last stop or tick
        self._last_tick = 0.0
        self._last_off = 0.0

    def start(self, now: float, line: str) -> None:
        """The condition came on; ``line`` (WARNING) opens the episode if none is under way."""
        if self.on:
            return
        self.on = True
        self._since = now
        self._times += 1
        self._total += 1
        if not self.active:
            self.active = True
            self.episodes += 1
            self._started_at = self._last_tick = now
            self.logger.warning("%s", line)

    def stop(self, now: float) -> None:
        """The condition went off (the episode goes on until a quiet stats interval)."""
        if self.on:
            self.on = False
            self._held += now - self._since
            self._held_total += now - self._since
            self._held_ever += now - self._since
            self._last_off = now

    def seconds_on(self, now: float) -> float:
        """Seconds the condition held since the start, every episode, the one under way too."""
        return self._held_ever + (now - self._since if self.on else 0.0)

    def tick(self, now: float, detail: str) -> None:
        """At a stats tick: a summary if it came on since the last one or holds now (with the
        caller's ``detail``), or the end of the episode if it did neither."""
        if not self.active:
            return
        if self.on or self._times or self._held:
            held = self._held + (now - self._since if self.on else 0.0)
            times = f" {_times(self._times)}" if self._times else ""
            self.logger.warning(
                "%s goes on: %s%s for %.1f s of the last %.1f s; %s",
                self.name,
                self.action,
                times,
                held,
                now - self._last_tick,
                detail,
            )
            if self.on:  # count the time held so far now, and from here on at the next stop
                self._held_total += now - self._since
                self._held_ever += now - self._since
                self._since = now
        else:
            self.logger.info(
                "%s over after %.1f s: %s %s, for %.1f s in all",
                self.name,
                self._last_off - self._started_at,
                self.action,
                _times(self._total),
                self._held_total,
            )
            self.active = False
            self._total = 0
            self._held_total = 0.0
        self._times = 0
        self._held = 0.0
        self._last_tick = now


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count:,} times"
