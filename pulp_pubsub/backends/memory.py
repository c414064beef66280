"""An in-process backend for unit tests and single-process development.

It has a real listener thread, real queues and a real descriptor per
connection, so code tested on it runs the same machinery as on a server.
It mirrors PostgreSQL's payload rules (the default backend), so a payload
that passes here passes there. :func:`drop_connections` and
:func:`set_server_down` let tests break the "server" on purpose.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Collection

from ..exceptions import ConnectionLost
from .base import BaseBackend, Transport
from .selfpipe import close_fds, drain, make_pipe, poke


class _Hub:
    """The "server": which transports listen on which wire channel."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.listeners: dict[str, set[MemoryTransport]] = {}
        self.transports: set[MemoryTransport] = set()
        self.down = False


_hub = _Hub()


def drop_connections() -> int:
    """Break every open subscriber connection, as a server restart would."""
    with _hub.lock:
        victims = list(_hub.transports)
    for transport in victims:
        transport.kill()
    return len(victims)


def set_server_down(down: bool) -> None:
    """While down, connecting and publishing fail; existing connections drop."""
    _hub.down = down
    if down:
        drop_connections()


class MemoryTransport(Transport):
    def __init__(self, backend: BaseBackend) -> None:
        super().__init__(backend)
        self._inbox: deque[tuple[str, str]] = deque()
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

    def read(self) -> list[tuple[str, str]]:
        drain(self._read_fd)
        if self._dead:
            raise ConnectionLost("the memory server dropped this connection")
        items = []
        while self._inbox:
            items.append(self._inbox.popleft())
        return items

    def push(self, channel: str, payload: str) -> None:
        self._inbox.append((channel, payload))
        self._wake()

    def kill(self) -> None:
        self._dead = True
        self._wake()

    def _wake(self) -> None:
        poke(self._write_fd)

    def close(self) -> None:
        with _hub.lock:
            _hub.transports.discard(self)
            for listeners in _hub.listeners.values():
                listeners.discard(self)
        close_fds(self._read_fd, self._write_fd)


class MemoryBackend(BaseBackend):
    name = "memory"
    payload_limit = 7999
    allows_nul = False

    def send(self, channel: str, payload: str) -> None:
        if _hub.down:
            raise ConnectionLost("the memory server is down")
        with _hub.lock:
            targets = list(_hub.listeners.get(channel, ()))
        for transport in targets:
            transport.push(channel, payload)

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
