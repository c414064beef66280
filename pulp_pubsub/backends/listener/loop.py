"""The listener thread: the only code that touches a subscriber's transport.

It connects, LISTENs to what the callbacks want, reads, probes and hear-checks; on any
failure it reconnects with capped, jittered backoff and then queues one ``resync`` per
subscribed channel, or lets an engine with history replay the gap instead. Messages go to
the pending queue; the owner dispatches them, never this thread, so a slow handler cannot
starve the connection or its probe.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...exceptions import ConnectionLost, Deaf
from ...message import Message
from ...metrics import count, record_probe_rtt
from ..selfpipe import drain, make_pipe, poke, wait_readable
from ..transport import Handed
from .degraded import Degraded
from .hearing import HEAR_TIMEOUT_MIN, HearCheck
from .outage import OutageLog
from .responder import CONTROL_CHANNEL, Described, answer_query
from .upkeep import Backoff, Probe, listen_to

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
        self._sub = subscriber
        backend = self._backend = subscriber.backend
        self._pending, self._targeted = pending, targeted
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
        self._position: Any = None
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
                replaying = self._position is not None and transport.resume(self._position)
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
            self._resync(wire)

    def _on_hearing(self) -> None:
        self._outage.hears_again()
        self.deaf = False
        self.last_error = None
        self.degraded.end()
        self.connected.set()

    def _resync(self, wire: str) -> None:
        channel = self._backend.channel_name(wire)
        if channel is not None and wire not in (self.probe_channel, self.control_channel):
            count(self._sub.stats, "resyncs", self._backend.name, channel)
            self.last_resync_at = time.time()
            self._pending.put(Message(channel, "", resync=True, since=self._lost_since))

    def _resync_all(self) -> int:
        """Degraded mode's turn: a resync on every channel the callbacks want."""
        wanted = self._wanted() - self.private
        for wire in sorted(wanted):
            self._resync(wire)
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
        # A transport that waited for a reply (to its LISTEN or SUBSCRIBE) may
        # have read messages along with it into its client library's buffer;
        # its socket is then no longer readable, so read once without waiting.
        buffered = True
        targets = self._backend.targets
        closed, control_r = self._closed, self.control_r
        probe_channel, control_channel = self.probe_channel, self.control_channel
        channel_name, enqueue = self._backend.channel_name, self._pending.put
        while not closed.is_set():
            # Asked each turn: a targeting transport opens its second connection on join.
            fds = transport.filenos()
            due = min(probe.due(), hearing.due())
            wait = 0.0 if buffered else due - time.monotonic()
            ready = wait_readable([*fds, control_r], max(wait, 0))
            if closed.is_set():
                return
            if control_r in ready:
                drain(control_r)
                if self.answer_requests(transport, listening):
                    hearing.after_listen()
                buffered = True
            if buffered or any(fd in ready for fd in fds):
                items = list(transport.read())
                # A transport reads in bounded batches: after a read that brought something,
                # read again before waiting (the rest may sit in its client's buffer), but
                # only after the probe below has had its turn.
                buffered = bool(items)
                if items:
                    self.last_heard = time.time()
                for item in items:
                    if isinstance(item, Handed):
                        self._targeted.take(item, enqueue)
                        continue
                    wire, payload = item
                    if payload is None:
                        # A replaying transport whose history no longer reaches back.
                        self._resync(wire)
                        continue
                    if wire == probe_channel:
                        rtt = probe.answered(payload)
                        if rtt is not None:
                            self.probe_rtt = rtt
                            record_probe_rtt(name, rtt)
                        elif hearing.answered(payload) and self.deaf:
                            self._on_hearing()
                        continue
                    if wire == control_channel:
                        answer_query(self._sub, transport, wire, payload)
                        continue
                    channel = channel_name(wire)
                    if channel is not None:
                        enqueue(Message(channel, payload))
                position = transport.position()
                if position is not None:
                    self._position = position
                if transport.heard_at:
                    probe.heard(transport.heard_at)
            if targets:
                self._targeted.settle(transport)
            now = time.monotonic()
            if probe.overdue(now):
                count(stats, "probe_failures", name)
                raise ConnectionLost(f"liveness probe not answered within {probe.timeout} s")
            if hearing.step(now, probe.answered_at, probe_channel, stats) and not probe.token:
                probe.hurry(now)  # is the session alive at all? The probe says.
            if probe.is_due(now):
                try:
                    transport.probe(probe_channel, probe.send(now))
                except Exception:
                    # A probe that cannot even be sent failed as surely as an unanswered one.
                    count(stats, "probe_failures", name)
                    raise
                stats["probes"] += 1
