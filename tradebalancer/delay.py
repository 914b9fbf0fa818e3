"""The delay behind the market: how old the events are when they arrive, and the warning.

Owns reading an event's own timestamp out of a frame (``event_time``) and the warning when the
delay stays high (``DelayWatch``). The delay is the wall clock minus the ``t`` of the frame's
last event: the SIP timestamp of a trade or quote, in milliseconds since the epoch on Massive's
stock feeds (nanoseconds and microseconds are recognised by their size). It is sampled once
per frame, from the last event because it is the newest and because it is found from the end
of the frame without parsing the rest.

What it means: tens of milliseconds is the feed and the network. Seconds, and growing, is the
feed buffering for us, which Massive does for a consumer that reads too slowly before it cuts
it off; the warning says so while there is still time to act. It fires when every sample for
``after`` seconds was over the threshold (a burst is not a trend), once per episode, and an
INFO line says when the delay is back under it. Clock skew between the feed and this host adds
to every sample: keep the host's clock synchronised (systemd-timesyncd, chrony).

No I/O but the logger it is given, no clock: ``now`` and the wall-clock time come in.
"""

from __future__ import annotations

import logging

__all__ = ["DelayWatch", "event_time"]

_T = b'"t":'
_TAIL = 512  # bytes from the end where the last event's "t" is looked for
_NUMBER = 24  # bytes after "t": where the number ends (19 digits and some space at most)


def event_time(message: bytes) -> float | None:
    """The ``t`` of ``message``'s last event, in seconds since the epoch; None if it has none."""
    # Bounded searches and int() (which takes the spaces JSON allows around a number) rather
    # than a regular expression: this runs once per frame, and measured no slower.
    at = message.rfind(_T, len(message) - _TAIL if len(message) > _TAIL else 0)
    if at < 0:
        return None
    start = at + len(_T)
    value = _integer(message, start, message.find(b",", start, start + _NUMBER))
    if value is None:  # "t" ends its event, or is no integer
        value = _integer(message, start, message.find(b"}", start, start + _NUMBER))
        if value is None:
            return None
    if value >= 10**19:  # 20 digits: no time of ours (and past what the C router reads)
        return None
    if value >= 10**17:  # nanoseconds
        return value / 1e9
    if value >= 10**14:  # microseconds
        return value / 1e6
    if value >= 10**11:  # milliseconds, what Massive's stock feeds send
        return value / 1e3
    return value if value >= 10**9 else None  # seconds; anything smaller is no time of ours


def _integer(message: bytes, start: int, end: int) -> int | None:
    if end < 0:
        return None
    try:
        return int(message[start:end])
    except ValueError:
        return None


class DelayWatch:
    """Warns once per episode when the delay stays over ``threshold`` for ``after`` seconds."""

    def __init__(self, logger: logging.Logger, threshold: float, after: float) -> None:
        self.logger = logger
        self.threshold = threshold  # seconds; 0 turns the warning off
        self.after = after
        self.behind = False  # a warning was written and the delay has not come back yet
        self.episodes = 0
        self._over_since: float | None = None  # the first of the samples over the threshold
        self._worst = 0.0

    def sample(self, delay: float, now: float) -> None:
        """Take one sample of the delay (seconds) at loop time ``now``."""
        if not self.threshold or delay <= self.threshold:  # 0: off, and off ends an episode
            if self.behind:
                self.behind = False
                self.logger.info(
                    "back within %g s of the feed's timestamps (%.3f s now; worst %.1f s)",
                    self.threshold,
                    delay,
                    self._worst,
                )
            self._over_since = None
            return
        if self._over_since is None:
            self._over_since, self._worst = now, delay
            return
        self._worst = max(self._worst, delay)
        if not self.behind and now - self._over_since >= self.after:
            self.behind = True
            self.episodes += 1
            self.logger.warning(
                "%.1f s behind the feed's timestamps for %.0f s (threshold %g s, "
                "delay_warning): the feed is buffering for us, and cuts a consumer off that "
                "stays behind; check the workers' backlog (tradebalancer status), the CPU and "
                "the network, and the host's clock",
                delay,
                now - self._over_since,
                self.threshold,
            )
