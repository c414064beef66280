"""pulpcore's own pub/sub interface, carried by the layer: the seam, not a rebinding.

A pulpcore that has ``pulpcore.tasking.pubsub`` (upstream, or this project's
patch: docs/upstream.md) asks one object for everything its processes say to
each other, and reads the class of that object from the setting
``TASKING_PUBSUB_BACKEND``. :class:`PubSubBackend` is such a class: the same
method names and meanings as pulpcore's ``BasePubSubBackend`` (``subscribe``,
``unsubscribe``, ``get_subscriptions``, ``fileno``, ``fetch``, ``close``; the
classmethods ``publish``, ``wakeup_worker``, ``cancel_task``,
``record_worker_metrics``), on whatever backend ``PUBSUB_BACKEND`` names.
:func:`~pulp_pubsub.contrib.pulpcore.setup` points the setting here.

``fetch()`` returns plain ``(channel, payload)`` pairs, so a resync ("messages
on this channel may have been lost") cannot travel as a flag. It is turned
into the messages that make pulpcore's worker do what a resync calls for, so
the worker needs no code of its own for it:

* on ``pulp_worker_wakeup``: an ``unblock`` and a ``handle``, which is what
  pulpcore does for an unknown reason, without the warning it logs for one;
* on ``pulp_worker_cancel``: one cancel per running task the database shows as
  being canceled, each of which the worker running that task acts on;
* on ``pulp_worker_metrics_heartbeat``: nothing (a missed heartbeat only means
  one more report);
* on any other channel: the channel with an empty payload.

A cancel that is not a resync reaches the worker only when the database shows
its task as being canceled, as in the rebinding integration: whoever can
publish on the backend alone cannot cancel a task.

Targeted wake-ups (docs/pulp.md, "No thundering herd") come from the two
additions the patch makes to the draft: a worker makes its instance with
``backend(worker=self)``, and ``wakeup_worker(reason, count)`` says how many
idle workers a wake-up is for. With a count, a known reason goes to that many
members of its group (``handle``: the workers that run tasks; ``unblock``: the
non-auxiliary ones); without one it is a broadcast, as on PostgreSQL. A worker's
instance joins the groups its worker belongs to, takes ``handle`` only while
its worker has no task, and acknowledges what it fetched when the worker is
back in ``select()`` (which asks for :meth:`PubSubBackend.fileno`), so a
wake-up handed to a worker that dies before acting goes to another one.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from ... import get_backend
from ...backends.listener import Subscriber
from ...message import Message
from ...registry import CANCEL, METRICS_HEARTBEAT, RUNNERS, UNBLOCKERS, WAKEUP
from ...validation import MAX_RECEIVERS
from . import cancels
from .publishers import also_notify, carry, target, targeted

logger = logging.getLogger(__name__)

#: pulpcore's wake-up reasons (``pulpcore.constants.TASK_WAKEUP_*``).
WAKEUP_UNBLOCK = "unblock"
WAKEUP_HANDLE = "handle"
#: The dotted path pulpcore's setting takes to use this module.
PATH = f"{__name__}.PubSubBackend"


class PubsubMessage(NamedTuple):
    """One message, as pulpcore's ``PubsubMessage``: a resync has no field of its own."""

    channel: str
    payload: str


