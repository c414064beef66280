"""An in-process backend for unit tests and single-process development.

It has a real listener thread, real queues and a real descriptor per
connection, so code tested on it runs the same machinery as on a server.
It mirrors PostgreSQL's payload rules (the default backend), so a payload
that passes here passes there. :func:`drop_connections` and
:func:`set_server_down` let tests break the "server" on purpose.

Targeted delivery works as on Redis: each (channel, group) is a queue that
exists from the first member's join; a message goes to one member that is
taking messages, the least recently served first, and comes back to the
queue when it is released or not acknowledged within ``claim_timeout``.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from ..exceptions import ConnectionLost
from .base import BaseBackend, Handed, Transport
from .selfpipe import close_fds, drain, make_pipe, poke

Pair = tuple[str, str]


@dataclass
class _Queue:
    """One group's queue: waiting (token, payload) and what is handed out, by token."""

    waiting: deque[tuple[str, str]] = field(default_factory=deque)
    handed: dict[str, tuple[MemoryTransport, str, threading.Timer]] = field(default_factory=dict)


class _Hub:
    """The "server": which transports listen on which wire channel."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.listeners: dict[str, set[MemoryTransport]] = {}
        self.transports: set[MemoryTransport] = set()
        self.queues: dict[Pair, _Queue] = {}
        self.tokens = itertools.count(1)
        self.down = False

    def pump(self, pair: Pair) -> None:
        """Hand waiting messages of ``pair`` to members taking them (lock held)."""
        queue = self.queues.get(pair)
        while queue is not None and queue.waiting:
            takers = [t for t in self.transports if pair in t.taking]
            if not takers:
                return
            member = min(takers, key=lambda t: t.served)
            token, payload = queue.waiting.popleft()
            member.taking, member.served = frozenset(), next(self.tokens)
            timer = threading.Timer(member.claim_timeout, self.expire, (pair, token))
            timer.daemon = True
            timer.start()
            queue.handed[token] = (member, payload, timer)
            member.push(Handed(pair[0], pair[1], payload, token))

    def expire(self, pair: Pair, token: str) -> None:
        """Not acknowledged in time: back to the head of the queue."""
        with self.lock:
            self.requeue(pair, token)

    def requeue(self, pair: Pair, token: str) -> None:
        queue = self.queues.get(pair)
        if queue is not None and token in queue.handed:
            _, payload, timer = queue.handed.pop(token)
            timer.cancel()
            queue.waiting.appendleft((token, payload))
            self.pump(pair)


_hub = _Hub()


def drop_connections() -> int:
    """Break every open subscriber connection, as a server restart would."""
    with _hub.lock:
        victims = list(_hub.transports)
    for transport in victims:
        transport.kill()
    return len(victims)


def forget_queues() -> None:
    """Empty every targeted-delivery queue, as a fresh server would be (test isolation)."""
    with _hub.lock:
        for queue in _hub.queues.values():
            for _, _, timer in queue.handed.values():
                timer.cancel()
        _hub.queues.clear()


def set_server_down(down: bool) -> None:
    """While down, connecting and publishing fail; existing connections drop."""
    _hub.down = down
    if down:
        drop_connections()


class MemoryTransport(Transport):
    def __init__(self, backend: BaseBackend) -> None:
        super().__init__(backend)
        self._inbox: deque[tuple[str, str] | Handed] = deque()
        self.taking: frozenset[Pair] = frozenset()
        self.served = 0
        self.claim_timeout = float(backend.config["claim_timeout"])
        self._dead = False
        self._read_fd, self._write_fd = make_pipe()
        with _hub.lock:
            _hub.transports.add(self)

    def fileno(self) -> int:
        return self._read_fd

    def listen(self, channels: Collection[str]) -> None:
        with _hub.lock:
            for channel in channels:
                _hub.listeners.setdefault(channel, set()).add(self)

    def unlisten(self, channels: Collection[str]) -> None:
        with _hub.lock:
            for channel in channels:
                _hub.listeners.get(channel, set()).discard(self)

    def join(self, members: Collection[Pair]) -> None:
        with _hub.lock:
            for pair in members:
                _hub.queues.setdefault(pair, _Queue())

    def want(self, members: frozenset[Pair], consumer: str) -> None:
        with _hub.lock:
            if members == self.taking or self._dead:
                return
            self.taking = members
            for pair in members:
                _hub.pump(pair)

    def ack(self, handed: Collection[Handed]) -> None:
        with _hub.lock:
            for item in handed:
                queue = _hub.queues.get((item.wire, item.group))
                entry = queue.handed.pop(item.token, None) if queue else None
                if entry is not None:
                    entry[2].cancel()

    def release(self, handed: Collection[Handed]) -> None:
        with _hub.lock:
            for item in handed:
                _hub.requeue((item.wire, item.group), item.token)

    def read(self) -> list[tuple[str, str] | Handed]:
        drain(self._read_fd)
        if self._dead:
            raise ConnectionLost("the memory server dropped this connection")
        items = []
        while self._inbox:
            items.append(self._inbox.popleft())
        return items

    def push(self, item: tuple[str, str] | Handed) -> None:
        self._inbox.append(item)
        self._wake()

    def kill(self) -> None:
        self._dead = True
        self.taking = frozenset()
        self._wake()

    def _wake(self) -> None:
        poke(self._write_fd)

    def close(self) -> None:
        with _hub.lock:
            _hub.transports.discard(self)
            self.taking = frozenset()
            for listeners in _hub.listeners.values():
                listeners.discard(self)
        close_fds(self._read_fd, self._write_fd)


class MemoryBackend(BaseBackend):
    name = "memory"
    payload_limit = 7999
    allows_nul = False
    targets = True
    # Sending is an append to an in-process queue: a thread would only cost a
    # hand-over, and tests see a deferred publish (or its failure) at commit.
    after_commit_thread = False

    def send(self, channel: str, payload: str) -> None:
        if _hub.down:
            raise ConnectionLost("the memory server is down")
        with _hub.lock:
            targets = list(_hub.listeners.get(channel, ()))
        for transport in targets:
            transport.push((channel, payload))

    def send_targeted(self, channel: str, payload: str, group: str, receivers: int) -> None:
        if _hub.down:
            raise ConnectionLost("the memory server is down")
        pair = (channel, group)
        with _hub.lock:
            queue = _hub.queues.get(pair)
            if queue is None:
                return  # no member ever joined: like a broadcast nobody hears
            for _ in range(receivers):
                queue.waiting.append((str(next(_hub.tokens)), payload))
            _hub.pump(pair)

    def open_transport(self) -> MemoryTransport:
        if _hub.down:
            raise ConnectionLost("the memory server is down")
        return MemoryTransport(self)

    def subscriber_counts(self, channels: Collection[str]) -> dict[str, int]:
        with _hub.lock:
            return {
                channel: len(_hub.listeners.get(self.channel_prefix + channel, ()))
                for channel in channels
            }
