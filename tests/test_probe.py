"""The liveness probe's clock when subscribers hear each other's probes (one etcd watch range).

A simulated fleet on a simulated clock: every probe reaches every subscriber a fixed
latency after it is sent. No server is involved; the backends' own tests probe for real.
"""

from __future__ import annotations

import heapq
import random

import pytest

from pulp_pubsub.backends.listener.upkeep import Probe

INTERVAL = 1.0


def probes_per_interval(fleet: int, latency: float, intervals: int = 30) -> float:
    """How many probes the fleet sends per interval, once started, between them."""
    random.seed(fleet)
    clocks = [Probe(INTERVAL, timeout=INTERVAL) for _ in range(fleet)]
    for clock in clocks:
        # Started together, as a fleet that subscribed at once: the first probes are
        # spread as a subscriber's own start spreads them.
        clock.next = random.uniform(0.0, INTERVAL)
    arriving: list[tuple[float, int, str]] = []
    now, sent, counted_from = 0.0, 0, 2 * INTERVAL
    while now < intervals * INTERVAL:
        due = min((c.next, i) for i, c in enumerate(clocks) if c.token is None)
        if arriving and arriving[0][0] <= due[0]:
            now, sender, token = heapq.heappop(arriving)
            for clock in clocks:
                clock.heard(now)
            assert clocks[sender].answered(token) is not None
            continue
        now, i = due
        token = clocks[i].send(now)
        heapq.heappush(arriving, (now + latency, i, token))
        if now >= counted_from:
            sent += 1
    return sent / (intervals - counted_from / INTERVAL)


def test_a_subscriber_probes_within_one_interval_of_its_last_probe_or_traffic_heard():
    # The bound every backend keeps: a connection is proved alive at least once per
    # probe_interval, by traffic heard or by its own probe.
    random.seed(1)
    for _ in range(1000):
        clock = Probe(INTERVAL, timeout=INTERVAL)
        clock.next = 0.0
        clock.heard(5.0)
        assert 5.0 + 0.8 * INTERVAL <= clock.next <= 5.0 + INTERVAL
        sent = clock.next
        token = clock.send(sent)
        assert clock.answered(token) is not None
        assert sent + 0.8 * INTERVAL <= clock.next <= sent + INTERVAL


@pytest.mark.parametrize("latency", [0.001, 0.01])
def test_a_fleet_that_hears_each_others_probes_sends_about_one_per_interval_whatever_its_size(
    latency,
):
    # A probe takes `latency` to reach the others; every subscriber whose own timer runs
    # out meanwhile probes too. Timers spread evenly over the last fifth of the interval
    # made that N * latency / (0.2 * interval) probes: 100 per interval at 2,000
    # subscribers and 1% latency, against 5 at 100. Most timers fall late and the first
    # few far apart, so the count stays small as the fleet grows.
    small, large = probes_per_interval(100, latency), probes_per_interval(2000, latency)
    assert 0.9 <= small <= 3.0, small
    assert 0.9 <= large <= 3.0, large