class PubSubBackend:
    """One subscriber of the layer per instance; publishing needs no instance."""

    #: Idle workers of pulpcore's Redis type may wait on :meth:`fileno` instead of polling.
    pushes = True

    def __init__(self, worker: Any = None) -> None:
        #: The worker that fetches (pulpcore passes itself), read for its groups and whether idle.
        self.worker = worker if targeted() else None
        self._subscriber: Subscriber = get_backend().subscriber(manual_ack=self.worker is not None)
        self._received: list[Message] = []

    # -- receiving -----------------------------------------------------------

    def subscribe(self, channel: str) -> None:
        self._subscriber.subscribe(channel, self._collect)
        if channel == WAKEUP and self.worker is not None:
            for group in self.groups():
                self._subscriber.subscribe(WAKEUP, self._collect, group=group)

    def groups(self) -> tuple[str, ...]:
        """The wake-up groups of the worker: auxiliary workers do not unblock tasks."""
        return (RUNNERS,) if getattr(self.worker, "auxiliary", False) else (UNBLOCKERS, RUNNERS)

    def unsubscribe(self, channel: str) -> None:
        self._subscriber.unsubscribe(channel, self._collect)

    def get_subscriptions(self) -> set[str]:
        return set(self._subscriber.channels)

    def fileno(self) -> int:
        """Readable while messages wait for :meth:`fetch`, so it can join a ``select()``.

        ``select()`` asks for it each time the worker waits: the worker has then acted
        on what it fetched, and takes a ``handle`` only when it has no task.
        """
        if self.worker is not None:
            idle = getattr(self.worker, "task", None) is None
            self._subscriber.set_accepting(WAKEUP, RUNNERS, idle)
            self._subscriber.ack()
        return self._subscriber.fileno()

    def fetch(self) -> list[PubsubMessage]:
        """The messages that arrived since the last call, resyncs translated; never blocks."""
        self._subscriber.dispatch()
        received, self._received = self._received, []
        if not received:
            return []
        confirmed: set[str] | None = None
        if any(message.channel == CANCEL for message in received):
            confirmed = self.canceling_tasks()
        fetched: list[PubsubMessage] = []
        for message in received:
            fetched.extend(self._translate(message, confirmed or set()))
        return fetched

    def close(self) -> None:
        self._subscriber.close()

    def _collect(self, message: Message) -> None:
        self._received.append(message)

    def _translate(self, message: Message, confirmed: set[str]) -> list[PubsubMessage]:
        channel = message.channel
        if not message.resync:
            if channel == CANCEL and message.payload not in confirmed:
                cancels.refuse(message)
                return []
            return [PubsubMessage(channel, message.payload)]
        logger.info("Messages on %r may have been missed; acting as if all were sent.", channel)
        if channel == WAKEUP:
            return [PubsubMessage(WAKEUP, WAKEUP_UNBLOCK), PubsubMessage(WAKEUP, WAKEUP_HANDLE)]
        if channel == CANCEL:
            return [PubsubMessage(CANCEL, pk) for pk in sorted(confirmed)]
        if channel == METRICS_HEARTBEAT:
            return []
        return [PubsubMessage(channel, "")]

    @classmethod
    def canceling_tasks(cls) -> set[str]:
        """The ids of the running tasks being canceled: what a cancel may name."""
        from pulpcore.app.models import Task
        from pulpcore.constants import TASK_STATES

        running = Task.objects.filter(state=TASK_STATES.CANCELING).exclude(app_lock=None)
        return {str(pk) for pk in running.values_list("pk", flat=True)}

    # -- sending -------------------------------------------------------------

    @classmethod
    def publish(cls, channel: str, payload: str | None = None) -> None:
        """Send at commit inside ``atomic()``, as NOTIFY would; a backend outage never raises.

        pulpcore's task row is committed either way, and the workers resync
        when the backend is back (:func:`~.publishers.carry`).
        """
        cls._send(channel, "" if payload is None else payload)

    @classmethod
    def _send(
        cls, channel: str, payload: str, group: str | None = None, receivers: int = 1
    ) -> None:
        carry(channel, payload, group=group, receivers=receivers)
        if also_notify():
            # During a move to another backend, processes still on LISTEN hear this too.
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    @classmethod
    def wakeup_worker(cls, reason: str = "unknown", count: int | None = None) -> None:
        """To ``count`` idle members of the reason's group; to every worker without a count."""
        group = None if count is None else target(WAKEUP, reason)
        cls._send(WAKEUP, reason, group, max(1, min(count or 1, MAX_RECEIVERS)))

    @classmethod
    def cancel_task(cls, task_pk: Any) -> None:
        cls.publish(CANCEL, str(task_pk))

    @classmethod
    def record_worker_metrics(cls, now: Any) -> None:
        cls.publish(METRICS_HEARTBEAT, str(now))
