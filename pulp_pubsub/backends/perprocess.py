"""What a process may use of the objects it holds, across ``fork()``.

Pulp forks task processes and gunicorn forks its workers, and a child
inherits every connection, thread-backed sender and lock its parent had
made. It must use none of them (a socket shared by two processes mixes their
traffic) and close none of them either, nor let the garbage collector
finalise them: both would shut the parent's connection too. So a child makes
its own on first use and keeps the parent's, untouched, for its lifetime.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Origin:
    """The process an object was made in: only there may it be used or closed."""

    __slots__ = ("pid",)

    def __init__(self) -> None:
        self.pid = os.getpid()

    def here(self) -> bool:
        return self.pid == os.getpid()


class PerProcess(Generic[T]):
    """This process's ``T``, made by ``factory`` on first use and again in a forked child.

    ``get()`` costs one ``getpid()`` once the object exists, with no lock, so it
    can sit on a publish path; making one takes the lock, so threads racing
    for the first use in a process make a single object. ``close()`` closes
    only an object this process made. Without a factory it holds what ``set()``
    gives it, which a forked child does not see.
    """

    __slots__ = ("__weakref__", "_close", "_factory", "_inherited", "_lock", "_slot")

    def __init__(
        self,
        factory: Callable[[], T] | None = None,
        close: Callable[[T], object] | None = None,
    ) -> None:
        self._factory = factory
        self._close = close
        # (pid, object) in one attribute: a reader never pairs one process's pid with
        # another's object.
        self._slot: tuple[int, T] | None = None
        self._lock = threading.Lock()
        # Made before a fork() by the parent: kept so that nothing here finalises them.
        self._inherited: list[T] = []
        _holders.add(self)

    def get(self) -> T:
        slot = self._slot
        if slot is not None and slot[0] == os.getpid():
            return slot[1]
        if self._factory is None:
            raise LookupError("this PerProcess has no factory and nothing set in this process")
        with self._lock:
            slot = self._slot
            pid = os.getpid()
            if slot is None or slot[0] != pid:
                made = self._factory()
                self._keep_inherited(slot)
                slot = self._slot = (pid, made)
            return slot[1]

    def peek(self) -> T | None:
        """This process's object, or None when it has none (nothing is made)."""
        slot = self._slot
        return slot[1] if slot is not None and slot[0] == os.getpid() else None

    def set(self, value: T | None) -> None:
        """Hold ``value`` as this process's object (None: hold nothing); nothing is closed."""
        with self._lock:
            self._keep_inherited(self._slot)
            self._slot = None if value is None else (os.getpid(), value)

    def close(self) -> None:
        """Forget the object; close it when this process made it."""
        with self._lock:
            slot, self._slot = self._slot, None
            if slot is None or self._keep_inherited(slot):
                return
        if self._close is not None:
            self._close(slot[1])

    def _keep_inherited(self, slot: tuple[int, T] | None) -> bool:
        if slot is not None and slot[0] != os.getpid():
            self._inherited.append(slot[1])
            return True
        return False

    def _after_fork_in_child(self) -> None:
        # A parent thread may have held the lock at fork(): the child's copy would stay held.
        self._lock = threading.Lock()


_holders: weakref.WeakSet[PerProcess[Any]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for holder in list(_holders):
        holder._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
