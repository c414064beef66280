"""The messages a subscriber has received and its owner has not yet dispatched.

The queue is bounded, and fair when full: the channel holding the most waiting messages
pays for a new one, so a flood on one channel (its handler stuck, say) cannot crowd out the
others, and every channel that lost a message gets a resync instead. Identical messages
waiting on one channel are folded into one (wake-ups are idempotent). A pipe is readable
exactly while messages wait, which is what the owner's ``select()`` watches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any

from ...message import Message
from ...metrics import count
from ..selfpipe import drain, make_pipe, poke, wait_readable

if TYPE_CHECKING:
    from collections.abc import Callable

    from .targeted import Targeted

# The listener's one logger, whichever of its modules writes.
logger = logging.getLogger(__package__)

#: (channel, payload, resync, token): a targeted message has a token of its own, so it is
#: never folded into another.
Key = tuple[str, str, bool, str | None]


class Pending:
    def __init__(
        self,
        lock: threading.RLock,
        callbacks: dict[str, list[Callable[[Message], Any]]],
        closed: threading.Event,
        stats: Counter[str],
        backend_name: str,
        max_pending: int,
    ) -> None:
        # The subscriber's lock and callbacks: a message is queued only for a channel
        # that has callbacks at that moment.
        self._lock, self._callbacks, self._closed = lock, callbacks, closed
        self._stats, self._name, self._max = stats, backend_name, max_pending
        self._pending: OrderedDict[Key, Message] = OrderedDict()
        # Channel -> when its first message was dropped from the full queue.
        self._overflowed: dict[str, float] = {}
        # How many of the pending messages each channel holds, to know who floods.
        self._queued: Counter[str] = Counter()
        self._signalled = False
        #: The thread reading for the owner, which dispatches what it queues right after:
        #: its messages need no signal (a write now and a read later, for nothing).
        self.quiet_for: int | None = None
        self.signal_r, self.signal_w = make_pipe()

    def waiting(self) -> bool:
        with self._lock:
            return bool(self._pending or self._overflowed)

    def put(self, message: Message, token: str | None = None) -> bool:
        """Queue ``message`` for dispatch; False when it was not queued."""
        key = (message.channel, message.payload, message.resync, token)
        with self._lock:
            if self._closed.is_set() or message.channel not in self._callbacks:
                return False
            if token is not None and len(self._pending) >= self._max:
                return False  # never dropped: given back, for another member
            if key in self._pending:
                # Wake-ups are idempotent: an identical message already
                # waiting carries the same news.
                count(self._stats, "folded", self._name, message.channel)
            elif len(self._pending) >= self._max:
                # Full. The channel holding the most waiting messages pays, so a flood on
                # one channel (its handler stuck, say) cannot crowd out the others.
                [(hog, held)] = self._queued.most_common(1)
                victim = next((k for k in self._pending if k[0] == hog and k[3] is None), None)
                if victim is not None and held > self._queued[message.channel]:
                    del self._pending[victim]
                    self._queued[hog] -= 1
                    self._drop(hog)
                    self._pending[key] = message
                    self._queued[message.channel] += 1
                    count(self._stats, "received", self._name, message.channel)
                else:
                    self._drop(message.channel)
            else:
                self._pending[key] = message
                self._queued[message.channel] += 1
                count(self._stats, "received", self._name, message.channel)
            if not self._signalled and self.quiet_for != threading.get_ident():
                self.signal()
        return True

    def signal(self) -> None:
        """Make the signal pipe readable: dispatch() has something to do."""
        with self._lock:
            self._signalled = True
            poke(self.signal_w)

    def forget(self, channel: str) -> None:
        """Unsubscribed: what waits on ``channel`` will not be dispatched (lock held)."""
        for key in [key for key in self._pending if key[0] == channel]:
            del self._pending[key]
        self._queued.pop(channel, None)
        self._overflowed.pop(channel, None)

    def dispatch(self, timeout: float | None, targeted: Targeted) -> int:
        """Run the callbacks of waiting messages in the calling thread; see Subscriber.dispatch."""
        if timeout != 0 and not self.waiting():
            wait_readable([self.signal_r], timeout)
        batch = self._take()
        settled = False
        for message, token in batch:
            handed = None
            with self._lock:
                callbacks = list(self._callbacks.get(message.channel, ()))
                if token is not None:
                    handed, gave_back = targeted.claim(message.channel, token)
                    if handed is None:
                        settled = settled or gave_back
                        continue
            for callback in callbacks:
                try:
                    callback(message)
                except Exception as exc:
                    count(self._stats, "handler_errors", self._name, message.channel, error=exc)
                    logger.exception(
                        "Handler %r failed on channel %r; the listener goes on.",
                        callback,
                        message.channel,
                    )
            count(self._stats, "delivered", self._name, message.channel)
            if handed is not None and targeted.done(handed):
                settled = True
        if settled:
            targeted.wake()
        return len(batch)

    def _drop(self, channel: str) -> None:
        """Count a message of ``channel`` dropped; it gets a resync instead (lock held)."""
        count(self._stats, "dropped", self._name, channel)
        if channel not in self._overflowed:
            logger.warning(
                "Subscriber queue full (%d waiting): dropping messages on %r "
                "and queueing a resync for it.",
                len(self._pending),
                channel,
            )
        self._overflowed.setdefault(channel, time.time())

    def _take(self) -> list[tuple[Message, str | None]]:
        with self._lock:
            batch = [(message, key[3]) for key, message in self._pending.items()]
            self._pending.clear()
            self._queued.clear()
            if self._overflowed:
                for channel, since in sorted(self._overflowed.items()):
                    if not any(m.channel == channel and m.resync for m, _ in batch):
                        batch.append((Message(channel, "", resync=True, since=since), None))
                        count(self._stats, "resyncs", self._name, channel)
                self._overflowed.clear()
            if self._signalled:
                drain(self.signal_r)
                self._signalled = False
        return batch
