"""The reconnect backoff: exponential, capped, jittered, reset only by a healthy connection."""

from __future__ import annotations

import random

from tradebalancer.backoff import Backoff
from tradebalancer.config import ReconnectConfig


class FixedRandom(random.Random):
    """Randomness pinned to one value, so the jitter is known."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


POLICY = ReconnectConfig(
    initial=1.0,
    max=10.0,
    multiplier=2.0,
    jitter=0.5,
    healthy_after=30.0,
    max_connections_cooldown=300.0,
)


def test_delays_double_up_to_the_cap() -> None:
    """Without jitter the delays are 1, 2, 4, 8, then the 10 s cap."""
    backoff = Backoff(POLICY, FixedRandom(0.0))
    delays = [backoff.next_delay(healthy=False, cooldown=False) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_jitter_shortens_each_delay_by_up_to_its_fraction() -> None:
    """With U = 0.5 and jitter 0.5 each delay is three quarters of its base."""
    backoff = Backoff(POLICY, FixedRandom(0.5))
    delays = [backoff.next_delay(healthy=False, cooldown=False) for _ in range(3)]
    assert delays == [0.75, 1.5, 3.0]


def test_jittered_delays_stay_within_their_bounds() -> None:
    """Real randomness keeps every delay between (1 - jitter) x base and base."""
    backoff = Backoff(POLICY, random.Random(42))
    for attempt in range(20):
        base = min(10.0, 2.0**attempt)
        assert 0.5 * base <= backoff.next_delay(healthy=False, cooldown=False) <= base


def test_only_a_healthy_connection_resets_the_count() -> None:
    """An unhealthy drop keeps backing off; a healthy one starts again at the initial delay."""
    backoff = Backoff(POLICY, FixedRandom(0.0))
    for _ in range(3):
        backoff.next_delay(healthy=False, cooldown=False)
    assert backoff.next_delay(healthy=False, cooldown=False) == 8.0
    assert backoff.next_delay(healthy=True, cooldown=False) == 1.0
    assert backoff.attempt == 1


def test_max_connections_waits_the_cooldown_without_jitter() -> None:
    """After max_connections the wait is the configured cooldown, exactly."""
    backoff = Backoff(POLICY, FixedRandom(0.9))
    assert backoff.next_delay(healthy=False, cooldown=True) == 300.0


def test_thousands_of_failed_attempts_stay_at_the_cap() -> None:
    """A feed down for days (thousands of attempts) keeps waiting the maximum, never overflows."""
    backoff = Backoff(POLICY, FixedRandom(0.0))
    delays = [backoff.next_delay(healthy=False, cooldown=False) for _ in range(5000)]
    assert delays[-1] == POLICY.max
    assert max(delays) == POLICY.max
    assert backoff.attempt == 5000
