"""The subscriber machinery every backend shares.

A subscriber owns one listener thread. That thread alone touches the
backend's transport: it connects, LISTENs, reads, probes, and on any failure
reconnects with capped, jittered backoff and then queues one ``resync``
message per subscribed channel. Messages wait in a bounded queue until the
owner runs ``dispatch()`` (Pulp's worker does, when ``fileno()`` turns
readable in its ``select()``) or until the optional dispatcher thread started
by ``start()`` does. Callbacks therefore never run on the listener thread,
so a slow handler cannot starve the connection or its probe.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..control_auth import Gate, policy
from ..exceptions import ConnectionLost, InvalidChannel, SubscriberClosed
from ..introspection import CONTROL_CHANNEL, REPLY_PREFIX, answer_query
from ..message import Message
from ..metrics import count, record_probe_rtt, track
from .selfpipe import close_fds, drain, make_pipe, poke, wait_readable

if TYPE_CHECKING:
    from types import TracebackType

    from .base import BaseBackend, Transport

logger = logging.getLogger(__name__)

Callback = Callable[[Message], Any]

PROBE_PREFIX = "pubsub_probe_"
#: Private channels of the layer; a callback there would never be called.
RESERVED_PREFIXES = (PROBE_PREFIX, REPLY_PREFIX)
#: At most one WARNING about a lost connection per subscriber in this many
#: seconds, so a flapping connection or a long outage does not flood the log.
OUTAGE_LOG_INTERVAL = 60.0


@dataclass
class _Request:
    """A subscribe or unsubscribe waiting for the listener thread."""

    channel: str | None
    done: threading.Event = field(default_factory=threading.Event)
    applied: bool = False


class Subscriber:
    def __init__(self, backend: BaseBackend) -> None:
        # First: a bad introspection setting raises before anything is opened.
        gate = Gate(policy())
        self.backend = backend
        self.stats: Counter[str] = Counter()
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self.last_resync_at: float | None = None
        self.probe_rtt: float | None = None
        self._pid = os.getpid()
        self._config = backend.config
        self._lock = threading.RLock()
        self._callbacks: dict[str, list[Callback]] = {}
        self._pending: OrderedDict[tuple[str, str, bool], Message] = OrderedDict()
        self._overflowed: set[str] = set()
        # How many of the pending messages each channel holds, to know who floods.
        self._queued: Counter[str] = Counter()
        self._signalled = False
        self._signal_r, self._signal_w = make_pipe()
        self._control_r, self._control_w = make_pipe()
        self._requests: deque[_Request] = deque()
        self._closed = threading.Event()
        self._pipes_closed = False
        self._threads_alive = 0
        self._connected = threading.Event()
        self._listener: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None
        self._probe_channel = backend.wire_name(PROBE_PREFIX + uuid.uuid4().hex[:12])
        self._control_channel = backend.wire_name(CONTROL_CHANNEL)
        #: Turns away what may not be answered on the control channel.
        self.control_gate = gate
        # With introspection off, the control channel is not even listened
        # to: a query then wakes no subscriber at all.
        self._private = {self._probe_channel}
        if self.control_gate.policy.answers:
            self._private.add(self._control_channel)
        self._outage_started = 0.0
        self._outage_warned = False
        self._warned_at: float | None = None
        self._quiet_outages = 0
        # The replay position of the last transport (None: the engine keeps no history).
        self._position: Any = None
        track(self)

    # -- the public contract -------------------------------------------------

    def subscribe(self, channel: str, callback: Callback) -> None:
        """Call ``callback(message)`` for every message on ``channel``.

        Returns once the server has confirmed the subscription, or, when the
        server cannot be reached within ``connect_timeout``, at once: the
        listener keeps trying and delivers a resync when it gets through.
        """
        self._check_usable()
        wire = self.backend.wire_name(channel)
        if channel == CONTROL_CHANNEL or channel.startswith(RESERVED_PREFIXES):
            raise InvalidChannel(
                f"The channel name {channel!r} is reserved for the layer's own probes and "
                "introspection."
            )
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        with self._lock:
            callbacks = self._callbacks.setdefault(channel, [])
            is_new = not callbacks
            if callback not in callbacks:
                callbacks.append(callback)
        if is_new:
            self._request(wire)

    def unsubscribe(self, channel: str, callback: Callback | None = None) -> None:
        """Remove one callback, or every callback of ``channel`` when None."""
        self._check_usable()
        wire = self.backend.wire_name(channel)
        with self._lock:
            callbacks = self._callbacks.get(channel, [])
            if callback is None:
                callbacks.clear()
            elif callback in callbacks:
                callbacks.remove(callback)
            if callbacks:
                return
            self._callbacks.pop(channel, None)
            for key in [key for key in self._pending if key[0] == channel]:
                del self._pending[key]
            self._queued.pop(channel, None)
            self._overflowed.discard(channel)
        if self._listener is not None:
            self._request(wire)

    @property
    def channels(self) -> list[str]:
        with self._lock:
            return sorted(self._callbacks)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def closed(self) -> bool:
        """Closed, or inherited through fork() and so unusable here."""
        return self._closed.is_set() or self._pid != os.getpid()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until the listener holds a live connection; False on timeout."""
        self._check_usable()
        self._ensure_listener()
        return self._connected.wait(timeout)

    def fileno(self) -> int:
        """A descriptor that is readable exactly while messages wait for dispatch()."""
        self._check_usable()
        return self._signal_r

    def dispatch(self, timeout: float | None = 0) -> int:
        """Run the callbacks of waiting messages in the calling thread.

        Waits up to ``timeout`` seconds (None: forever) for a message first;
        returns how many messages were dispatched.
        """
        self._check_usable()
        if timeout != 0 and not self._has_pending():
            wait_readable([self._signal_r], timeout)
        batch = self._take_pending()
        for message in batch:
            with self._lock:
                callbacks = list(self._callbacks.get(message.channel, ()))
            for callback in callbacks:
                try:
                    callback(message)
                except Exception as exc:
                    count(
                        self.stats, "handler_errors", self.backend.name, message.channel, error=exc
                    )
                    logger.exception(
                        "Handler %r failed on channel %r; the listener goes on.",
                        callback,
                        message.channel,
                    )
            count(self.stats, "delivered", self.backend.name, message.channel)
        return len(batch)

    def start(self) -> Subscriber:
        """Run callbacks on a background thread instead of through dispatch()."""
        self._check_usable()
        self._ensure_listener()
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._dispatch_forever, name="pubsub-dispatcher", daemon=True
                )
                self._threads_alive += 1
                self._dispatcher.start()
        return self

    def close(self) -> None:
        if self._pid != os.getpid():
            # A copy inherited through fork(): the connection belongs to the
            # parent, so only this process's ends of the pipes are released.
            self._closed.set()
            self._close_pipes()
            return
        if self._closed.is_set():
            return
        self._closed.set()
        poke(self._control_w)
        poke(self._signal_w)
        current = threading.current_thread()
        wait = self._config["connect_timeout"] + 1
        for thread in (self._listener, self._dispatcher):
            if thread is not None and thread is not current:
                thread.join(wait)
        self._connected.clear()
        self._release_pipes()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed.is_set() else "connected" if self.connected else "idle"
        return f"<Subscriber {self.backend.name} {state} channels={self.channels}>"

    # -- pending queue ---------------------------------------------------------

    def _has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending or self._overflowed)

    def _enqueue(self, message: Message) -> None:
        key = (message.channel, message.payload, message.resync)
        with self._lock:
            if self._closed.is_set() or message.channel not in self._callbacks:
                return
            if key in self._pending:
                # Wake-ups are idempotent: an identical message already
                # waiting carries the same news.
                count(self.stats, "folded", self.backend.name, message.channel)
            elif len(self._pending) >= self._config["max_pending"]:
                # Full. The channel holding the most waiting messages pays, so a flood on
                # one channel (its handler stuck, say) cannot crowd out the others.
                [(hog, held)] = self._queued.most_common(1)
                if held > self._queued[message.channel]:
                    victim = next(k for k in self._pending if k[0] == hog)
                    del self._pending[victim]
                    self._queued[hog] -= 1
                    self._drop(hog)
                    self._pending[key] = message
                    self._queued[message.channel] += 1
                    count(self.stats, "received", self.backend.name, message.channel)
                else:
                    self._drop(message.channel)
            else:
                self._pending[key] = message
                self._queued[message.channel] += 1
                count(self.stats, "received", self.backend.name, message.channel)
            if not self._signalled:
                self._signalled = True
                poke(self._signal_w)

    def _drop(self, channel: str) -> None:
        """Count a message of ``channel`` dropped; it gets a resync instead (lock held)."""
        count(self.stats, "dropped", self.backend.name, channel)
        if channel not in self._overflowed:
            logger.warning(
                "Subscriber queue full (%d waiting): dropping messages on %r "
                "and queueing a resync for it.",
                len(self._pending),
                channel,
            )
        self._overflowed.add(channel)

    def _take_pending(self) -> list[Message]:
        with self._lock:
            batch = list(self._pending.values())
            self._pending.clear()
            self._queued.clear()
            for channel in sorted(self._overflowed):
                if not any(m.channel == channel and m.resync for m in batch):
                    batch.append(Message(channel, "", resync=True))
                    count(self.stats, "resyncs", self.backend.name, channel)
            self._overflowed.clear()
            if self._signalled:
                drain(self._signal_r)
                self._signalled = False
        return batch

    def _dispatch_forever(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    self.dispatch(timeout=None)
                except (SubscriberClosed, OSError, ValueError):
                    if self._closed.is_set():
                        return
                    raise
        finally:
            self._release_pipes(exiting=True)

    # -- the listener thread ---------------------------------------------------

    def _check_usable(self) -> None:
        if self._pid != os.getpid():
            raise SubscriberClosed(
                f"This subscriber belongs to process {self._pid}; "
                "create a new one in the forked process."
            )
        if self._closed.is_set():
            raise SubscriberClosed("This subscriber is closed.")

    def _ensure_listener(self) -> None:
        with self._lock:
            if self._listener is None:
                self._listener = threading.Thread(
                    target=self._listen_forever,
                    name=f"pubsub-listener-{self.backend.name}",
                    daemon=True,
                )
                self._threads_alive += 1
                self._listener.start()

    def _request(self, wire: str) -> None:
        request = _Request(wire)
        # Queued before the listener starts, so its first connect knows this
        # subscribe is waiting and owes it no resync.
        self._requests.append(request)
        self._ensure_listener()
        poke(self._control_w)
        request.done.wait(self._config["connect_timeout"] * 2 + 1)

    def _wanted(self) -> set[str]:
        with self._lock:
            return {self.backend.wire_name(channel) for channel in self._callbacks}

    def _answer_requests(self, transport: Transport | None, listening: set[str]) -> None:
        """Bring ``listening`` in line with the callbacks, then release waiters."""
        answered = []
        while self._requests:
            answered.append(self._requests.popleft())
        applied = False
        try:
            if transport is not None:
                wanted = self._wanted() | self._private
                if wanted - listening:
                    transport.listen(sorted(wanted - listening))
                if listening - wanted:
                    transport.unlisten(sorted(listening - wanted))
                listening.clear()
                listening.update(wanted)
                applied = True
        finally:
            # Also when listen() fails: these requests have left the queue,
            # so nothing else would release their waiters before the timeout.
            for request in answered:
                request.applied = applied
                request.done.set()

    def _listen_forever(self) -> None:
        try:
            self._reconnect_forever()
        finally:
            self._release_pipes(exiting=True)

    def _reconnect_forever(self) -> None:
        attempt = 0
        while not self._closed.is_set():
            transport: Transport | None = None
            try:
                transport = self.backend.open_transport()
                # An engine with history replays the gap itself: no resync owed.
                replaying = self._position is not None and transport.resume(self._position)
                listening: set[str] = set()
                # Channels whose subscribe() is waiting right now missed
                # nothing; every other channel may have, so it gets a resync.
                fresh = {r.channel for r in self._requests}
                self._answer_requests(transport, listening)
                attempt = 0
                missed = listening - fresh - self._private
                if replaying:
                    count(self.stats, "replays", self.backend.name)
                self._on_connected(set() if replaying else missed)
                self._serve(transport, listening)
            except Exception as exc:
                if self._closed.is_set():
                    break
                self._on_disconnected(exc)
            finally:
                self._connected.clear()
                if transport is not None:
                    try:
                        transport.close()
                    except Exception:
                        logger.debug("Closing a dead transport failed", exc_info=True)
            if self._closed.is_set():
                break
            self._backoff(attempt)
            attempt += 1

    def _on_connected(self, missed: set[str]) -> None:
        if self.last_error is not None:
            (logger.info if self._outage_warned else logger.debug)(
                "Pub/sub %s subscriber reconnected after %.1f s.",
                self.backend.name,
                time.monotonic() - self._outage_started,
            )
        self.last_error = None
        self.connected_since = time.time()
        self._connected.set()
        for wire in sorted(missed):
            self._resync(wire)

    def _resync(self, wire: str) -> None:
        channel = self.backend.channel_name(wire)
        if channel is not None and wire not in (self._probe_channel, self._control_channel):
            count(self.stats, "resyncs", self.backend.name, channel)
            self.last_resync_at = time.time()
            self._enqueue(Message(channel, "", resync=True))

    def _on_disconnected(self, exc: BaseException) -> None:
        cause = f"{type(exc).__name__}: {exc}".strip()
        if self.last_error is None:
            self._log_outage(cause)
        self.last_error = cause
        count(self.stats, "reconnects", self.backend.name, error=exc)
        self._answer_requests(None, set())

    def _log_outage(self, cause: str) -> None:
        """One WARNING with the cause per outage, and at most one per interval.

        An outage whose warning is held back is counted and named in the next
        warning; its recovery is then logged at DEBUG, not INFO.
        """
        now = self._outage_started = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < OUTAGE_LOG_INTERVAL:
            self._quiet_outages += 1
            self._outage_warned = False
            logger.debug("Pub/sub %s subscriber lost its connection: %s", self.backend.name, cause)
            return
        quiet = self._quiet_outages
        logger.warning(
            "Pub/sub %s subscriber lost its connection (%s); reconnecting.%s",
            self.backend.name,
            cause,
            f" {quiet} more outage(s) since the last warning were not logged." if quiet else "",
        )
        self._warned_at, self._quiet_outages, self._outage_warned = now, 0, True

    def _backoff(self, attempt: int) -> None:
        low, high = self._config["reconnect_min"], self._config["reconnect_max"]
        delay = min(high, low * 2**attempt) * random.uniform(0.5, 1.0)
        deadline = time.monotonic() + delay
        while not self._closed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready = wait_readable([self._control_r], left)
            if ready:
                drain(self._control_r)
                # Nothing to subscribe on yet: release waiters now; the
                # channel is listened to (and resynced) on reconnect.
                self._answer_requests(None, set())

    def _serve(self, transport: Transport, listening: set[str]) -> None:
        interval = self._config["probe_interval"]
        probe_timeout = self._config["probe_timeout"]
        next_probe = time.monotonic() + interval
        token: str | None = None
        sent_at = deadline = 0.0
        # A transport that waited for a reply (to its LISTEN or SUBSCRIBE) may
        # have read messages along with it into its client library's buffer;
        # its socket is then no longer readable, so read once without waiting.
        buffered = True
        while not self._closed.is_set():
            wait = 0.0 if buffered else (deadline if token else next_probe) - time.monotonic()
            ready = wait_readable([transport.fileno(), self._control_r], max(wait, 0))
            if self._closed.is_set():
                return
            if self._control_r in ready:
                drain(self._control_r)
                self._answer_requests(transport, listening)
                buffered = True
            if buffered or transport.fileno() in ready:
                buffered = False
                for wire, payload in transport.read():
                    if payload is None:
                        # A replaying transport whose history no longer reaches back.
                        self._resync(wire)
                        continue
                    if wire == self._probe_channel:
                        if payload == token:
                            self.probe_rtt = time.monotonic() - sent_at
                            record_probe_rtt(self.backend.name, self.probe_rtt)
                            token = None
                        continue
                    if wire == self._control_channel:
                        answer_query(self, transport, wire, payload)
                        continue
                    channel = self.backend.channel_name(wire)
                    if channel is not None:
                        self._enqueue(Message(channel, payload))
                position = transport.position()
                if position is not None:
                    self._position = position
            now = time.monotonic()
            if token and now >= deadline:
                count(self.stats, "probe_failures", self.backend.name)
                raise ConnectionLost(f"liveness probe not answered within {probe_timeout} s")
            if not token and now >= next_probe:
                token = uuid.uuid4().hex
                sent_at, deadline, next_probe = now, now + probe_timeout, now + interval
                transport.probe(self._probe_channel, token)

    def _release_pipes(self, exiting: bool = False) -> None:
        """Close the pipes once closed and no thread of ours can touch them.

        Closing earlier could let a late thread read or write a descriptor
        number the process has meanwhile reused for something else.
        """
        with self._lock:
            if exiting:
                self._threads_alive -= 1
            if not self._closed.is_set() or self._threads_alive or self._pipes_closed:
                return
            self._pipes_closed = True
        self._close_pipes()

    def _close_pipes(self) -> None:
        close_fds(self._signal_r, self._signal_w, self._control_r, self._control_w)
