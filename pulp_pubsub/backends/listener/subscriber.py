"""The subscriber every backend hands out: the public contract, composed of three parts.

A subscriber owns one listener thread, which alone touches the backend's transport
(:mod:`.loop`). Messages it reads wait in a bounded queue (:mod:`.pending`) until the
owner runs ``dispatch()`` (Pulp's worker does, when ``fileno()`` turns readable in its
``select()``) or until the optional dispatcher thread started by ``start()`` does.
Callbacks therefore never run on the listener thread, so a slow handler cannot starve the
connection or its probe. Targeted messages (a member of a group is handed one, see
base.py) are held until acknowledged (:mod:`.targeted`).

The three parts share this subscriber's one lock, because a message moves between them
atomically: a targeted message is held and queued, or given back, under one lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...control_auth import Gate, policy
from ...exceptions import InvalidChannel, SubscriberClosed
from ...message import Message
from ...metrics import track
from ...validation import validate_group
from ..perprocess import Origin
from ..selfpipe import close_fds, poke
from .loop import PROBE_PREFIX, Loop
from .pending import Pending
from .responder import CONTROL_CHANNEL, REPLY_PREFIX
from .targeted import Targeted

if TYPE_CHECKING:
    from types import TracebackType

    from ..transport import SubscribedBackend

Callback = Callable[[Message], Any]

#: Private channels of the layer; a callback there would never be called.
RESERVED_PREFIXES = (PROBE_PREFIX, REPLY_PREFIX)


class Subscriber:
    def __init__(self, backend: SubscribedBackend, manual_ack: bool = False) -> None:
        # First: a bad introspection setting raises before anything is opened.
        gate = Gate(policy())
        self.backend = backend
        self.stats: Counter[str] = Counter()
        #: Turns away what may not be answered on the control channel.
        self.control_gate = gate
        self._origin = Origin()
        self._config = backend.config
        self._lock = threading.RLock()
        self._callbacks: dict[str, list[Callback]] = {}
        self._closed = threading.Event()
        self._pipes_closed = False
        self._threads_alive = 0
        self._listener: threading.Thread | None = None
        self._dispatcher: threading.Thread | None = None
        self._pending = Pending(
            self._lock,
            self._callbacks,
            self._closed,
            self.stats,
            backend.name,
            self._config["max_pending"],
        )
        self._targeted = Targeted(backend, self._lock, self.stats, self._wake, manual_ack)
        self._loop = Loop(self, self._pending, self._targeted, self._wanted, self._closed)
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
            joins = group is not None and self._targeted.add(channel, group)
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
            self._pending.forget(channel)
            self._targeted.forget(channel, wire)
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
        if self._targeted.set_accepting(channel, group, accepting):
            self._wake()

    def ack(self) -> int:
        """Acknowledge the targeted messages dispatched so far (``manual_ack``).

        Call it when the work they started is done or taken (Pulp's worker:
        back in its wait); a member that dies before that leaves them to be
        handed to another member after ``claim_timeout``. Returns how many.
        """
        self._check_usable()
        acked = self._targeted.ack()
        if acked:
            self._wake()
        return acked

    @property
    def manual_ack(self) -> bool:
        """Targeted messages wait for :meth:`ack` instead of being acked after their callbacks."""
        return self._targeted.manual_ack

    @property
    def holding(self) -> int:
        """Targeted messages handed to this subscriber and not yet acknowledged."""
        return self._targeted.holding

    @property
    def channels(self) -> list[str]:
        with self._lock:
            return sorted(self._callbacks)

    @property
    def connected(self) -> bool:
        return self._loop.connected.is_set()

    @property
    def last_error(self) -> str | None:
        return self._loop.last_error

    @property
    def connected_since(self) -> float | None:
        return self._loop.connected_since

    @property
    def last_resync_at(self) -> float | None:
        return self._loop.last_resync_at

    @property
    def probe_rtt(self) -> float | None:
        return self._loop.probe_rtt

    @property
    def degraded_since(self) -> float | None:
        """time.time() this subscriber went degraded (periodic resyncs while its server is
        unreachable, see the ``outage_interval`` option), or None while push delivery works."""
        return self._loop.degraded.since

    @property
    def deaf(self) -> bool:
        """The last connection failed its hear check (see Transport.hear_interval)."""
        return self._loop.deaf

    @property
    def last_heard(self) -> float | None:
        """time.time() of the last proof that the connection hears.

        A read that brought something (a message, a probe's answer) or a confirmed
        LISTEN/SUBSCRIBE.
        """
        return self._loop.last_heard

    @property
    def closed(self) -> bool:
        """Closed, or inherited through fork() and so unusable here."""
        return self._closed.is_set() or not self._origin.here()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until the listener holds a live connection; False on timeout."""
        self._check_usable()
        self._ensure_listener()
        return self._loop.connected.wait(timeout)

    def fileno(self) -> int:
        """A descriptor that is readable while messages wait for dispatch().

        With the ``owner_reads`` option (the default, on Linux) it is also readable while
        the connection has data, which dispatch() then reads in the calling thread: a
        message wakes the owner alone, not the listener thread first. Until start().
        """
        self._check_usable()
        if self._dispatcher is not None:
            return self._pending.signal_r
        return self._loop.attach(self._pending.signal_r)

    def dispatch(self, timeout: float | None = 0) -> int:
        """Run the callbacks of waiting messages in the calling thread.

        Waits up to ``timeout`` seconds (None: forever) for a message first;
        returns how many messages were dispatched.
        """
        self._check_usable()
        dispatcher = self._dispatcher
        if (
            dispatcher is None or threading.current_thread() is not dispatcher
        ) and self._loop.owner_wait(timeout):
            timeout = 0  # waited already, on the owner's descriptor
        return self._pending.dispatch(timeout, self._targeted)

    def start(self) -> Subscriber:
        """Run callbacks on a background thread instead of through dispatch()."""
        self._check_usable()
        self._ensure_listener()
        self._loop.detach()
        with self._lock:
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._dispatch_forever, name="pubsub-dispatcher", daemon=True
                )
                self._threads_alive += 1
                self._dispatcher.start()
        return self

    def close(self) -> None:
        if not self._origin.here():
            # A copy inherited through fork(): the connection belongs to the
            # parent, so only this process's ends of the pipes are released.
            self._closed.set()
            self._close_pipes()
            return
        if self._closed.is_set():
            return
        self._closed.set()
        self._wake()
        poke(self._pending.signal_w)
        current = threading.current_thread()
        wait = self._config["connect_timeout"] + 1
        for thread in (self._listener, self._dispatcher):
            if thread is not None and thread is not current:
                thread.join(wait)
        self._loop.connected.clear()
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

    # -- threads and pipes -------------------------------------------------------

    def _check_usable(self) -> None:
        if not self._origin.here():
            raise SubscriberClosed(
                f"This subscriber belongs to process {self._origin.pid}; "
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

    def _listen_forever(self) -> None:
        try:
            self._loop.run()
        finally:
            self._release_pipes(exiting=True)

    def _request(self, wire: str) -> None:
        request = self._loop.ask(wire)
        self._ensure_listener()
        self._wake()
        request.done.wait(self._config["connect_timeout"] * 2 + 1)

    def _wake(self) -> None:
        self._loop.wake()

    def _wanted(self) -> set[str]:
        with self._lock:
            return {self.backend.wire_name(channel) for channel in self._callbacks}

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
        pending, loop = self._pending, self._loop
        close_fds(pending.signal_r, pending.signal_w, loop.control_r, loop.control_w)
        loop.close_watch()
