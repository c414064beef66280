"""Direct publishing: every publish to every relay, answered, from one process.

Kept apart from :mod:`.backend`, which is about the relay list, the modes and
subscribing. One :class:`DirectPublisher` per process (a forked child makes
its own) holds a connection to each relay, made on first use and dropped when
it fails.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ...exceptions import ConnectionLost, PublishError
from ..selfpipe import wait_readable
from .protocol import MAX_FRAME, RelayConnection, encode

#: One frame ready to send: its request id, its bytes, the indexes of the messages it carries.
Encoded = tuple[int, bytes, list[int]]


def _many(messages: list[tuple[str, str]], group: list[int]) -> dict[str, Any]:
    return {"type": "publish_many", "messages": [messages[i] for i in group]}


class Relays(Protocol):
    """What a :class:`DirectPublisher` needs of its backend."""

    @property
    def urls(self) -> Sequence[str]: ...

    @property
    def config(self) -> Mapping[str, Any]: ...

    def connect(self, url: str, timeout: float) -> RelayConnection: ...


class DirectPublisher:
    """This process's connections to every relay, for ``direct`` publishing."""

    def __init__(self, backend: Relays) -> None:
        self.backend = backend
        self.lock = threading.Lock()
        self.conns: dict[str, RelayConnection] = {}
        self.ids = itertools.count(1)
        #: Relays that do not know ``publish_many`` (older ones): one frame per message.
        self.singles: set[str] = set()

    def send_many(self, messages: list[tuple[str, str]]) -> dict[int, dict[str, str]]:
        """Send every (wire, payload) to every relay; the failures by message index and URL.

        Only messages that failed somewhere have an entry: a batch that every
        relay took costs nothing per message here.
        """
        timeout = self.backend.config["publish_timeout"]
        deadline = time.monotonic() + timeout
        if not self.lock.acquire(timeout=timeout):
            raise PublishError(
                f"relay backend could not publish to {messages[0][0]!r}: another publish has "
                f"held this process's relay connections for over {timeout} s."
            )
        try:
            return self._send_to_all(messages, deadline)
        finally:
            self.lock.release()

    def _send_to_all(
        self, messages: list[tuple[str, str]], deadline: float
    ) -> dict[int, dict[str, str]]:
        """Send to every relay and wait for their answers; the failures by message and URL.

        Several messages go as one ``publish_many`` frame (answered once), encoded
        once for every relay; a relay that does not know it (an older one) gets
        them one ``publish`` frame each.
        """
        timeout = self.backend.config["publish_timeout"]
        failures: defaultdict[int, dict[str, str]] = defaultdict(dict)
        # Per relay: request id -> the indexes of the messages it carries, not answered yet.
        waiting: dict[str, dict[int, list[int]]] = {}
        may_retry: dict[str, bool] = {}
        # The whole batch as one frame, once encoded (request ids are per connection).
        whole: list[Encoded] = []

        def encoded(frame: dict[str, Any], group: list[int]) -> Encoded:
            request_id = next(self.ids)
            return request_id, encode(**frame, id=request_id).encode(), group

        def singles(indexes: list[int]) -> list[Encoded]:
            return [
                encoded(
                    {
                        "type": "publish",
                        "channel": messages[i][0],
                        "payload": messages[i][1],
                        "notify": False,
                    },
                    [i],
                )
                for i in indexes
            ]

        def frames(url: str, indexes: list[int]) -> list[Encoded]:
            if len(indexes) == 1 or url in self.singles:
                return singles(indexes)
            if len(indexes) == len(messages):
                # The usual batch: all of it, in one frame (JSON writes the tuples as arrays).
                if not whole:
                    whole.append(encoded({"type": "publish_many", "messages": messages}, indexes))
                if len(whole[0][1]) <= MAX_FRAME // 2:
                    return whole
            out: list[Encoded] = []
            group: list[int] = []
            size = 0
            for i in indexes:
                # JSON may spell a character in up to 6 bytes; a frame stays inside MAX_FRAME.
                cost = 16 + 6 * (len(messages[i][0]) + len(messages[i][1]))
                if group and size + cost > MAX_FRAME // 2:
                    out.append(encoded(_many(messages, group), group))
                    group, size = [], 0
                group.append(i)
                size += cost
            out.append(encoded(_many(messages, group), group))
            return out

        def start(url: str, indexes: list[int], retry: bool) -> None:
            conn = self.conns.get(url)
            reused = conn is not None
            try:
                if conn is None:
                    left = deadline - time.monotonic()
                    conn = self.conns[url] = self.backend.connect(
                        url, max(0.01, min(left, self.backend.config["connect_timeout"]))
                    )
                out = frames(url, indexes)
                conn.send_encoded(deadline, [data for _, data, _ in out])
                waiting.setdefault(url, {}).update((rid, group) for rid, _, group in out)
                may_retry[url] = reused and not retry
            except ConnectionLost as exc:
                waiting.pop(url, None)
                self.drop(url)
                if reused and not retry:
                    # The cached connection had died while idle: one fresh try.
                    start(url, indexes, True)
                else:
                    for i in indexes:
                        failures[i][url] = str(exc)

        every = list(range(len(messages)))
        for url in self.backend.urls:
            start(url, every, False)
        while waiting:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                for url, ids in waiting.items():
                    self.drop(url)
                    for group in ids.values():
                        for i in group:
                            failures[i][url] = f"{url} did not answer within {timeout} s"
                break
            # Answers take a round trip: wait for them rather than try a read first.
            readable = wait_readable([self.conns[url].fileno() for url in waiting], left_s)
            for url, ids in list(waiting.items()):
                conn = self.conns[url]
                if conn.fileno() not in readable:
                    continue
                try:
                    answers = conn.read()
                except ConnectionLost as exc:
                    del waiting[url]
                    self.drop(url)
                    left = sorted(i for group in ids.values() for i in group)
                    if may_retry[url]:
                        start(url, left, True)
                    else:
                        for i in left:
                            failures[i][url] = str(exc)
                    continue
                for answer in answers:
                    request_id = answer.get("id")
                    if request_id not in ids:
                        continue
                    group = ids.pop(request_id)
                    may_retry[url] = False  # it answers: a later loss is no idle death
                    if answer["type"] != "error":
                        continue
                    if len(group) > 1:
                        # An older relay, or one message it refuses: one frame each
                        # tells which (and older relays get single frames from now on).
                        if "unknown frame type" in str(answer.get("error")):
                            self.singles.add(url)
                        out = singles(group)
                        ids.update((rid, single) for rid, _, single in out)
                        try:
                            conn.send_encoded(deadline, [data for _, data, _ in out])
                        except ConnectionLost:
                            pass  # the next read() reports it
                        continue
                    failures[group[0]][url] = f"{url} refused it: {answer.get('error')}"
                if not ids:
                    waiting.pop(url, None)
        return dict(failures)

    def drop(self, url: str) -> None:
        self.singles.discard(url)  # the next connection may reach a newer relay
        conn = self.conns.pop(url, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self.lock:
            for url in list(self.conns):
                self.drop(url)
