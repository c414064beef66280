"""Targeted delivery on Redis: streams with one consumer group each.

One stream per (channel, group), ``<wire channel>#<group>``; a publish adds
entries and hands each to the member idle since the latest time (see
:mod:`.scripts`), which waits for it on a second connection of its own, one at
a time; the listener acknowledges or gives them back through the publish pool.
Kept apart from :mod:`.backend`, which is about the server, the URL and PUB/SUB.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Collection, Mapping
from typing import Any, Protocol

import redis
from redis.connection import Connection

from ...exceptions import ConnectionLost
from ..base import Handed
from .scripts import ALIVE_CLAIM_TIMEOUTS, MEMBER
from .wire import NOTHING, Frames, explain, text

#: The consumer group inside every targeted-delivery stream.
CONSUMER_GROUP = "pulp-pubsub"
#: Entries a targeted-delivery stream keeps at most (unread ones; acked ones are deleted).
STREAM_MAXLEN = 10000
#: Seconds between a member's looks for consumers of processes long gone (jittered).
TIDY_INTERVAL = 300.0


def stream_key(wire: str, group: str) -> str:
    """The stream of one (channel, group); unique because a group name has no ``#``."""
    return f"{wire}#{group}"


class GroupLink(Protocol):
    """What a :class:`GroupReader` needs of the transport it serves."""

    def dial(self) -> tuple[Connection, int]:
        """A new connection to the transport's server, connected, and its descriptor."""
        ...

    def publisher(self) -> redis.Redis:
        """This process's publish client: it interrupts a blocked read from outside."""
        ...

    def tidy(self, keys: Collection[str]) -> None:
        """Remove the consumers of members long gone from these streams' groups."""
        ...


