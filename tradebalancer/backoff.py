"""The reconnect policy: jittered exponential backoff, reset by a healthy connection.

Owns the arithmetic of "how long until the next attempt", and nothing else: no clock (the
caller says whether the last connection was healthy), no I/O. Randomness comes from a
``random.Random`` the caller passes, so tests fix it.

    delay(n) = min(max, initial * multiplier**n) * (1 - jitter * U[0, 1))

The jitter shortens delays at random so that many clients dropped at once (a feed restart)
do not come back in lockstep. The attempt count starts over only after a connection that
streamed for ``healthy_after`` seconds: a feed that accepts connections and drops them at once
still backs off. ``max_connections`` (another client took the stream over with the same key)
waits ``max_connections_cooldown`` instead, without jitter: coming back sooner would only take
the stream back from that client, or lose it again.
"""

from __future__ import annotations

import random
from typing import Protocol


class ReconnectPolicy(Protocol):
    """The reconnect settings (config.ReconnectConfig has these fields)."""

    @property
    def initial(self) -> float: ...
    @property
    def max(self) -> float: ...
    @property
    def multiplier(self) -> float: ...
    @property
    def jitter(self) -> float: ...
    @property
    def max_connections_cooldown(self) -> float: ...


class Backoff:
    """Computes the delay before each reconnect attempt."""

    def __init__(self, policy: ReconnectPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.attempt = 0  # attempts since the last healthy connection

    def next_delay(self, *, healthy: bool, cooldown: bool) -> float:
        """Return the seconds to wait before the next attempt, and count the attempt.

        ``healthy``: the connection that just ended had streamed long enough to reset the
        count. ``cooldown``: it ended with max_connections.
        """
        policy = self.policy
        if healthy:
            self.attempt = 0
        if cooldown:
            delay = policy.max_connections_cooldown
        else:
            try:
                base = min(policy.max, policy.initial * policy.multiplier**self.attempt)
            except OverflowError:  # a thousand attempts at 2x: the cap won long ago
                base = policy.max
            delay = base * (1.0 - policy.jitter * self.rng.random())
        self.attempt += 1
        return delay
