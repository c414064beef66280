"""What keeping a listening connection up takes, in the pieces its two keepers share.

A subscriber's loop (:mod:`.loop`) and the relay server's PostgreSQL link
(:mod:`pulp_pubsub.relay.pglink`) each hold one connection that must come back after a
failure without hammering a struggling server, LISTEN to exactly what is wanted, and prove
now and then that it still carries messages. What they do with what they read differs, so
these pieces are shared and the loops are not.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from ..selfpipe import drain, wait_readable

#: How strongly a probe's time after traffic heard leans late (see :meth:`Probe.heard`):
#: one probe per interval for fleets of up to about e ** 10, 22,000 subscribers.
LATE_BIAS = 10.0


class Listens(Protocol):
    def listen(self, channels: list[str]) -> None: ...

    def unlisten(self, channels: list[str]) -> None: ...


class Timer(Protocol):
    """Something a waiting loop must do on time meanwhile."""

    def left(self) -> float: ...

    def tick(self) -> None: ...


class Backoff:
    """Capped exponential backoff with jitter.

    The jitter keeps a fleet that lost its server together from coming back in step; the
    cap bounds how long a recovered server waits to be noticed.
    """

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.attempt = 0

    def reset(self) -> None:
        self.attempt = 0

    def delay(self) -> float:
        """The next wait: doubling from ``low`` up to ``high``, then drawn from its upper half."""
        base = self.low * 2**self.attempt
        if base < self.high:
            # Not past the cap: an outage of thousands of attempts must not grow the
            # exponent until the float conversion overflows and kills the thread.
            self.attempt += 1
        return min(self.high, base) * random.uniform(0.5, 1.0)

    def wait(
        self,
        stopped: threading.Event,
        wake_fd: int,
        on_wake: Callable[[], None],
        timer: Timer | None = None,
    ) -> None:
        """Sleep out the next delay unless ``stopped``; ``on_wake()`` whenever ``wake_fd`` is poked.

        The owner's requests keep being answered meanwhile, so nobody waits out the delay;
        so is ``timer``, whose ``tick()`` runs whenever its ``left()`` runs out.
        """
        deadline = time.monotonic() + self.delay()
        while not stopped.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            due = timer.left() if timer is not None else left
            if wait_readable([wake_fd], min(left, due)):
                drain(wake_fd)
                on_wake()
            if timer is not None and timer.left() <= 0:
                timer.tick()


def listen_to(transport: Listens, listening: set[str], wanted: set[str]) -> bool:
    """LISTEN and UNLISTEN so that ``listening`` becomes ``wanted``; True when it LISTENed."""
    added = wanted - listening
    if added:
        transport.listen(sorted(added))
    if listening - wanted:
        transport.unlisten(sorted(listening - wanted))
    listening.clear()
    listening.update(wanted)
    return bool(added)


class Probe:
    """The clock of a liveness probe: tokens at most ``interval`` apart, each due back in time.

    Sending and reading are the owner's: this only says when, and whether it came back.
    """

    def __init__(self, interval: float, timeout: float) -> None:
        self.interval, self.timeout = interval, timeout
        self.token: str | None = None
        self.sent_at = self.deadline = self.answered_at = 0.0
        self.next = time.monotonic() + interval
        late = math.log1p(random.random() * math.expm1(LATE_BIAS)) / LATE_BIAS
        self._quiet = interval * (0.8 + 0.2 * late)

    def due(self) -> float:
        """When the owner must look again: the deadline of the probe out, or the next one's time."""
        return self.deadline if self.token else self.next

    def hurry(self, now: float) -> None:
        """Make the next probe due at ``now``: whether the connection is alive must be known."""
        self.next = now

    def heard(self, at: float) -> None:
        """The connection brought the server's traffic at ``at``: it is alive, no probe needed.

        The next probe moves to this subscriber's own point between 0.8 and 1 interval
        after it (after its own probe too), so that subscribers hearing the same traffic
        (each other's probes on one etcd watch range) do not all probe at once: the first
        to probe keeps the others quiet, but only those whose turn comes later than its
        probe takes to reach them. Points spread evenly, a fleet of N would send about
        N * latency / (0.2 * interval) probes each time; drawn so that most fall late and
        the earliest few far apart (a rising exponential), it sends about one, however
        large it grows (up to about e ** LATE_BIAS subscribers). The point is drawn once:
        drawn anew at each traffic heard, the latest of several draws would win, and the
        fleet's points would crowd together at the interval's end.
        """
        if self.token is None:
            self.next = max(self.next, at + self._quiet)

    def is_due(self, now: float) -> bool:
        """No probe is out and the next one's time has come."""
        return self.token is None and now >= self.next

    def send(self, now: float) -> str:
        """The token of a probe the owner sends now."""
        self.token = uuid.uuid4().hex
        self.sent_at, self.deadline, self.next = now, now + self.timeout, now + self._quiet
        return self.token

    def answered(self, payload: str) -> float | None:
        """The seconds it took when ``payload`` is the token out (it is then settled), else None."""
        if self.token is None or payload != self.token:
            return None
        self.answered_at = time.monotonic()
        self.token = None
        return self.answered_at - self.sent_at

    def overdue(self, now: float) -> bool:
        return self.token is not None and now >= self.deadline