class GroupReader:
    """The second connection of a targeting transport: the member's turns and its inbox.

    One command at a time is outstanding: a turn (the :data:`.scripts.MEMBER`
    script), or a blocking ``BLPOP`` on the member's inbox after a turn that
    found nothing and recorded it idle. The block ends by the claim timeout, and
    the turn that follows also sweeps for entries others have held too long. A
    changed wish interrupts a blocked read with ``CLIENT UNBLOCK`` from the
    publish connection; the nil reply then makes way for a turn with the new wish.
    """

    def __init__(self, link: GroupLink, config: Mapping[str, Any], prefix: str, where: str) -> None:
        self.link = link
        self.claim_ms = claim_ms(config)
        self.marks_ms = marks_ms(config)
        self.probe_timeout = config["probe_timeout"]
        self.base = member_base(prefix)
        self.conn, self.fd = link.dial()
        try:
            self.conn.send_command("CLIENT", "ID", check_health=False)
            self.client_id = int(self.conn.read_response())
        except redis.RedisError as exc:
            self.conn.disconnect()
            raise ConnectionLost(f"could not connect to {where}: {explain(exc)}") from exc
        self.frames = Frames(self.conn, config["connect_timeout"])
        # What each outstanding reply is: ("turn", members) or ("inbox", members).
        self.expect: deque[tuple[str, Any]] = deque()
        self.reading: frozenset[tuple[str, str]] | None = None
        # When the outstanding command should have answered by.
        self.block_until: float = 0.0
        self.unblocking: bool = False
        self.history_read: bool = False
        # What this member is recorded idle on (by its last turn): it waits on its inbox.
        self.idle: frozenset[tuple[str, str]] | None = None
        self.next_sweep: float = time.monotonic()
        self.next_tidy: float = self.next_sweep
        self.consumer: str = ""

    def want(self, members: frozenset[tuple[str, str]], consumer: str) -> None:
        self.consumer = consumer
        if self.expect:
            if self.reading is not None and self.reading != members and not self.unblocking:
                self.unblocking = True
                publisher = self.link.publisher()
                try:
                    if not members:
                        # Paused or closing: no publish may pick this member from now on.
                        publisher.eval(MEMBER, 0, *self._argv("leave"))
                        self.idle = None
                    publisher.client_unblock(self.client_id)
                except redis.RedisError as exc:
                    raise ConnectionLost(f"CLIENT UNBLOCK failed: {explain(exc)}") from exc
            elif time.monotonic() > self.block_until + self.probe_timeout:
                raise ConnectionLost(
                    f"Redis did not answer a group read within {self.probe_timeout} s of its end"
                )
            return
        if not members:
            if self.idle is not None:
                self._turn("leave", members, [])
            return
        keys = sorted(stream_key(wire, group) for wire, group in members)
        now = time.monotonic()
        if not self.history_read:
            # Entries handed to this consumer on a connection that then died.
            self._turn("fresh", members, keys)
            self.history_read = True
        elif self.idle == members and now < self.next_sweep:
            block = self.next_sweep - now
            self._send("inbox", members, "BLPOP", self._key("inbox"), f"{block:.3f}")
            self.reading = members
            self.block_until = now + block
        elif now >= self.next_sweep:
            self.next_sweep = now + self._sweep_interval()
            self._turn("sweep", members, keys)
            if now >= self.next_tidy:
                self.next_tidy = now + TIDY_INTERVAL * random.uniform(0.8, 1.0)
                self.link.tidy(keys)
        else:
            self._turn("turn", members, keys)

    def _sweep_interval(self) -> float:
        # Redelivery comes within two claim timeouts; an idle member looks
        # about once per claim timeout, jittered so a fleet does not look at once.
        return self.claim_ms / 1000 * random.uniform(0.8, 1.0)

    def _key(self, what: str) -> str:
        return f"{self.base}{self.consumer}>{what}"

    def _argv(self, mode: str) -> tuple[str, ...]:
        ttl = str(self.marks_ms)
        return (CONSUMER_GROUP, self.consumer, self.base, ttl, mode, str(self.claim_ms))

    def _turn(self, mode: str, members: frozenset[tuple[str, str]], keys: list[str]) -> None:
        # Every mode but "leave" and "fresh" records the member idle when it finds nothing.
        recorded = members if mode in ("turn", "sweep") else None
        self._send("turn", recorded, "EVAL", MEMBER, str(len(keys)), *keys, *self._argv(mode))

    def _send(self, kind: str, what: Any, *args: str) -> None:
        self.frames.send(*args)
        self.expect.append((kind, what))
        self.block_until = time.monotonic()

    def read(self) -> list[Handed]:
        handed: list[Handed] = []
        while self.expect:
            try:
                reply = self.frames.next()
            except redis.ResponseError as exc:
                # NOGROUP: the stream is gone (a restart without persistence).
                raise ConnectionLost(f"Redis refused a group read: {explain(exc)}") from exc
            except redis.RedisError as exc:  # LOADING, say: not a ResponseError
                raise ConnectionLost(explain(exc)) from exc
            if reply is NOTHING:
                break
            kind, what = self.expect.popleft()
            if kind == "inbox":
                self.reading = None
                self.unblocking = False
                if isinstance(reply, list) and len(reply) == 2:
                    # The publish that pushed it took this member off every idle set.
                    self.idle = None
                    handed.extend(parse_items([reply[1]]))
            else:
                items = parse_items(reply if isinstance(reply, list) else [])
                self.idle = None if items else what
                handed.extend(items)
        return handed

    def close(self) -> None:
        self.conn.disconnect()


def claim_ms(config: Mapping[str, Any]) -> int:
    return max(1, int(config["claim_timeout"] * 1000))


def marks_ms(config: Mapping[str, Any]) -> int:
    """How long a member's marks outlive its last turn."""
    return claim_ms(config) * ALIVE_CLAIM_TIMEOUTS


def member_base(prefix: str) -> str:
    """Where a member's own keys start; see :mod:`.scripts`."""
    return f"{prefix}>member>"


def parse_items(items: list[Any]) -> list[Handed]:
    """Entries as the scripts hand them out: ``stream\\nid\\npayload``."""
    found = []
    for item in items:
        key, entry_id, payload = text(item).split("\n", 2)
        wire, _, group = key.rpartition("#")
        found.append(Handed(wire, group, payload, entry_id))
    return found
