"""The backend contract.

A backend supplies two things: ``send()``, which hands one message to the
server, and ``open_transport()``, which opens one subscriber connection. All
the rest (validation, publish-on-commit, the listener thread, the pending
queue, reconnecting and resyncing, the liveness probe) is shared and lives in
this module and in :mod:`pulp_pubsub.backends.listener`, so a new backend is
one short module that knows only its server. The subscriber connection's side
of the contract, ``Transport`` (and ``Handed``), is in :mod:`.transport`, below
both this module and the listener, and is re-exported here.

Targeted (work-queue) delivery is optional: a backend that can hand a message
to a bounded number of a group's members sets ``targets = True`` (on the class,
or on the instance when its configuration decides) and supplies
``send_targeted()`` and the transport's ``want()``/``ack()``/``release()``;
every other backend sends a targeted publish as a broadcast (the default here).

Publishes deferred to a commit leave the committing thread: an
:class:`~pulp_pubsub.backends.aftercommit.AfterCommitSender` of the
backend's own hands them to ``send_batch()`` in order, which by default sends
them one by one and which a backend that can send several in one round trip
overrides. A backend whose server defers them itself (``defers_natively``)
never gets there; one that sets ``after_commit_thread = False`` sends them on
the committing thread.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import Counter
from collections.abc import Collection, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils.connection import ConnectionDoesNotExist

from ..conf import Options, hide_password, secret_url
from ..exceptions import PublishError, PubSubError
from ..metrics import count
from ..validation import (
    check_payload_fits,
    validate_channel,
    validate_group,
    validate_prefix,
    validate_receivers,
)
from .aftercommit import AfterCommitSender, Deferred, Report
from .perprocess import PerProcess
from .transport import Handed, Transport

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

    from .listener import Subscriber

logger = logging.getLogger(__name__)

#: Options every backend accepts; a backend adds its own in ``options``.
COMMON_OPTIONS: dict[str, Any] = {
    # Seconds between liveness probes, and how long a probe may take to come back.
    "probe_interval": 30.0,
    "probe_timeout": 10.0,
    # Reconnect backoff: doubles from the first value up to the cap, with jitter.
    "reconnect_min": 0.1,
    "reconnect_max": 5.0,
    "connect_timeout": 5.0,
    "publish_timeout": 5.0,
    # Publishes deferred to commit leave a process at most once per this many seconds
    # (the first after a quiet spell at once): fewer round trips when commits are many.
    "send_interval": 0.02,
    # Messages waiting for dispatch() per subscriber before new ones are dropped
    # (a dropped message is replaced by a resync for its channel, never lost silently).
    "max_pending": 1000,
    # Targeted delivery: a message handed to a member that has not acknowledged it
    # within this many seconds (it died, hangs or is busy) goes to another member.
    "claim_timeout": 4.0,
    # Degraded mode: while a subscriber cannot reach its server, a resync on each of its
    # channels every this many seconds (jittered down by up to a quarter), so its owner
    # keeps looking for work until push delivery is back; 0 turns it off.
    "outage_interval": 5.0,
    # An owner that waits in select() on fileno() reads the connection itself in dispatch(),
    # so a message wakes one thread, not the listener's and then the owner's; False: the
    # listener thread reads and hands over through the signal pipe.
    "owner_reads": True,
}

#: Channels whose wire names a backend remembers (a process uses a handful).
WIRE_CACHE_SIZE = 1024
#: Numeric options where 0 means "off" rather than a mistake.
MAY_BE_ZERO = frozenset({"send_interval", "outage_interval"})

__all__ = ["COMMON_OPTIONS", "BaseBackend", "Handed", "Transport"]

BROADCAST = "broadcast"
TARGETED = "targeted"


class BaseBackend:
    #: The ``PUBSUB_BACKEND`` alias, used in messages and metrics.
    name: ClassVar[str] = "base"
    #: Largest payload in UTF-8 bytes, or None for no limit of the layer's own.
    #: An instance may set it from its options (ZooKeeper's follows jute.maxbuffer).
    payload_limit: int | None = None
    allows_nul: ClassVar[bool] = True
    #: True when the server itself holds a publish back until the Django
    #: transaction commits (PostgreSQL's NOTIFY), so on_commit is not needed.
    #: An instance may decide it from its configuration.
    defers_natively: bool = False
    #: The Django database alias whose transactions publish() follows.
    database_alias: str = DEFAULT_DB_ALIAS
    #: Backend-specific options and their defaults.
    options: ClassVar[dict[str, Any]] = {}
    #: True when the backend delivers targeted messages itself; otherwise a
    #: targeted publish is a broadcast (every subscriber of the channel gets it).
    #: An instance may decide it from its configuration (NATS targets with JetStream only).
    targets: bool = False
    #: True: publishes deferred to commit are sent from a thread of their own
    #: (see :meth:`send_batch`), so a commit never waits for the server.
    after_commit_thread: ClassVar[bool] = True

    def __init__(
        self,
        url: str | None = None,
        options: dict[str, Any] | None = None,
        channel_prefix: str = "",
        publish_on_commit: bool = True,
    ) -> None:
        self.url = secret_url(url)
        self.channel_prefix = validate_prefix(channel_prefix)
        self.publish_on_commit = publish_on_commit
        self.config = self.build_options(options or {})
        self.stats: Counter[str] = Counter()
        self._subscribers: weakref.WeakSet[Subscriber] = weakref.WeakSet()
        self._lock = threading.Lock()
        # A forked child makes its own: the parent's thread is not in it.
        self._sender: PerProcess[AfterCommitSender] = PerProcess(
            self._new_sender, AfterCommitSender.close
        )
        # Channel -> wire name, for names already checked: every publish needs one.
        self._wires: dict[str, str] = {}

    @classmethod
    def build_options(cls, given: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(given, dict):
            raise ImproperlyConfigured(
                f"PUBSUB_OPTIONS must be a dict, not {type(given).__name__}."
            )
        known = {**COMMON_OPTIONS, **cls.options}
        for key, value in given.items():
            if key not in known:
                raise ImproperlyConfigured(
                    f"Invalid option {key!r} for {cls.__name__}; "
                    f"valid options are: {', '.join(sorted(known))}."
                )
            default = known[key]
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            zero_ok = key in MAY_BE_ZERO
            if key in COMMON_OPTIONS and isinstance(default, bool) and not isinstance(value, bool):
                raise ImproperlyConfigured(
                    f"Option {key!r} for {cls.__name__} must be True or False, not {value!r}."
                )
            if numeric and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or value < 0
                or (value == 0 and not zero_ok)
            ):
                kind = "a number >= 0" if zero_ok else "a positive number"
                raise ImproperlyConfigured(
                    f"Option {key!r} for {cls.__name__} must be {kind}, not {value!r}."
                )
        return Options({**known, **given})

    # -- names ---------------------------------------------------------------

    def wire_name(self, channel: str) -> str:
        """The name on the server: the prefix and the channel, checked together."""
        wire = self._wires.get(channel) if type(channel) is str else None
        if wire is not None:
            return wire
        validate_channel(channel)
        wire = self.channel_prefix + channel
        if wire != channel:
            validate_channel(wire, what="prefixed channel name")
        if len(self._wires) < WIRE_CACHE_SIZE:
            self._wires[channel] = wire
        return wire

    def channel_name(self, wire: str) -> str | None:
        """Undo :meth:`wire_name`; None for a name outside this install's prefix."""
        if not wire.startswith(self.channel_prefix):
            return None
        return wire[len(self.channel_prefix) :]

    def count_published(self, wires: Iterable[str]) -> None:
        """Count a batch's sent messages, one call per distinct channel.

        A batch sent after commit usually carries one channel many times.
        """
        for wire, n in Counter(wires).items():
            count(self.stats, "published", self.name, self.channel_name(wire), n=n)

    # -- publishing ----------------------------------------------------------

    def publish(
        self, channel: str, payload: str = "", *, group: str | None = None, receivers: int = 1
    ) -> None:
        """Send ``payload`` to ``channel``, at commit when inside ``atomic()``.

        With ``group``, the message is targeted: it goes to ``receivers``
        members of that group among the channel's subscribers (each to a
        different member while there are enough of them), not to everyone.
        A backend that cannot target broadcasts it once instead.
        """
        wire = self._checked(channel, payload, group, receivers)
        if self.publish_on_commit and not self.defers_natively:
            atomic = _atomic_connection(self.database_alias)
            if atomic is not None:
                item = Deferred(wire, payload, group, receivers)
                atomic.on_commit(partial(self._send_deferred, item))
                return
        self._send_now(wire, payload, group, receivers, channel)

    def publish_soon(
        self,
        channel: str,
        payload: str = "",
        *,
        group: str | None = None,
        receivers: int = 1,
        report: Report | None = None,
    ) -> None:
        """Like :meth:`publish`, for a message about rows already committed (or committed
        with the caller's transaction), returning before the server has it.

        A dispatcher that creates many rows in a row would otherwise wait one
        round trip per row for its wake-ups, and on a busy machine each wait
        costs a turn of the scheduler as well. Bad input still raises here;
        the message then leaves through the after-commit sender, in order
        with every other deferred publish, and :meth:`flush` waits for it.
        A failure on the wire never raises: it is counted, and handed to
        ``report`` (called with None once the message is sent), or logged
        when there is no ``report``. On a backend whose server defers
        publishes to commit itself, inside ``atomic()`` this is :meth:`publish`.
        """
        wire = self._checked(channel, payload, group, receivers)
        item = Deferred(wire, payload, group, receivers, report)
        atomic = _atomic_connection(self.database_alias) if self.publish_on_commit else None
        if atomic is None:
            self._send_deferred(item)
        elif not self.defers_natively:
            atomic.on_commit(partial(self._send_deferred, item))
        else:
            self._send_committed(item)

    def _checked(self, channel: str, payload: str, group: str | None, receivers: int) -> str:
        """The wire name of a valid publish; raises on bad input, having sent nothing."""
        wire = self.wire_name(channel)
        check_payload_fits(
            payload, limit=self.payload_limit, allow_nul=self.allows_nul, backend=self.name
        )
        if group is not None:
            validate_group(group)
            validate_receivers(receivers)
        return wire

    def delivery(self, group: str | None) -> str:
        """What a publish to ``group`` gets here: ``"targeted"`` or ``"broadcast"``."""
        return TARGETED if group is not None and self.targets else BROADCAST

    def in_atomic_block(self) -> bool:
        """Whether the caller is inside ``atomic()`` on :attr:`database_alias`."""
        return _atomic_connection(self.database_alias) is not None

    def _send_now(
        self,
        wire: str,
        payload: str,
        group: str | None = None,
        receivers: int = 1,
        channel: str | None = None,
    ) -> None:
        """Send now; ``channel``, when the caller has it, spares undoing the wire name."""
        try:
            if group is not None and self.targets:
                self.send_targeted(wire, payload, group, receivers)
            else:
                self.send(wire, payload)
        except PublishError as exc:
            count(self.stats, "publish_errors", self.name, self.channel_name(wire), error=exc)
            raise
        except Exception as exc:
            # Also another PubSubError (a backend's ConnectionLost): the contract promises
            # callers a PublishError, the one exception they need to catch.
            count(self.stats, "publish_errors", self.name, self.channel_name(wire), error=exc)
            raise PublishError(f"{self.name} backend could not publish: {exc}") from exc
        count(self.stats, "published", self.name, channel or self.channel_name(wire))

    def _send_deferred(self, item: Deferred) -> None:
        # Off the committing thread: its failure cannot reach the caller anyway.
        # When the sender's queue is full, this thread sends it itself.
        if not self.after_commit_thread or not self._sender.get().put(item):
            self._send_committed(item)

    def _new_sender(self) -> AfterCommitSender:
        return AfterCommitSender(
            self.send_batch, self.config["publish_timeout"] * 2, self.config["send_interval"]
        )

    def _send_committed(self, item: Deferred) -> None:
        # The transaction has committed: raising here would hide the commit
        # from the caller, so the failure is logged and counted instead.
        try:
            self._send_now(item.wire, item.payload, item.group, item.receivers)
        except PubSubError as exc:
            self.deferred_failed([item], exc, counted=True)
        else:
            if item.report is not None:
                item.report(None)

    def deferred_sent(self, batch: list[Deferred]) -> None:
        """Count a batch sent by :meth:`send_batch`, and tell its reporters."""
        self.count_published(item.wire for item in batch)
        for item in batch:
            if item.report is not None:
                item.report(None)

    def deferred_failed(
        self, batch: list[Deferred], error: PubSubError, counted: bool = False
    ) -> None:
        """Count a batch (or one publish) of deferred publishes that failed with ``error``,
        and tell their reporters; the backend logs those that have none.

        ``counted``: the failed send already counted ``publish_errors``.
        """
        unreported: list[str] = []
        for item in batch:
            channel = self.channel_name(item.wire)
            if not counted:
                count(self.stats, "publish_errors", self.name, channel, error=error)
            count(self.stats, "deferred_failures", self.name, channel, error=error)
            if item.report is None:
                unreported.append(channel or item.wire)
            else:
                item.report(error)
        if unreported:
            logger.error(
                "Publish of %d message(s) to %s after commit failed: %s",
                len(unreported),
                ", ".join(repr(name) for name in sorted(set(unreported))),
                error,
            )

    def send_batch(self, batch: list[Deferred]) -> None:
        """Send publishes deferred to commit, in order, on the after-commit thread.

        Never raises: each failure is counted (``publish_errors`` and
        ``deferred_failures``) and logged. The default sends them one by one
        through ``send()``/``send_targeted()``; a backend that can send several
        in one round trip overrides it.
        """
        for item in batch:
            self._send_committed(item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until publishes deferred to commit have been sent or have failed.

        False when some are still on their way after ``timeout`` seconds (by
        default twice ``publish_timeout``).
        """
        sender = self._sender.peek()
        return True if sender is None else sender.flush(timeout)

    def send(self, channel: str, payload: str) -> None:
        """Hand one message to the server now; ``channel`` is the wire name."""
        raise NotImplementedError("subclasses of BaseBackend must provide send()")

    def send_targeted(self, channel: str, payload: str, group: str, receivers: int) -> None:
        """Queue ``receivers`` copies for ``group`` on ``channel`` (a wire name)."""
        raise NotImplementedError(
            "subclasses of BaseBackend that set targets = True must provide send_targeted()"
        )

    # -- subscribing ---------------------------------------------------------

    def open_transport(self) -> Transport:
        raise NotImplementedError("subclasses of BaseBackend must provide open_transport()")

    def subscriber(self, manual_ack: bool = False) -> Subscriber:
        """A new subscriber; see :class:`~pulp_pubsub.backends.listener.Subscriber`."""
        from .listener import Subscriber

        sub = Subscriber(self, manual_ack=manual_ack)
        self._subscribers.add(sub)
        return sub

    # -- introspection and lifecycle -----------------------------------------

    def describe(self) -> dict[str, Any]:
        """What operators may see: never a password."""
        return {"backend": self.name, "url": hide_password(self.url)}

    def subscriber_counts(self, channels: Collection[str]) -> dict[str, int] | None:
        """Live subscribers per channel where the server can tell, else None."""
        return None

    def deaf_hint(self) -> str:
        """A sentence for an operator whose round trip did not come back (may be empty)."""
        return ""

    def close(self) -> None:
        # What was committed goes out first, while the backend's connections are open.
        self._sender.close()
        for sub in list(self._subscribers):
            sub.close()


def _atomic_connection(alias: str = DEFAULT_DB_ALIAS) -> BaseDatabaseWrapper | None:
    """The connection ``alias`` when it is inside ``atomic()``, else None.

    A plain attribute read: it never opens a database connection, so a
    worker on a non-PostgreSQL backend touches no database to publish.
    """
    try:
        connection = connections[alias]
    except (ImproperlyConfigured, ConnectionDoesNotExist):
        return None
    return connection if connection.in_atomic_block else None
