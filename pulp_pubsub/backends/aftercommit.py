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
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

logger = logging.getLogger(__name__)

#: Messages waiting at most; one more is sent by the committing thread itself.
QUEUE_LIMIT = 10000
#: Messages per round trip at most.
BATCH_LIMIT = 500


class Deferred(NamedTuple):
    wire: str
    payload: str
    group: str | None
    receivers: int


class AfterCommitSender:
    """One per process (a forked child makes its own, see :meth:`for_pid`)."""

    def __init__(self, send_batch: Callable[[list[Deferred]], None], flush_timeout: float) -> None:
        self._send_batch = send_batch
        self._flush_timeout = flush_timeout
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._queue: deque[Deferred] = deque()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pubsub-after-commit", daemon=True)
        self._thread.start()
        # A process that exits right after a commit still sends its wake-ups.
        atexit.register(self.close)

    def put(self, item: Deferred) -> bool:
        """Queue ``item``; False when full or closed (the caller then sends it itself)."""
        with self._cond:
            if self._closed or len(self._queue) >= QUEUE_LIMIT:
                return False
            self._queue.append(item)
            self._cond.notify()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was sent (or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._queue and not self._busy,
                self._flush_timeout if timeout is None else timeout,
            )

    def close(self) -> None:
        if self._closed or self.pid != os.getpid():
            return
        if not self.flush():
            logger.error(
                "%d publish(es) deferred to commit were not sent within %.1f s of closing.",
                len(self._queue),
                self._flush_timeout,
            )
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        atexit.unregister(self.close)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), BATCH_LIMIT))]
                self._busy = True
            try:
                self._send_batch(batch)
            except Exception:
                # send_batch logs and counts its own failures; this is a bug guard.
                logger.exception("Sending %d publish(es) after commit failed", len(batch))
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
