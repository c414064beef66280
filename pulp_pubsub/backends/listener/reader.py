"""The read step: what one read of a transport brings, handled the same way by either thread.

The listener thread reads whenever it is awake. While an owner is attached (it waits in
``select()`` on ``fileno()``, see :mod:`.watch`), the owner reads too, in ``dispatch()``,
so that a message costs one thread wake-up: the owner's. Both go through
:meth:`Reader.read` under the one lock of the connection, so probe answers, hear checks,
control queries, targeted hand-overs, replay gaps and the replay position are handled alike
whoever reads. A read that fails in the owner's thread is never raised into ``dispatch()``:
it is handed to the listener, which reconnects.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from ...message import Message
from ...metrics import record_probe_rtt
from ..transport import Handed, Transport
from .responder import answer_query

if TYPE_CHECKING:
    from collections import Counter

    from ..transport import SubscribedBackend
    from .hearing import HearCheck
    from .pending import Pending
    from .responder import Described
    from .targeted import Targeted
    from .upkeep import Probe
    from .watch import Watch

#: Reads one dispatch() makes at most before it runs what they brought.
OWNER_BATCHES = 64
#: Seconds an owner waits for the listener's turn to end before it leaves the read to it.
OWNER_PATIENCE = 0.1


class Keeper(Protocol):
    """What a read tells the subscriber's connection keeper (a :class:`~.loop.Loop`)."""

    backend: SubscribedBackend
    stats: Counter[str]
    pending: Pending
    targeted: Targeted
    described: Described
    probe_channel: str
    control_channel: str
    last_heard: float | None
    probe_rtt: float | None
    position: Any
    deaf: bool

    def resync(self, wire: str) -> None: ...

    def on_hearing(self) -> None: ...

    def wake(self) -> None: ...


class Session:
    """One connection's reading state, shared by the listener and the owner."""

    def __init__(self, transport: Transport, probe: Probe, hearing: HearCheck) -> None:
        self.transport, self.probe, self.hearing = transport, probe, hearing
        # A transport that waited for a reply (to its LISTEN or SUBSCRIBE) may have read
        # messages along with it into its client library's buffer; its socket is then no
        # longer readable, so it is read once without waiting.
        self.buffered = True
        #: A read in the owner's thread failed: the listener raises it and reconnects.
        self.failed: BaseException | None = None
        #: The transport keeps a replay position (asked for after every read).
        self.replays = type(transport).position is not Transport.position


class Reader:
    def __init__(self, loop: Keeper) -> None:
        self._loop = loop
        #: Held by whichever thread reads or otherwise uses the transport.
        self.lock = threading.Lock()
        self.session: Session | None = None

    def read(self, session: Session) -> int:
        """Read once and handle what came (lock held); how many items it brought."""
        loop = self._loop
        transport = session.transport
        items = transport.read()
        if not isinstance(items, list):
            items = list(items)
        # A transport reads in bounded batches: after a read that brought something, read
        # again before waiting (the rest may sit in its client's buffer), unless the
        # transport says it took everything its client had.
        session.buffered = bool(items) and not transport.drained
        if items:
            loop.last_heard = heard = time.time()
            self._take(session, items, heard)
        if session.replays:
            position: Any = transport.position()
            if position is not None:
                loop.position = position
        if transport.heard_at:
            session.probe.heard(transport.heard_at)
        return len(items)

    def _take(self, session: Session, items: list[Any], heard: float) -> None:
        """Queue the messages of one read; answer what was the layer's own."""
        loop = self._loop
        backend = loop.backend
        enqueue = loop.pending.put
        probe_channel, control_channel = loop.probe_channel, loop.control_channel
        for item in items:
            if isinstance(item, Handed):
                loop.targeted.take(item, enqueue)
                continue
            wire, payload = item
            if payload is None:
                # A replaying transport whose history no longer reaches back.
                loop.resync(wire)
                continue
            if wire == probe_channel:
                rtt = session.probe.answered(payload)
                if rtt is not None:
                    loop.probe_rtt = rtt
                    record_probe_rtt(backend.name, rtt)
                elif session.hearing.answered(payload) and loop.deaf:
                    loop.on_hearing()
                continue
            if wire == control_channel:
                answer_query(loop.described, session.transport, wire, payload)
                continue
            channel = backend.channel_name(wire)
            if channel is not None:
                enqueue(Message(channel, payload, heard))

    def read_for_owner(self, watch: Watch) -> None:
        """The owner's read, in dispatch(): whatever the transport has, into the queue."""
        session = self.session
        if session is None or session.failed is not None:
            return
        if not session.buffered and not watch.transport_ready():
            return
        # The listener's turn is short (a read, a probe, an ack): wait for it, briefly.
        if not self.lock.acquire(timeout=OWNER_PATIENCE):
            return
        pending = self._loop.pending
        pending.quiet_for = threading.get_ident()
        try:
            if self.session is not session or session.failed is not None:
                return
            brought = 0
            for _ in range(OWNER_BATCHES):
                brought += self.read(session)
                if not session.buffered:
                    break
            if brought:
                self._loop.stats["owner_reads"] += 1
            if session.buffered:
                pending.signal()  # more waits in the client's buffer: come back for it
            if self._loop.backend.targets:
                # A targeting transport takes its next turn after each read (see want()).
                self._loop.targeted.settle(session.transport)
        except Exception as exc:
            # The listener's to handle: it raises this in its thread and reconnects. The
            # dead connection leaves the owner's set, so select() does not spin on it.
            session.failed = exc
            self._loop.stats["owner_read_failures"] += 1
            watch.sync(())
            self._loop.wake()
        finally:
            pending.quiet_for = None
            self.lock.release()
