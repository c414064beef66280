"""The subscriber machinery every backend shares.

A subscriber owns one listener thread. That thread alone touches the
backend's transport: it connects, LISTENs, reads, probes, and on any failure
reconnects with capped, jittered backoff and then queues one ``resync``
message per subscribed channel. Messages wait in a bounded queue until the
owner runs ``dispatch()`` (Pulp's worker does, when ``fileno()`` turns
readable in its ``select()``) or until the optional dispatcher thread started
by ``start()`` does. Callbacks therefore never run on the listener thread,
so a slow handler cannot starve the connection or its probe.

Targeted messages (a member of a group is handed one, see base.py) are held
until acknowledged: after their callbacks return, or with ``manual_ack`` when
the owner calls :meth:`Subscriber.ack` (it has finished the turn the message
started). While a subscriber holds one, it takes no other, so a busy member
leaves the next message to an idle one; a paused group's messages, and
whatever is held at close() or unsubscribe(), are given back at once.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..control_auth import Gate, policy
from ..exceptions import ConnectionLost, Deaf, InvalidChannel, PubSubError, SubscriberClosed
from ..introspection import CONTROL_CHANNEL, REPLY_PREFIX, answer_query
from ..message import Message
from ..metrics import count, record_probe_rtt, track
from ..validation import validate_group
from .base import Handed
from .hearing import HEAR_TIMEOUT_MIN, HearCheck
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
    def __init__(self, backend: BaseBackend, manual_ack: bool = False) -> None:
        # First: a bad introspection setting raises before anything is opened.
        gate = Gate(policy())
        self.backend = backend
        #: Targeted messages wait for :meth:`ack` instead of being acked after their callbacks.
        self.manual_ack = manual_ack
        self.stats: Counter[str] = Counter()
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self.last_resync_at: float | None = None
        self.probe_rtt: float | None = None
        #: The last connection failed its hear check (see Transport.hear_interval).
        self.deaf = False
        self._deaf_logged_at: float | None = None
        #: time.time() of the last proof that the connection hears: a read that brought
        #: something (a message, a probe's answer) or a confirmed LISTEN/SUBSCRIBE.
        self.last_heard: float | None = None
        # last_heard of the connection that was lost: where the next resyncs' window opens.
        self._lost_since: float | None = None
        self._pid = os.getpid()
        self._config = backend.config
        self._lock = threading.RLock()
        self._callbacks: dict[str, list[Callback]] = {}
        # Keyed by (channel, payload, resync, token): a targeted message has a
        # token of its own, so it is never folded into another.
        self._pending: OrderedDict[tuple[str, str, bool, str | None], Message] = OrderedDict()
        # Channel -> when its first message was dropped from the full queue.
        self._overflowed: dict[str, float] = {}
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
        # Targeted delivery: the groups joined per channel, the paused ones,
        # what is handed to us and not yet acked (by token), what dispatch()
        # ran and manual ack still waits for, and what the listener must ack
        # or give back on its next turn.
        self._groups: dict[str, set[str]] = {}
        self._paused: set[tuple[str, str]] = set()
        self._held: dict[str, Handed] = {}
        self._dispatched: list[Handed] = []
        self._to_ack: list[Handed] = []
        self._to_release: list[Handed] = []
        # Named after the process, so an operator (and the fault run) can tell
        # whose consumer holds a message; unique per subscriber.
        self._consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._joined: set[tuple[str, str]] = set()
        track(self)

    # -- the public contract -------------------------------------------------

    def subscribe(self, channel: str, callback: Callback, *, group: str | None = None) -> None:
        """Call ``callback(message)`` for every message on ``channel``.

        With ``group``, this subscriber also joins that targeted-delivery
        group of the channel (call again to join several): it then gets, besides
        the channel's broadcasts, the targeted messages handed to it as one of
        the group's members. On a backend that cannot target, the group's
        messages arrive as broadcasts anyway.

        Returns once the server has confirmed the subscription, or, when the
        server cannot be reached within ``connect_timeout``, at once: the
        listener keeps trying and delivers a resync when it gets through.
        """
        self._check_usable()
        wire = self.backend.wire_name(channel)
        if group is not None:
            validate_group(group)
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
            joins = group is not None and group not in self._groups.get(channel, ())
            if group is not None:
                self._groups.setdefault(channel, set()).add(group)
        if is_new or (joins and self.backend.targets):
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
            self._groups.pop(channel, None)
            self._paused = {pair for pair in self._paused if pair[0] != channel}
            for key in [key for key in self._pending if key[0] == channel]:
                del self._pending[key]
            self._give_back([h for h in self._held.values() if h.wire == wire])
            self._queued.pop(channel, None)
            self._overflowed.pop(channel, None)
        if self._listener is not None:
            self._request(wire)

    def set_accepting(self, channel: str, group: str, accepting: bool) -> None:
        """Take targeted messages of ``group`` on ``channel`` or not (busy).

        While not accepting, the subscriber stays a member but takes no new
        message of the group, and gives back at once any that reach it, so
        the group's other members get them.
        """
        self._check_usable()
        validate_group(group)
        with self._lock:
            pair = (channel, group)
            if accepting == (pair not in self._paused):
                return
            if accepting:
                self._paused.discard(pair)
            else:
                self._paused.add(pair)
        poke(self._control_w)

    def ack(self) -> int:
        """Acknowledge the targeted messages dispatched so far (``manual_ack``).

        Call it when the work they started is done or taken (Pulp's worker:
        back in its wait); a member that dies before that leaves them to be
        handed to another member after ``claim_timeout``. Returns how many.
        """
        self._check_usable()
        with self._lock:
            done, self._dispatched = self._dispatched, []
            if not done:
                return 0
            for handed in done:
                self._held.pop(handed.token, None)
            self._to_ack.extend(done)
        poke(self._control_w)
        return len(done)

    @property
    def holding(self) -> int:
        """Targeted messages handed to this subscriber and not yet acknowledged."""
        with self._lock:
            return len(self._held)

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
        settled = False
        for message, token in batch:
            with self._lock:
                callbacks = list(self._callbacks.get(message.channel, ()))
                handed = self._held.get(token) if token is not None else None
                if token is not None and handed is None:
                    continue  # given back meanwhile (unsubscribed): another member has it
                if handed is not None and (message.channel, handed.group) in self._paused:
                    # Busy: the group's other members get it.
                    self._give_back([handed])
                    settled = True
                    continue
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
            if handed is not None:
                with self._lock:
                    if self.manual_ack:
                        self._dispatched.append(handed)
                    elif self._held.pop(handed.token, None) is not None:
                        self._to_ack.append(handed)
                        settled = True
        if settled:
            poke(self._control_w)
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

    def _give_back(self, handed: list[Handed]) -> None:
        """Hand these back to their group on the listener's next turn (lock held)."""
        for item in handed:
            if self._held.pop(item.token, None) is not None:
                self._to_release.append(item)
        self._dispatched = [item for item in self._dispatched if item.token in self._held]

    def _take(self, handed: Handed) -> None:
        """A targeted message handed to us: queue it for dispatch, or give it back."""
        channel = self.backend.channel_name(handed.wire)
        with self._lock:
            if handed.token in self._held:
                return  # handed again after a reconnect: we already hold it
            self._held[handed.token] = handed
            if channel is None or not self._enqueue(
                Message(channel, handed.payload, group=handed.group), handed.token
            ):
                self._give_back([handed])
                poke(self._control_w)

    def _enqueue(self, message: Message, token: str | None = None) -> bool:
        """Queue ``message`` for dispatch; False when it was not queued."""
        key = (message.channel, message.payload, message.resync, token)
        with self._lock:
            if self._closed.is_set() or message.channel not in self._callbacks:
                return False
            if token is not None and len(self._pending) >= self._config["max_pending"]:
                return False  # never dropped: given back, for another member
            if key in self._pending:
                # Wake-ups are idempotent: an identical message already
                # waiting carries the same news.
                count(self.stats, "folded", self.backend.name, message.channel)
            elif len(self._pending) >= self._config["max_pending"]:
                # Full. The channel holding the most waiting messages pays, so a flood on
                # one channel (its handler stuck, say) cannot crowd out the others.
                [(hog, held)] = self._queued.most_common(1)
                victim = next((k for k in self._pending if k[0] == hog and k[3] is None), None)
                if victim is not None and held > self._queued[message.channel]:
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
        return True

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
        self._overflowed.setdefault(channel, time.time())

    def _take_pending(self) -> list[tuple[Message, str | None]]:
        with self._lock:
            batch = [(message, key[3]) for key, message in self._pending.items()]
            self._pending.clear()
            self._queued.clear()
            for channel, since in sorted(self._overflowed.items()):
                if not any(m.channel == channel and m.resync for m, _ in batch):
                    batch.append((Message(channel, "", resync=True, since=since), None))
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

    def _answer_requests(self, transport: Transport | None, listening: set[str]) -> bool:
        """Bring ``listening`` in line with the callbacks, then release waiters.

        Returns whether it LISTENed to a new channel.
        """
        answered = []
        added = False
        while self._requests:
            answered.append(self._requests.popleft())
        applied = False
        try:
            if transport is not None:
                wanted = self._wanted() | self._private
                if wanted - listening:
                    transport.listen(sorted(wanted - listening))
                    added = True
                if listening - wanted:
                    transport.unlisten(sorted(listening - wanted))
                listening.clear()
                listening.update(wanted)
                self._join(transport)
                applied = True
        finally:
            # Also when listen() fails: these requests have left the queue,
            # so nothing else would release their waiters before the timeout.
            for request in answered:
                request.applied = applied
                request.done.set()
        return added

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
                self._joined = set()
                # Channels whose subscribe() is waiting right now missed
                # nothing; every other channel may have, so it gets a resync.
                fresh = {r.channel for r in self._requests}
                self._answer_requests(transport, listening)
                self.last_heard = time.time()
                attempt = 0
                missed = listening - fresh - self._private
                if replaying:
                    count(self.stats, "replays", self.backend.name)
                self._on_connected(set() if replaying else missed)
                self._serve(transport, listening)
                if self.backend.targets:
                    self._farewell(transport)
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

    # -- targeted delivery (listener thread) -------------------------------------

    def _join(self, transport: Transport) -> None:
        """Make the server know this subscriber's groups before subscribe() returns."""
        if not self.backend.targets:
            return
        with self._lock:
            pairs = {
                (self.backend.wire_name(channel), group)
                for channel, groups in self._groups.items()
                for group in groups
            }
        if pairs - self._joined:
            transport.join(sorted(pairs - self._joined))
            self._joined |= pairs

    def _settle(self, transport: Transport) -> None:
        """Send the acks and give-backs dispatch() asked for; take the next messages."""
        with self._lock:
            acks, releases = list(self._to_ack), list(self._to_release)
        if acks:
            transport.ack(acks)
        if releases:
            transport.release(releases)
            count(self.stats, "released", self.backend.name)
        with self._lock:
            # Only now: a failure above leaves them for the next connection.
            del self._to_ack[: len(acks)]
            del self._to_release[: len(releases)]
            if self._held:
                members: frozenset[tuple[str, str]] = frozenset()
            else:
                members = frozenset(
                    (self.backend.wire_name(channel), group)
                    for channel, groups in self._groups.items()
                    for group in groups
                    if (channel, group) not in self._paused
                )
        transport.want(members, self._consumer)

    def _farewell(self, transport: Transport) -> None:
        """Closing: give back what we hold, so no member waits for a claim timeout."""
        try:
            with self._lock:
                self._give_back(list(self._held.values()))
                self._paused = {(c, g) for c, gs in self._groups.items() for g in gs}
            self._settle(transport)
        except PubSubError as exc:
            logger.warning(
                "Closing: could not give back targeted messages (%s); other members "
                "take them after claim_timeout.",
                exc,
            )

    def _on_connected(self, missed: set[str]) -> None:
        if self.last_error is not None and not self.deaf:
            (logger.info if self._outage_warned else logger.debug)(
                "Pub/sub %s subscriber reconnected after %.1f s.",
                self.backend.name,
                time.monotonic() - self._outage_started,
            )
        self.connected_since = time.time()
        # A subscriber found deaf stays not connected, its error standing, until a hear
        # check on a new connection comes back.
        if not self.deaf:
            self.last_error = None
            self._connected.set()
        for wire in sorted(missed):
            self._resync(wire)

    def _on_hearing(self) -> None:
        logger.info("Pub/sub %s subscriber hears again.", self.backend.name)
        self.deaf = False
        self.last_error = None
        self._connected.set()

    def _resync(self, wire: str) -> None:
        channel = self.backend.channel_name(wire)
        if channel is not None and wire not in (self._probe_channel, self._control_channel):
            count(self.stats, "resyncs", self.backend.name, channel)
            self.last_resync_at = time.time()
            self._enqueue(Message(channel, "", resync=True, since=self._lost_since))

    def _on_disconnected(self, exc: BaseException) -> None:
        # The state an observer reads (connected, deaf, last_error, the log) is
        # settled before the counters that announce the loss move.
        self._connected.clear()
        cause = f"{type(exc).__name__}: {exc}".strip()
        deaf = isinstance(exc, Deaf)
        if deaf:
            self.deaf = True
            now = time.monotonic()
            if self._deaf_logged_at is None or now - self._deaf_logged_at >= OUTAGE_LOG_INTERVAL:
                self._deaf_logged_at = now
                logger.error("%s", exc)
        elif self.last_error is None:
            self._log_outage(cause)
        self.last_error = cause
        # Only a connection that heard since the last loss moves the window's start.
        if self.last_heard is not None:
            self._lost_since = self.last_heard
        if deaf:
            count(self.stats, "deaf", self.backend.name, error=exc)
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
        """Read, probe and hear-check until the connection fails."""
        interval = self._config["probe_interval"]
        probe_timeout = self._config["probe_timeout"]
        next_probe = time.monotonic() + interval
        token: str | None = None
        sent_at = deadline = answered_at = 0.0
        hearing = HearCheck(transport, max(probe_timeout, HEAR_TIMEOUT_MIN), interval)
        # A transport that waited for a reply (to its LISTEN or SUBSCRIBE) may
        # have read messages along with it into its client library's buffer;
        # its socket is then no longer readable, so read once without waiting.
        buffered = True
        targets = self.backend.targets
        while not self._closed.is_set():
            # Asked each turn: a targeting transport opens its second connection on join.
            fds = transport.filenos()
            due = min(deadline if token else next_probe, hearing.due())
            wait = 0.0 if buffered else due - time.monotonic()
            ready = wait_readable([*fds, self._control_r], max(wait, 0))
            if self._closed.is_set():
                return
            if self._control_r in ready:
                drain(self._control_r)
                if self._answer_requests(transport, listening):
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
                        self._take(item)
                        continue
                    wire, payload = item
                    if payload is None:
                        # A replaying transport whose history no longer reaches back.
                        self._resync(wire)
                        continue
                    if wire == self._probe_channel:
                        if payload == token:
                            answered_at = time.monotonic()
                            self.probe_rtt = answered_at - sent_at
                            record_probe_rtt(self.backend.name, self.probe_rtt)
                            token = None
                        elif hearing.answered(payload) and self.deaf:
                            self._on_hearing()
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
            if targets:
                self._settle(transport)
            now = time.monotonic()
            if token and now >= deadline:
                count(self.stats, "probe_failures", self.backend.name)
                raise ConnectionLost(f"liveness probe not answered within {probe_timeout} s")
            if hearing.step(now, answered_at, self._probe_channel, self.stats) and not token:
                next_probe = now  # is the session alive at all? The probe says.
            if not token and now >= next_probe:
                token = uuid.uuid4().hex
                sent_at, deadline, next_probe = now, now + probe_timeout, now + interval
                try:
                    transport.probe(self._probe_channel, token)
                except Exception:
                    # A probe that cannot even be sent failed as surely as an unanswered one.
                    count(self.stats, "probe_failures", self.backend.name)
                    raise
                self.stats["probes"] += 1

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
