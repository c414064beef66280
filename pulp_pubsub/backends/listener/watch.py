"""The owner's descriptor: readable while messages wait, or while the transport has data.

A message that reaches a subscriber whose owner waits in ``select()`` should wake one thread,
the owner's, as the bare client's message does, not the listener thread and then the owner
through the signal pipe. So the descriptor an attached owner gets from ``fileno()`` is an
epoll set (level-triggered) of the pending queue's signal pipe and the current transport's
descriptors, which the listener keeps in step as transports come and go; the owner's
``dispatch()`` then reads the transport itself (:mod:`.reader`).

Only where ``select.epoll`` exists (Linux); elsewhere the owner gets the signal pipe, and the
listener thread reads as it always did.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Iterable

AVAILABLE = hasattr(select, "epoll")


class Watch:
    def __init__(self, signal_r: int) -> None:
        self._epoll = select.epoll()
        self.fd = self._epoll.fileno()
        self._signal_r = signal_r
        try:
            self._epoll.register(signal_r, select.EPOLLIN)
        except OSError:
            self._epoll.close()  # not left for the collector to find
            raise
        self._lock = threading.Lock()
        #: The transport descriptors in the set now; the owner looks at them before it reads.
        self.fds: tuple[int, ...] = ()
        #: The owner waits in select() on ``fd`` and reads the transport in dispatch().
        self.active = False
        #: Set once the listener has put the transport's descriptors in (or has none).
        self.synced = threading.Event()

    def sync(self, fds: Iterable[int], ready: bool = False) -> None:
        """Make the transport descriptors in the set ``fds`` (none while not active).

        ``ready``: the listener took the owner's attach() poke in this turn, so the owner
        may count on the set from now on.
        """
        wanted = tuple(dict.fromkeys(fds)) if self.active else ()
        with self._lock:
            if wanted != self.fds:
                for fd in set(self.fds) - set(wanted):
                    try:
                        self._epoll.unregister(fd)
                    except OSError:
                        pass  # already closed, which took it out of the set
                for fd in set(wanted) - set(self.fds):
                    try:
                        self._epoll.register(fd, select.EPOLLIN)
                    except FileExistsError:
                        self._epoll.modify(fd, select.EPOLLIN)
                self.fds = wanted
            if self.active and ready:
                self.synced.set()

    def transport_ready(self) -> bool:
        """Whether a transport descriptor of the set is readable now (or hung up).

        One look at the set the owner's select() woke on, without waiting: the
        signal pipe's readiness does not count, the set's other members do.
        """
        if not self.fds:
            return False
        try:
            ready = self._epoll.poll(0)
        except (OSError, ValueError):
            return False  # closed meanwhile: the subscriber is closing
        signal_r = self._signal_r
        return any(fd != signal_r for fd, _ in ready)

    def close(self) -> None:
        """This process's end only: after fork() the parent's set lives on."""
        self._epoll.close()
