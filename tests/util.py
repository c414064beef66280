from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], object], timeout: float = 10, what: str = "") -> None:
    """Wait for a state that no descriptor signals (a counter, a server coming up).

    Raises AssertionError on timeout, so a test can never pass by waiting.
    """
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        pause.wait(0.01)


def dispatch_until(sub: Any, predicate: Callable[[], object], timeout: float = 15) -> None:
    """Dispatch until ``predicate()`` holds; fail (never pass) on timeout.

    It waits as Pulp's worker does, in select() on ``fileno()``, so the suite runs the
    owner's read path (the owner reads the connection in dispatch()).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not delivered within {timeout} s")
        select.select([sub.fileno()], [], [], left)
        sub.dispatch()


def inbox(sub: Any, channel: str) -> list[Any]:
    """Subscribe ``sub`` to ``channel``; the list its messages are appended to."""
    got: list[Any] = []
    sub.subscribe(channel, got.append)
    return got


def plain(messages: list[Any]) -> list[str]:
    """The payloads of the messages that are not resyncs."""
    return [m.payload for m in messages if not m.resync]


def senders_of(backend: Any) -> set[int]:
    """The threads that will send the backend's after-commit batches, filled as they do."""
    sent_from: set[int] = set()
    real = backend.send_batch

    def spy(batch: Any) -> None:
        sent_from.add(threading.get_ident())
        real(batch)

    backend.send_batch = spy
    return sent_from
