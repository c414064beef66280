"""Degraded mode: while a subscriber cannot reach its server, its owner still looks for work.

Wake-ups are advisory and the owner's database is the truth, so an outage of the
wake-up server must slow a fleet down, not stop it. From ``outage_interval`` seconds
into an outage (jittered, so a fleet that lost its server together does not look in
step) the subscriber delivers a resync on each of its channels, and again every
interval, until its connection is back; Pulp's worker answers a resync by looking for
work and at its task's cancel. Entering and leaving the mode is a WARNING each, so an
operator sees how long the fleet ran on it.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable

from ...metrics import count

logger = logging.getLogger(__package__)


class Degraded:
    def __init__(
        self,
        backend_name: str,
        interval: float,
        stats: Counter[str],
        resync_all: Callable[[], int],
    ) -> None:
        self.backend_name = backend_name
        #: Seconds between the resyncs of an outage; 0 turns degraded mode off.
        self.interval = interval
        self.stats = stats
        #: Queues a resync on every channel; returns how many.
        self.resync_all = resync_all
        #: When (time.time()) the current outage's first periodic resync went out.
        self.since: float | None = None
        self._next: float | None = None  # time.monotonic() of the next resyncs

    def begin(self) -> None:
        """The connection is lost: the first resyncs come one interval from now."""
        if self.interval and self._next is None:
            self._next = time.monotonic() + self._jittered()

    def left(self) -> float:
        """Seconds until :meth:`tick` is due (inf when no outage is running)."""
        return math.inf if self._next is None else max(0.0, self._next - time.monotonic())

    def tick(self) -> None:
        """If due: a resync on every channel, and the next ones scheduled."""
        if self._next is None or time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self._jittered()
        channels = self.resync_all()
        if self.since is None:
            self.since = time.time()
            count(self.stats, "degraded", self.backend_name)
            logger.warning(
                "Pub/sub %s subscriber is degraded: its server is unreachable, so it delivers "
                "a resync on each of its %d channel(s) every %g s until the server is back.",
                self.backend_name,
                channels,
                self.interval,
            )

    def end(self) -> None:
        """The connection is back (and hears): push delivery again."""
        self._next = None
        if self.since is not None:
            logger.warning(
                "Pub/sub %s subscriber is no longer degraded: push delivery is back after "
                "%.1f s of periodic resyncs.",
                self.backend_name,
                time.time() - self.since,
            )
            self.since = None

    def _jittered(self) -> float:
        return self.interval * random.uniform(0.75, 1.0)
