"""The listener's replay path, on a memory backend that keeps history.

etcd (revisions) and NATS JetStream (sequences) hand a reconnecting
subscriber what it missed. Their own tests run against real servers; these
pin down what the shared listener does with a transport that replays: no
resync when the gap is replayed, a resync when the history is gone.
"""

from __future__ import annotations

import threading

import pytest
from django.test import override_settings

from pulp_pubsub import Message, get_backend
from pulp_pubsub.backends import memory
from pulp_pubsub.backends.memory import MemoryBackend, MemoryTransport

from .util import dispatch_until


class _History:
    """Every message the "server" was given, numbered, oldest first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.log: list[tuple[int, str, str]] = []
        self.next = 1
        # While set, messages are kept but not pushed live: a partition
        # that the subscriber notices only when its connection drops.
        self.partitioned = False

    def add(self, channel: str, payload: str) -> int:
        with self.lock:
            seq = self.next
            self.next += 1
            self.log.append((seq, channel, payload))
            return seq

    def after(self, position: int, channels: set[str]) -> tuple[bool, list[tuple[int, str, str]]]:
        """(still reaches back to position, the entries after it on channels)."""
        with self.lock:
            oldest = self.log[0][0] if self.log else self.next
            entries = [e for e in self.log if e[0] > position and e[1] in channels]
            return oldest <= position + 1, entries

    def compact(self) -> None:
        with self.lock:
            self.log.clear()


history = _History()


class ReplayingTransport(MemoryTransport):
    def __init__(self, backend: MemoryBackend) -> None:
        super().__init__(backend)
        self._position: int | None = None
        self._resume_from: int | None = None
        self._gone: list[str] = []
        # The newest entry the "server" has pushed to this connection.
        self.seen: int | None = None

    def listen(self, channels):
        super().listen(channels)
        if self._resume_from is None:
            return
        complete, entries = history.after(self._resume_from, set(channels))
        if not complete:
            self._gone.extend(channels)
            return
        for seq, channel, payload in entries:
            self._inbox.append((channel, payload))
            self._position = seq

    def read(self):
        items: list[tuple[str, str | None]] = list(super().read())
        items.extend((wire, None) for wire in self._gone)
        self._gone.clear()
        if self.seen is not None:
            self._position = max(self._position or 0, self.seen)
        return items

    def position(self):
        return self._position

    def resume(self, position) -> bool:
        self._resume_from = position
        return True


class ReplayingBackend(MemoryBackend):
    name = "memory"

    def send(self, channel: str, payload: str) -> None:
        seq = history.add(channel, payload)
        if history.partitioned:
            return
        with memory._hub.lock:
            live = [t for t in memory._hub.transports if isinstance(t, ReplayingTransport)]
        for transport in live:
            transport.seen = seq
        super().send(channel, payload)

    def open_transport(self) -> ReplayingTransport:
        return ReplayingTransport(self)


SETTINGS = {
    "PUBSUB_BACKEND": f"{__name__}.ReplayingBackend",
    "PUBSUB_URL": None,
    "PUBSUB_CHANNEL_PREFIX": "",
    "PUBSUB_OPTIONS": {},
}


@pytest.fixture
def sub():
    history.compact()
    history.partitioned = False
    with override_settings(**SETTINGS):
        with get_backend().subscriber() as subscriber:
            yield subscriber


def _gap(sub, got: list[Message]) -> None:
    """Deliver one message, then publish two that only the history holds, then reconnect."""
    backend = get_backend()
    sub.subscribe("jobs", got.append)
    backend.publish("jobs", "before")
    dispatch_until(sub, lambda: len(got) == 1)
    history.partitioned = True
    backend.publish("jobs", "gap-1")
    backend.publish("jobs", "gap-2")
    history.partitioned = False
    memory.drop_connections()
    # The owner waits on fileno() (dispatch_until above): its read meets the dead connection
    # (a memory one is a pipe, no socket that hangs up), and the listener reconnects.
    dispatch_until(sub, lambda: sub.stats["reconnects"] == 1)


def test_a_replayed_gap_is_delivered_in_order_without_a_resync(sub):
    got: list[Message] = []
    _gap(sub, got)
    dispatch_until(sub, lambda: len(got) == 3)
    assert [(m.payload, m.resync) for m in got] == [
        ("before", False),
        ("gap-1", False),
        ("gap-2", False),
    ]
    assert sub.stats["replays"] == 1
    assert sub.stats["resyncs"] == 0


def test_a_compacted_gap_resyncs_instead_of_going_silent(sub):
    got: list[Message] = []
    backend = get_backend()
    sub.subscribe("jobs", got.append)
    backend.publish("jobs", "before")
    dispatch_until(sub, lambda: len(got) == 1)
    history.partitioned = True
    backend.publish("jobs", "lost")
    history.compact()
    history.add("jobs", "after-compaction")  # the history now starts past the gap
    history.partitioned = False
    memory.drop_connections()
    dispatch_until(sub, lambda: any(m.resync for m in got))
    assert [m.payload for m in got if not m.resync] == ["before"]
    assert [m.channel for m in got if m.resync] == ["jobs"]
    assert sub.stats["resyncs"] == 1
