"""Publishes deferred to commit, sent from a thread of their own.

A publish inside ``atomic()`` is sent when the transaction commits; by then
its failure can no longer reach the caller, so nothing is gained by making
the committing thread wait for the server. A backend that can send several
messages in one round trip (Redis: a pipeline) hands them to an
:class:`AfterCommitSender`, which sends what has gathered while the previous
batch was on the wire, in order, and logs and counts failures exactly as the
synchronous path does. When the queue is full the committing thread sends
its message itself, so a slow server slows commits down rather than losing
wake-ups.

A process that commits faster than ``send_interval`` sends at most one batch
per interval: on a small machine every round trip wakes the server, the
sender thread and the committing thread once more, and those wake-ups cost
more CPU than the messages. The first publish after a quiet spell goes out at
once, so a lone wake-up is never held back.
"""

from __future__ import annotations

import atexit
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from ..exceptions import PubSubError
from .perprocess import Origin

logger = logging.getLogger(__name__)

#: Messages waiting at most; one more is sent by the committing thread itself.
QUEUE_LIMIT = 10000
#: Messages per round trip at most.
BATCH_LIMIT = 500


#: Told how a publish sent without waiting ended: None when sent, else why it failed.
Report = Callable[[PubSubError | None], None]


class Deferred(NamedTuple):
    wire: str
    payload: str
    group: str | None
    receivers: int
    #: The caller's, from ``publish_soon()``: it logs instead of the backend.
    report: Report | None = None


class AfterCommitSender:
    """One per process (a forked child makes its own: see ``origin``).

    ``put()`` is on every committing thread's path, so it is one call into a
    C queue; the sender thread blocks in that queue's ``get()`` and then takes
    whatever else has gathered, up to :data:`BATCH_LIMIT`.
    """

    def __init__(
        self,
        send_batch: Callable[[list[Deferred]], None],
        flush_timeout: float,
        send_interval: float = 0.0,
    ) -> None:
        self._send_batch = send_batch
        self._flush_timeout = flush_timeout
        self._send_interval = send_interval
        self.origin = Origin()
        self._queue: queue.SimpleQueue[Deferred | None] = queue.SimpleQueue()
        # put() counts what it queued, the thread what it has sent (or failed);
        # flush() waits for the two to meet.
        self._queued = 0
        self._done = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pubsub-after-commit", daemon=True)
        self._thread.start()
        # A process that exits right after a commit still sends its wake-ups.
        atexit.register(self.close)

    def put(self, item: Deferred) -> bool:
        """Queue ``item``; False when full or closed (the caller then sends it itself)."""
        if self._closed or self._queued - self._done >= QUEUE_LIMIT:
            return False
        self._queued += 1  # only ever read against _done: a lost race costs nothing
        self._queue.put(item)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was sent (or failed); False on timeout."""
        target = self._queued
        with self._cond:
            return self._cond.wait_for(
                lambda: self._done >= target,
                self._flush_timeout if timeout is None else timeout,
            )

    def close(self) -> None:
        if self._closed or not self.origin.here():
            return
        if not self.flush():
            logger.error(
                "%d publish(es) deferred to commit were not sent within %.1f s of closing.",
                self._queued - self._done,
                self._flush_timeout,
            )
        self._closed = True
        self._queue.put(None)
        atexit.unregister(self.close)

    def _run(self) -> None:
        sent_at = -math.inf
        while True:
            first = self._queue.get()
            if first is None:
                return
            # Meanwhile puts find nobody waiting in get(), so they wake nobody.
            hold = sent_at + self._send_interval - time.monotonic()
            if hold > 0:
                time.sleep(hold)
            sent_at = time.monotonic()
            batch = [first]
            stop = False
            while len(batch) < BATCH_LIMIT:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._send_batch(batch)
            except Exception:
                # send_batch logs and counts its own failures; this is a bug guard.
                logger.exception("Sending %d publish(es) after commit failed", len(batch))
            finally:
                with self._cond:
                    self._done += len(batch)
                    self._cond.notify_all()
            if stop:
                return
