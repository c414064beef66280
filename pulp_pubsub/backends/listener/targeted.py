"""A subscriber's side of targeted delivery: the groups it joined and the messages it holds.

A targeted message handed to a member is held until acknowledged: after its callbacks
return, or with ``manual_ack`` when the owner calls ``ack()`` (it has finished the turn the
message started). While a subscriber holds one it takes no other, so a busy member leaves
the next message to an idle one; a paused group's messages, and whatever is held at
close() or unsubscribe(), are given back at once.

The owner's threads only record what is to be acked or given back; the listener thread
alone tells the server, on its next turn (:meth:`Targeted.settle`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...exceptions import PubSubError
from ...message import Message
from ...metrics import count

if TYPE_CHECKING:
    from ..transport import Handed, SubscribedBackend, Transport

# The listener's one logger, whichever of its modules writes.
logger = logging.getLogger(__package__)


class Targeted:
    def __init__(
        self,
        backend: SubscribedBackend,
        lock: threading.RLock,
        stats: Counter[str],
        wake: Callable[[], None],
        manual_ack: bool,
    ) -> None:
        self._backend, self._lock, self._stats = backend, lock, stats
        # Pokes the listener thread, so it settles without waiting for its next read.
        self.wake = wake
        #: Targeted messages wait for ``ack()`` instead of being acked after their callbacks.
        self.manual_ack = manual_ack
        # The groups joined per channel, the paused ones, what is handed to us and not yet
        # acked (by token), what dispatch() ran and manual ack still waits for, and what
        # the listener must ack or give back on its next turn.
        self._groups: dict[str, set[str]] = {}
        self._paused: set[tuple[str, str]] = set()
        self._held: dict[str, Handed] = {}
        self._dispatched: list[Handed] = []
        self._to_ack: list[Handed] = []
        self._to_release: list[Handed] = []
        # Named after the process, so an operator (and the fault run) can tell
        # whose consumer holds a message; unique per subscriber.
        self.consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # What the server has been told on this connection.
        self.joined: set[tuple[str, str]] = set()

    # -- the owner's side (lock held where it says so) -------------------------------

    def add(self, channel: str, group: str) -> bool:
        """Join ``group`` of ``channel``; True when newly joined (lock held)."""
        groups = self._groups.setdefault(channel, set())
        if group in groups:
            return False
        groups.add(group)
        return True

    def forget(self, channel: str, wire: str) -> None:
        """Unsubscribed: leave the channel's groups, give back what it handed us (lock held)."""
        self._groups.pop(channel, None)
        self._paused = {pair for pair in self._paused if pair[0] != channel}
        self.give_back([h for h in self._held.values() if h.wire == wire])

    def set_accepting(self, channel: str, group: str, accepting: bool) -> bool:
        """True when that changed anything."""
        with self._lock:
            pair = (channel, group)
            if accepting == (pair not in self._paused):
                return False
            if accepting:
                self._paused.discard(pair)
            else:
                self._paused.add(pair)
        return True

    def ack(self) -> int:
        with self._lock:
            done, self._dispatched = self._dispatched, []
            if not done:
                return 0
            for handed in done:
                self._held.pop(handed.token, None)
            self._to_ack.extend(done)
        return len(done)

    @property
    def holding(self) -> int:
        with self._lock:
            return len(self._held)

    def give_back(self, handed: list[Handed]) -> None:
        """Hand these back to their group on the listener's next turn (lock held)."""
        for item in handed:
            if self._held.pop(item.token, None) is not None:
                self._to_release.append(item)
        self._dispatched = [item for item in self._dispatched if item.token in self._held]

    def claim(self, channel: str, token: str) -> tuple[Handed | None, bool]:
        """About to dispatch the message of ``token``: (what to ack, given back now) (lock held).

        None when it is no longer ours: given back meanwhile (unsubscribed), or given back
        now because its group is paused (the group's other members get it).
        """
        handed = self._held.get(token)
        if handed is None:
            return None, False
        if (channel, handed.group) in self._paused:
            self.give_back([handed])
            return None, True
        return handed, False

    def done(self, handed: Handed) -> bool:
        """Its callbacks ran; True when the listener has an ack to send."""
        with self._lock:
            if self.manual_ack:
                self._dispatched.append(handed)
            elif self._held.pop(handed.token, None) is not None:
                self._to_ack.append(handed)
                return True
        return False

    # -- the listener thread ---------------------------------------------------------

    def take(self, handed: Handed, enqueue: Callable[[Message, str | None], bool]) -> None:
        """A targeted message handed to us: queue it for dispatch, or give it back."""
        channel = self._backend.channel_name(handed.wire)
        with self._lock:
            if handed.token in self._held:
                return  # handed again after a reconnect: we already hold it
            self._held[handed.token] = handed
            if channel is None or not enqueue(
                Message(channel, handed.payload, group=handed.group), handed.token
            ):
                self.give_back([handed])
                self.wake()

    def join(self, transport: Transport) -> None:
        """Make the server know this subscriber's groups before subscribe() returns."""
        with self._lock:
            pairs = {
                (self._backend.wire_name(channel), group)
                for channel, groups in self._groups.items()
                for group in groups
            }
        if pairs - self.joined:
            transport.join(sorted(pairs - self.joined))
            self.joined |= pairs

    def settle(self, transport: Transport) -> None:
        """Send the acks and give-backs dispatch() asked for; take the next messages."""
        if not (self.joined or self._to_ack or self._to_release):
            # This connection has joined no group: no turn to take, nothing to tell the
            # server (a subscriber that only hears broadcasts, after every read).
            return
        with self._lock:
            acks, releases = list(self._to_ack), list(self._to_release)
        if acks:
            transport.ack(acks)
        if releases:
            transport.release(releases)
            count(self._stats, "released", self._backend.name)
        with self._lock:
            # Only now: a failure above leaves them for the next connection.
            del self._to_ack[: len(acks)]
            del self._to_release[: len(releases)]
            if self._held:
                members: frozenset[tuple[str, str]] = frozenset()
            else:
                # Only groups join() has made known to the server: subscribe() records a
                # group before the listener joins it, and a turn on a group the server does
                # not have yet (Redis: no stream, NOGROUP) would cost the connection.
                members = frozenset(
                    member
                    for channel, groups in self._groups.items()
                    for group in groups
                    if (channel, group) not in self._paused
                    and (member := (self._backend.wire_name(channel), group)) in self.joined
                )
        transport.want(members, self.consumer)

    def farewell(self, transport: Transport) -> None:
        """Closing: give back what we hold, so no member waits for a claim timeout."""
        try:
            with self._lock:
                self.give_back(list(self._held.values()))
                self._paused = {(c, g) for c, gs in self._groups.items() for g in gs}
            self.settle(transport)
        except PubSubError as exc:
            logger.warning(
                "Closing: could not give back targeted messages (%s); other members "
                "take them after claim_timeout.",
                exc,
            )
