"""The listener thread: it keeps a subscriber's transport.

It connects, LISTENs to what the callbacks want, reads, probes and hear-checks; on any
failure it reconnects with capped, jittered backoff and then queues one ``resync`` per
subscribed channel, or lets an engine with history replay the gap instead. Messages go to
the pending queue; the owner dispatches them, never this thread, so a slow handler cannot
starve the connection or its probe.

An owner that waits in ``select()`` on ``fileno()`` also reads, in ``dispatch()`` (see
:mod:`.watch` and :mod:`.reader`): then this thread wakes only for its requests and its
timers, reading at each of those turns, and reads everything itself again while the owner
is found away (data it should have read waits at a timer's turn) until the owner next
calls ``dispatch()``. Either thread uses the transport only under the reader's lock.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...exceptions import ConnectionLost, Deaf
from ...message import Message
from ...metrics import count
from ..selfpipe import drain, make_pipe, poke, wait_readable
from .degraded import Degraded
from .hearing import HEAR_TIMEOUT_MIN, HearCheck
from .outage import OutageLog
from .reader import Reader, Session
from .responder import CONTROL_CHANNEL, Described
from .upkeep import Backoff, Probe, listen_to
from .watch import AVAILABLE as WATCH_AVAILABLE
from .watch import Watch

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..transport import Transport
    from .pending import Pending
    from .targeted import Targeted

# The listener's one logger, whichever of its modules writes.
logger = logging.getLogger(__package__)

PROBE_PREFIX = "pubsub_probe_"


@dataclass
class Request:
    """A subscribe or unsubscribe waiting for the listener thread."""

    channel: str | None
    done: threading.Event = field(default_factory=threading.Event)
    applied: bool = False


class Loop:
    def __init__(
        self,
        subscriber: Described,
        pending: Pending,
        targeted: Targeted,
        wanted: Callable[[], set[str]],
        closed: threading.Event,
    ) -> None:
        # The subscriber is what answer_query() describes, and holds the stats.
        self._sub = self.described = subscriber
        self.stats = subscriber.stats
        backend = self._backend = self.backend = subscriber.backend
        self._pending, self._targeted = pending, targeted
        self.pending, self.targeted = pending, targeted
        self._wanted, self._closed = wanted, closed
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self.last_resync_at: float | None = None
        self.probe_rtt: float | None = None
        self.deaf = False
        self.last_heard: float | None = None
        # last_heard of the connection that was lost: where the next resyncs' window opens.
        self._lost_since: float | None = None
        # The replay position of the last transport (None: the engine keeps no history).
        self.position: Any = None
        self.reader = Reader(self)
        #: The owner's descriptor, once it has asked for one (see :meth:`attach`).
        self.watch: Watch | None = None
        self._watch_closed = False
        # The owner was found not reading what waited; the listener reads until it is back.
        self._owner_away = False
        self._attach_lock = threading.Lock()
        self.connected = threading.Event()
        self.control_r, self.control_w = make_pipe()
        self.requests: deque[Request] = deque()
        self.probe_channel = backend.wire_name(PROBE_PREFIX + uuid.uuid4().hex[:12])
        self.control_channel = backend.wire_name(CONTROL_CHANNEL)
        # With introspection off, the control channel is not even listened
        # to: a query then wakes no subscriber at all.
        self.private = {self.probe_channel}
        if subscriber.control_gate.policy.answers:
            self.private.add(self.control_channel)
        self._outage = OutageLog(backend.name)
        self.degraded = Degraded(
            backend.name, backend.config["outage_interval"], subscriber.stats, self._resync_all
        )

    def wake(self) -> None:
        """Make the listener thread look at its requests and settle targeted messages."""
        poke(self.control_w)

    def ask(self, wire: str) -> Request:
        request = Request(wire)
        # Queued before the listener starts, so its first connect knows this
        # subscribe is waiting and owes it no resync.
        self.requests.append(request)
        return request

    def run(self) -> None:
        config = self._backend.config
        backoff = Backoff(config["reconnect_min"], config["reconnect_max"])
        while not self._closed.is_set():
            transport: Transport | None = None
            # Opening may take up to connect_timeout: resyncs due meanwhile go out first.
            self.degraded.tick()
            try:
                transport = self._backend.open_transport()
                # An engine with history replays the gap itself: no resync owed.
                replaying = self.position is not None and transport.resume(self.position)
                listening: set[str] = set()
                self._targeted.joined = set()
                # Channels whose subscribe() is waiting right now missed
                # nothing; every other channel may have, so it gets a resync.
                fresh = {r.channel for r in self.requests}
                self.answer_requests(transport, listening)
                self.last_heard = time.time()
                backoff.reset()
                missed = listening - fresh - self.private
                if replaying:
                    count(self._sub.stats, "replays", self._backend.name)
                self._on_connected(set() if replaying else missed)
                self._serve(transport, listening)
                if self._backend.targets:
                    self._targeted.farewell(transport)
            except Exception as exc:
                if self._closed.is_set():
                    break
                self._on_disconnected(exc)
            finally:
                self.connected.clear()
                if transport is not None:
                    try:
                        transport.close()
                    except Exception:
                        logger.debug("Closing a dead transport failed", exc_info=True)
            if self._closed.is_set():
                break
            # Nothing to subscribe on yet: waiters are released at once; the
            # channel is listened to (and resynced) on reconnect.
            backoff.wait(self._closed, self.control_r, self._release_requests, self.degraded)

    def answer_requests(self, transport: Transport | None, listening: set[str]) -> bool:
        """Bring ``listening`` in line with the callbacks, then release waiters.

        Returns whether it LISTENed to a new channel.
        """
        answered = []
        added = False
        while self.requests:
            answered.append(self.requests.popleft())
        applied = False
        try:
            if transport is not None:
                added = listen_to(transport, listening, self._wanted() | self.private)
                if self._backend.targets:
                    self._targeted.join(transport)
                applied = True
        finally:
            # Also when listen() fails: these requests have left the queue,
            # so nothing else would release their waiters before the timeout.
            for request in answered:
                request.applied = applied
                request.done.set()
        return added

    def _release_requests(self) -> None:
        self.answer_requests(None, set())

    def _on_connected(self, missed: set[str]) -> None:
        if self.last_error is not None and not self.deaf:
            self._outage.reconnected()
        self.connected_since = time.time()
        # A subscriber found deaf stays not connected, its error standing, until a hear
        # check on a new connection comes back.
        if not self.deaf:
            self.last_error = None
            self.degraded.end()
            self.connected.set()
        for wire in sorted(missed):
            self.resync(wire)

    def on_hearing(self) -> None:
        self._outage.hears_again()
        self.deaf = False
        self.last_error = None
        self.degraded.end()
        self.connected.set()

    def resync(self, wire: str) -> None:
        channel = self._backend.channel_name(wire)
        if channel is not None and wire not in (self.probe_channel, self.control_channel):
            count(self._sub.stats, "resyncs", self._backend.name, channel)
            self.last_resync_at = time.time()
            self._pending.put(Message(channel, "", resync=True, since=self._lost_since))

    def _resync_all(self) -> int:
        """Degraded mode's turn: a resync on every channel the callbacks want."""
        wanted = self._wanted() - self.private
        for wire in sorted(wanted):
            self.resync(wire)
        return len(wanted)

    def _on_disconnected(self, exc: BaseException) -> None:
        # The state an observer reads (connected, deaf, last_error, the log) is
        # settled before the counters that announce the loss move.
        self.connected.clear()
        cause = f"{type(exc).__name__}: {exc}".strip()
        deaf = isinstance(exc, Deaf)
        if deaf:
            self.deaf = True
            self._outage.deaf(exc)
        elif self.last_error is None:
            self._outage.lost(cause)
        self.last_error = cause
        self.degraded.begin()
        # Only a connection that heard since the last loss moves the window's start.
        if self.last_heard is not None:
            self._lost_since = self.last_heard
        stats, name = self._sub.stats, self._backend.name
        if deaf:
            count(stats, "deaf", name, error=exc)
        count(stats, "reconnects", name, error=exc)
        self.answer_requests(None, set())

    def _serve(self, transport: Transport, listening: set[str]) -> None:
        """Read, probe and hear-check until the connection fails."""
        config, stats, name = self._backend.config, self._sub.stats, self._backend.name
        probe = Probe(config["probe_interval"], config["probe_timeout"])
        hearing = HearCheck(transport, max(probe.timeout, HEAR_TIMEOUT_MIN), probe.interval)
        session = Session(transport, probe, hearing)
        reader, targets = self.reader, self._backend.targets
        closed, control_r = self._closed, self.control_r
        with reader.lock:
            reader.session = session
        try:
            while not closed.is_set():
                # Asked each turn: a targeting transport opens its second connection on join.
                fds = transport.filenos()
                watch = self.watch
                # An attached owner reads the transport itself; this thread then wakes
                # only for its requests and its timers, and reads at each of those turns.
                owner_reads = watch is not None and watch.active and not self._owner_away
                due = min(probe.due(), hearing.due())
                wait = 0.0 if session.buffered else due - time.monotonic()
                watched = [control_r] if owner_reads else [*fds, control_r]
                # A connection that closes wakes this thread all the same: it reconnects
                # at once, whether or not the owner is reading.
                ready = wait_readable(watched, max(wait, 0), fds if owner_reads else ())
                if closed.is_set():
                    return
                with reader.lock:
                    if session.failed is not None:
                        raise session.failed
                    poked = control_r in ready
                    if poked:
                        drain(control_r)
                        if self.answer_requests(transport, listening):
                            hearing.after_listen()
                        session.buffered = True
                    # A timer's turn and data the owner should have read waits: it is busy
                    # elsewhere, so this thread reads until dispatch() is called again.
                    timer_turn = owner_reads and not ready and not session.buffered
                    if timer_turn and wait_readable(fds, 0):
                        self._owner_away = True
                    if owner_reads or session.buffered or any(fd in ready for fd in fds):
                        reader.read(session)
                    watch = self.watch  # again: attach() may have come meanwhile
                    if watch is not None:
                        # Only a turn that took attach()'s poke may say the set is ready: an
                        # earlier one would still read what the owner expects to read.
                        watch.sync(() if self._owner_away else transport.filenos(), ready=poked)
                    if targets:
                        self._targeted.settle(transport)
                    self._check(session, stats, name)
        finally:
            with reader.lock:
                reader.session = None
                if self.watch is not None:
                    self.watch.sync(())

    def _check(self, session: Session, stats: Counter[str], name: str) -> None:
        """The probe's and the hear check's turn (reader lock held)."""
        probe, hearing = session.probe, session.hearing
        now = time.monotonic()
        if probe.overdue(now):
            count(stats, "probe_failures", name)
            raise ConnectionLost(f"liveness probe not answered within {probe.timeout} s")
        if hearing.step(now, probe.answered_at, self.probe_channel, stats) and not probe.token:
            probe.hurry(now)  # is the session alive at all? The probe says.
        if probe.is_due(now):
            try:
                session.transport.probe(self.probe_channel, probe.send(now))
            except Exception:
                # A probe that cannot even be sent failed as surely as an unanswered one.
                count(stats, "probe_failures", name)
                raise
            stats["probes"] += 1

    # -- the owner's side ----------------------------------------------------------

    def attach(self, signal_r: int) -> int:
        """The owner waits in select() on the returned descriptor and reads in dispatch()."""
        watch = self.watch
        if watch is not None and watch.active:
            return watch.fd  # attached already: an owner may ask before every select()
        if not WATCH_AVAILABLE or not self._backend.config["owner_reads"]:
            return signal_r
        with self._attach_lock:
            if self._watch_closed:
                return signal_r  # closed meanwhile: a set made now would never be closed
            watch = self.watch
            if watch is None:
                watch = self.watch = Watch(signal_r)
        if not watch.active:
            watch.active = True
            watch.synced.clear()
            self.wake()
            if self.reader.session is not None:
                # Until the listener has put the transport in, the set would miss its data.
                watch.synced.wait(self._backend.config["connect_timeout"] * 2 + 1)
        return watch.fd

    def close_watch(self) -> None:
        """Close the owner's set, and make sure no attach() makes one after this."""
        with self._attach_lock:
            self._watch_closed = True
            if self.watch is not None:
                self.watch.close()

    def detach(self) -> None:
        """The owner reads no more (start(): a dispatcher thread runs the callbacks)."""
        if self.watch is not None and self.watch.active:
            self.watch.active = False
            self.wake()

    def owner_wait(self, timeout: float | None) -> bool:
        """Read what the transport has, waiting up to ``timeout`` until something waits.

        False when the owner is not attached: the listener reads, and the queue waits.
        """
        watch = self.watch
        if watch is None or not watch.active:
            return False
        if self._owner_away:
            self._owner_away = False
            self.wake()  # back: the listener leaves the reading to this thread again
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed.is_set():
            self.reader.read_for_owner(watch)
            if self._pending.waiting():
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            wait_readable([watch.fd], left)
        return True
