"""Broken subscribers on purpose: the chaos run's checker must catch what they lose.

A mutation wraps a backend's transports so that messages vanish between the server and the
listener, silently, while everything else (probes, reconnects, resyncs) keeps working. A run
with a mutation must fail and name the lost messages; the wrapper reports every message it
dropped, so a test can compare the two lists.

- ``drop_1pct``: drops one message in a hundred, at random (seeded).
- ``drop_after_reconnect``: drops every message read during the first second of each
  connection after the first, i.e. the second after each reconnect.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

from pulp_pubsub.backends.base import BaseBackend, Handed, Transport

MUTATIONS = ("drop_1pct", "drop_after_reconnect")
#: How long after a reconnect drop_after_reconnect drops everything.
AFTER_RECONNECT = 1.0

Report = Callable[[str, int], None]


class _DroppingTransport(Transport):
    def __init__(
        self,
        inner: Transport,
        drop: Callable[[], bool],
        channels: Collection[str],
        report: Report,
    ) -> None:
        super().__init__(inner.backend)
        self.inner, self.drop, self.channels, self.report = inner, drop, channels, report

    def fileno(self) -> int:
        return self.inner.fileno()

    def listen(self, channels: Collection[str]) -> None:
        self.inner.listen(channels)

    def unlisten(self, channels: Collection[str]) -> None:
        self.inner.unlisten(channels)

    def read(self) -> Iterable[tuple[str, str | None] | Handed]:
        kept: list[tuple[str, str | None] | Handed] = []
        for item in self.inner.read():
            if isinstance(item, Handed):  # targeted messages are not this mutation's
                kept.append(item)
                continue
            wire, payload = item
            channel = self.backend.channel_name(wire)
            if (
                payload is not None
                and channel is not None
                and channel in self.channels
                and payload.isdigit()
                and self.drop()
            ):
                self.report(channel, int(payload))
                continue
            kept.append((wire, payload))
        return kept

    # Targeted delivery passes through untouched.
    def filenos(self) -> list[int]:
        return self.inner.filenos()

    def join(self, members: Collection[tuple[str, str]]) -> None:
        self.inner.join(members)

    def want(self, members: frozenset[tuple[str, str]], consumer: str) -> None:
        self.inner.want(members, consumer)

    def ack(self, handed: Collection[Handed]) -> None:
        self.inner.ack(handed)

    def release(self, handed: Collection[Handed]) -> None:
        self.inner.release(handed)

    def position(self) -> Any:
        return self.inner.position()

    def resume(self, position: Any) -> bool:
        return self.inner.resume(position)

    def probe(self, channel: str, payload: str) -> None:
        self.inner.probe(channel, payload)

    def send_from_listener(self, channel: str, payload: str) -> None:
        self.inner.send_from_listener(channel, payload)

    def close(self) -> None:
        self.inner.close()


def mutate(
    backend: BaseBackend, mutation: str, channels: Collection[str], report: Report, seed: int
) -> None:
    """Make every transport ``backend`` opens from now on lose messages the ``mutation`` way."""
    if mutation not in MUTATIONS:
        raise ValueError(f"unknown mutation {mutation!r}; choose one of {', '.join(MUTATIONS)}")
    opened = backend.open_transport
    rng = random.Random(seed)
    transports = 0

    def open_transport() -> Transport:
        nonlocal transports
        inner = opened()
        transports += 1
        if mutation == "drop_1pct":
            return _DroppingTransport(inner, lambda: rng.random() < 0.01, channels, report)
        if transports == 1:
            return inner
        until = time.monotonic() + AFTER_RECONNECT
        return _DroppingTransport(inner, lambda: time.monotonic() < until, channels, report)

    backend.open_transport = open_transport  # type: ignore[method-assign]
