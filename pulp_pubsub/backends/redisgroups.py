"""Targeted delivery on Redis: streams with one consumer group each.

One stream per (channel, group), ``<wire channel>#<group>``; a publish adds
entries, each member reads them on a second connection of its own with
blocking ``XREADGROUP``, one at a time, and the listener acknowledges or gives
them back through the publish pool. Kept apart from :mod:`.redis`, which is
about the server, the URL and PUB/SUB.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.connection import Connection

from ..exceptions import ConnectionLost
from .base import Handed

if TYPE_CHECKING:
    from .redis import RedisTransport

#: The consumer group inside every targeted-delivery stream.
CONSUMER_GROUP = "pulp-pubsub"
#: Entries a targeted-delivery stream keeps at most (unread ones; acked ones are deleted).
STREAM_MAXLEN = 10000
#: Seconds between a member's looks for consumers of processes long gone (jittered).
TIDY_INTERVAL = 300.0


def stream_key(wire: str, group: str) -> str:
    """The stream of one (channel, group); unique because a group name has no ``#``."""
    return f"{wire}#{group}"


class GroupReader:
    """The second connection of a targeting transport: blocking group reads.

    One command at a time is outstanding: a blocking ``XREADGROUP`` over the
    wanted streams, or the ``XAUTOCLAIM`` sweep, or the first read of this
    consumer's own pending entries (taken before a reconnect and never seen).
    A changed wish interrupts a blocked read with ``CLIENT UNBLOCK`` from the
    publish connection; the nil reply then makes way for the new read.
    """

    def __init__(
        self,
        transport: RedisTransport,
        explain: Callable[[BaseException], str],
        read_reply: Callable[[Connection, float], Any],
    ) -> None:
        self.transport = transport
        self.explain = explain
        # Both from .redis, which knows the redis-py version's ways.
        self.read_reply = read_reply
        backend = transport.backend
        self.claim_ms = max(1, int(backend.config["claim_timeout"] * 1000))
        self.probe_timeout = backend.config["probe_timeout"]
        self.conn = cast(Connection, transport._pool.make_connection())
        try:
            self.conn.connect()
            self.conn.send_command("CLIENT", "ID", check_health=False)
            self.client_id = int(self.conn.read_response())
        except redis.RedisError as exc:
            self.conn.disconnect()
            raise ConnectionLost(
                f"could not connect to {backend.where()}: {self.explain(exc)}"
            ) from exc
        sock = self.conn._sock
        if sock is None:
            raise ConnectionLost(f"could not connect to {backend.where()}")
        self.fd: int = sock.fileno()
        # What each outstanding reply is: ("read", streams) or ("claim", key).
        self.expect: deque[tuple[str, Any]] = deque()
        self.reading: frozenset[tuple[str, str]] | None = None
        # When the outstanding command should have answered by.
        self.block_until: float = 0.0
        self.unblocking: bool = False
        self.history_read: bool = False
        self.next_sweep: float = time.monotonic()
        self.next_tidy: float = self.next_sweep
        self.consumer: str = ""

    def want(self, members: frozenset[tuple[str, str]], consumer: str) -> None:
        self.consumer = consumer
        if self.expect:
            if self.reading is not None and self.reading != members and not self.unblocking:
                self.unblocking = True
                try:
                    self.transport.backend.clients().publisher.client_unblock(self.client_id)
                except redis.RedisError as exc:
                    raise ConnectionLost(f"CLIENT UNBLOCK failed: {self.explain(exc)}") from exc
            elif time.monotonic() > self.block_until + self.probe_timeout:
                raise ConnectionLost(
                    f"Redis did not answer a group read within {self.probe_timeout} s of its end"
                )
            return
        if not members:
            return
        keys = sorted(stream_key(wire, group) for wire, group in members)
        now = time.monotonic()
        if not self.history_read:
            # Entries handed to this consumer on a connection that then died.
            self._read_group(members, consumer, keys, "0")
            self.history_read = True
        elif now >= self.next_sweep:
            for key in keys:
                self._send(
                    "claim",
                    key,
                    "XAUTOCLAIM",
                    key,
                    CONSUMER_GROUP,
                    consumer,
                    str(self.claim_ms),
                    "0-0",
                    "COUNT",
                    "1",
                )
            self.next_sweep = now + self._sweep_interval()
            if now >= self.next_tidy:
                self.next_tidy = now + TIDY_INTERVAL * random.uniform(0.8, 1.0)
                self.transport.tidy(keys)
        else:
            block = max(1, int((self.next_sweep - now) * 1000))
            self._read_group(members, consumer, keys, ">", "BLOCK", str(block))
            self.reading = members
            self.block_until = now + block / 1000

    def _sweep_interval(self) -> float:
        # Redelivery comes within two claim timeouts; an idle member looks
        # about once per claim timeout, jittered so a fleet does not look at once.
        return self.claim_ms / 1000 * random.uniform(0.8, 1.0)

    def _read_group(
        self,
        members: frozenset[tuple[str, str]],
        consumer: str,
        keys: list[str],
        start: str,
        *block: str,
    ) -> None:
        """One entry of any of ``keys``: from ``start`` ("0": this consumer's own pending
        entries; ">": new ones), waiting as ``block`` says."""
        self._send(
            "read",
            members,
            "XREADGROUP", "GROUP", CONSUMER_GROUP, consumer, "COUNT", "1", *block,
            "STREAMS", *keys, *[start] * len(keys),
        )  # fmt: skip

    def _send(self, kind: str, what: Any, *args: str) -> None:
        try:
            self.conn.send_command(*args, check_health=False)
        except redis.RedisError as exc:
            raise ConnectionLost(self.explain(exc)) from exc
        self.expect.append((kind, what))
        self.block_until = time.monotonic()

    def read(self) -> list[Handed]:
        handed: list[Handed] = []
        while self.expect:
            try:
                if not self.conn.can_read(timeout=0):
                    break
                reply = self.read_reply(self.conn, 0)
            except redis.TimeoutError:
                break
            except redis.ResponseError as exc:
                # NOGROUP: the stream is gone (a restart without persistence).
                raise ConnectionLost(f"Redis refused a group read: {self.explain(exc)}") from exc
            except redis.RedisError as exc:
                raise ConnectionLost(self.explain(exc)) from exc
            kind, what = self.expect.popleft()
            if kind == "read":
                self.reading = None
                self.unblocking = False
                if isinstance(reply, list):
                    for key, entries in reply:
                        handed.extend(self._entries(text(key), entries))
            elif isinstance(reply, list) and len(reply) >= 2:
                handed.extend(self._entries(what, reply[1]))
        return handed

    @staticmethod
    def _entries(key: str, entries: Any) -> list[Handed]:
        wire, _, group = key.rpartition("#")
        found = []
        for entry in entries or ():
            if not entry or entry[1] is None:
                continue  # deleted while pending (trimmed)
            entry_id, fields = entry
            values = dict(zip(fields[::2], fields[1::2], strict=False))
            payload = values.get(b"p", b"")
            found.append(Handed(wire, group, text(payload), text(entry_id)))
        return found

    def close(self) -> None:
        self.conn.disconnect()


def text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
