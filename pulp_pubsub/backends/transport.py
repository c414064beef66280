"""The subscriber connection's side of the backend contract.

A backend's ``open_transport()`` returns a :class:`Transport`; only the shared
listener uses it. It lives below :mod:`.base` and the listener so that
neither imports the other's module for it: :mod:`.base` builds subscribers,
and the listener needs only this and :class:`SubscribedBackend`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol


class SubscribedBackend(Protocol):
    """What a subscriber uses of its backend (a :class:`~.base.BaseBackend`)."""

    config: dict[str, Any]
    stats: Counter[str]
    targets: bool

    @property
    def name(self) -> str: ...

    @property
    def payload_limit(self) -> int | None: ...

    def wire_name(self, channel: str) -> str: ...

    def channel_name(self, wire: str) -> str | None: ...

    def open_transport(self) -> Transport: ...

    def send(self, channel: str, payload: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Handed:
    """A targeted message handed to this subscriber alone, until acked or released.

    ``token`` is the backend's name for this hand-over (a stream entry id);
    the listener gives it back to ``Transport.ack()`` or ``release()``.
    """

    wire: str
    group: str
    payload: str
    token: str


class Transport:
    """One subscriber connection, used by one thread at a time (under its subscriber's lock).

    That is the listener thread, or the subscriber's owner reading in ``dispatch()``: a
    transport must not rely on being called from one thread always.

    ``read()`` is called when ``fileno()`` is readable, and once after every
    ``listen()``/``unlisten()`` (whose wait for the reply may have buffered
    messages), so it must not block and may find nothing; it raises (any
    exception) when the connection is gone, which sends the listener into its
    reconnect loop.
    """

    def __init__(self, backend: SubscribedBackend) -> None:
        self.backend = backend

    def fileno(self) -> int:
        raise NotImplementedError("subclasses of Transport must provide fileno()")

    def listen(self, channels: Collection[str]) -> None:
        raise NotImplementedError("subclasses of Transport must provide listen()")

    def unlisten(self, channels: Collection[str]) -> None:
        raise NotImplementedError("subclasses of Transport must provide unlisten()")

    def read(self) -> Iterable[tuple[str, str | None] | Handed]:
        """Return the (wire channel, payload) pairs that have arrived.

        A payload of None means "what this channel missed is gone": the
        listener turns it into a resync (a replaying transport whose history
        no longer reaches back far enough says so this way). A targeting
        transport also returns the :class:`Handed` messages it was given.
        """
        raise NotImplementedError("subclasses of Transport must provide read()")

    #: Set by read() when it took everything its client library had buffered (it stopped on
    #: an empty buffer, not at a batch limit), so what comes next makes a descriptor
    #: readable: the reader then waits for one instead of reading once more to find
    #: nothing. False (the default): after a read that brought something, read again.
    drained: bool = False

    def filenos(self) -> list[int]:
        """Every descriptor whose readability means read() has something to do."""
        return [self.fileno()]

    # Targeted delivery; used only when the backend sets ``targets = True``.
    # The listener calls want() on every turn of its loop: with the
    # (wire, group) pairs this subscriber takes messages from now, or with
    # nothing while it holds a message it has not acked. Between two calls a
    # transport hands over at most one message per group, and it takes no
    # further one until want() is called again, so a member that is busy with
    # one message is never given a second.

    def join(self, members: Collection[tuple[str, str]]) -> None:
        """Make these (wire, group) queues exist, so a publish from now on reaches them."""
        raise NotImplementedError("subclasses of Transport must provide join() to target")

    def want(self, members: frozenset[tuple[str, str]], consumer: str) -> None:
        raise NotImplementedError("subclasses of Transport must provide want() to target")

    def ack(self, handed: Collection[Handed]) -> None:
        """The member acted on these: the server may forget them."""
        raise NotImplementedError("subclasses of Transport must provide ack() to target")

    def release(self, handed: Collection[Handed]) -> None:
        """Give these back at once, for another member (closing, paused, unsubscribed)."""
        raise NotImplementedError("subclasses of Transport must provide release() to target")

    # Replay. Engines that keep history (etcd revisions, JetStream sequences)
    # can hand a reconnecting subscriber what it missed, in order, instead of
    # a resync. The listener keeps the position across transports; the
    # defaults below are those of an engine without history.

    def position(self) -> Any:
        """Where this transport's stream stands after the last read(); None without history."""
        return None

    def resume(self, position: Any) -> bool:
        """Start from ``position`` (an earlier transport's) instead of from now.

        Called on a new transport before its first listen(). Return True when
        listen() will deliver every message after ``position`` on the channels
        it is given, so the listener sends no resync for them; a channel whose
        history is gone is then reported by read() yielding ``(wire, None)``.
        """
        return False

    #: time.monotonic() of the last event this connection brought from the server, any
    #: channel's, for a transport that sees others' traffic (an etcd watch covers every
    #: channel, other subscribers' probes included). A live stream proves itself: the
    #: listener's own probe waits while others' keep coming, so a fleet of N sends
    #: about one probe per interval between them, not N, and no subscriber reads N.
    #: 0.0: the transport does not tell.
    heard_at: float = 0.0

    def probe(self, channel: str, payload: str) -> None:
        """Send the liveness probe; by default through the backend's publish path."""
        self.backend.send(channel, payload)

    # Hearing. A probe sent through the publish path (the default above) comes back only
    # if the subscription hears what others publish. A transport whose probe takes a
    # shorter way (PostgreSQL's is a bare Sync of the LISTEN session) proves it hears
    # separately: the listener calls hear() after every LISTEN and every hear_interval(),
    # and treats a hear check that does not come back within probe_timeout as deafness.

    def hear_interval(self) -> float | None:
        """Seconds between hear checks (inf: only after a LISTEN); None: the probe hears."""
        return None

    def hear(self, channel: str, payload: str) -> None:
        """Send ``payload`` on ``channel`` the way other clients publish, not on this connection."""
        self.backend.send(channel, payload)

    def deaf(self, timeout: float) -> str:
        """What to tell the operator when a hear check did not come back within ``timeout``."""
        return (
            f"The {self.backend.name} subscriber does not hear: a message it sent to itself "
            f"through the server did not come back within {timeout:g} s."
        )

    def send_from_listener(self, channel: str, payload: str) -> None:
        """Send a message of the listener's own (an introspection answer).

        By default the probe's path: where a backend sends its probe on the
        listener's own connection (PostgreSQL does), so does this, and the
        listener thread never opens a publishing connection of its own.
        """
        self.probe(channel, payload)

    def close(self) -> None:
        raise NotImplementedError("subclasses of Transport must provide close()")
