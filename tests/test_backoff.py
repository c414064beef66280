"""The reconnect schedule that subscribers and the relay's PostgreSQL link share."""

from __future__ import annotations

from pulp_pubsub.backends.listener.upkeep import Backoff


def test_reconnect_waits_double_up_to_the_cap_with_jitter_however_long_the_outage():
    """An outage of thousands of attempts (hours at a 5 s cap) keeps the capped schedule:
    the exponent must not grow until its float conversion overflows and kills the thread."""
    backoff = Backoff(0.1, 5.0)
    delays = [backoff.delay() for _ in range(5000)]
    for attempt, delay in enumerate(delays):
        base = min(5.0, 0.1 * 2.0 ** min(attempt, 6))
        assert base * 0.5 <= delay <= base, (attempt, delay)
    # Jittered, so a fleet that lost its server together does not come back in step.
    assert len(set(delays[-50:])) > 1
    backoff.reset()
    assert 0.05 <= backoff.delay() <= 0.1
