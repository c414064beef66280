"""The worker side: a ``PulpcoreWorker`` that hears the layer instead of LISTEN.

pulpcore's worker keeps one cursor, ``self.cursor``, only for its messaging
(``LISTEN``/``UNLISTEN`` in ``run()``, ``pg_notify`` in ``notify_workers()``,
``NOTIFY`` for the metrics heartbeat), and it waits in
``select.select([sentinel, connection.connection(, task process)])`` in
``sleep()`` and ``supervise_task()``. The integration changes exactly these
two seams and copies no method of pulpcore:

* :class:`WorkerCursor` replaces ``self.cursor``: ``LISTEN`` subscribes the
  worker's :class:`~pulp_pubsub.Subscriber`, ``UNLISTEN`` unsubscribes, a
  NOTIFY publishes (at commit inside ``atomic()``, as PostgreSQL would). So
  ``run()`` decides what to subscribe to as it always did: cancel and
  heartbeat always, wake-ups only outside burst mode.
* :data:`select_shim` replaces the name ``select`` inside
  ``pulpcore.tasking.worker`` only. It adds the subscriber's ``fileno()`` to
  the worker's own list and, when it is readable, runs ``dispatch()`` before
  returning, so the handlers set the worker's flags in the worker's thread
  and the unchanged loop acts on them in the same turn.

Wake-ups are targeted (docs/pulp.md, "No thundering herd"): the worker joins
the ``handle`` group of the wake-up channel, and the ``unblock`` group unless
it is auxiliary. Its subscriber acknowledges a wake-up only when the worker
is back in ``select()`` (it has acted on it: taken a task, or found none),
and takes no ``handle`` while it runs a task, so a wake-up never waits for a
busy or dead worker: it is given back, or handed to another after
``claim_timeout``. The ``handle`` the unblocking worker sends goes to as many
idle workers as there are tasks ready to run, the sender itself first when it
is idle (it is awake already; on PostgreSQL it would hear its own NOTIFY).
An ``unblock`` reaches one worker, so when that worker finds the unblocking
lock taken (another worker is scanning, perhaps from before the task this
wake-up is about was committed) it looks again shortly, backing off, until
it gets the lock: under broadcast another worker's later try covered that.

Wake-ups are advisory and the database stays the truth: a worker that hears
no wake-up for one WORKER_TTL (jittered) looks anyway, for work when idle, at
its task's cancel when busy (:meth:`PubSubWorkerMixin.safety_look`), so a
wake-up the layer lost costs that long, never a stalled task.

Each message then goes to pulpcore's own ``_pg_notify_handler``, which maps
it to the flags exactly as for a PostgreSQL notification (a ``Message`` has
the same ``channel`` and ``payload``). Only a ``resync`` (messages may have
been lost) is handled here: for wake-ups it does what an unknown payload
does, both flags; for cancel it asks the database whether the running task is
being canceled; the heartbeat timer needs nothing. And a cancel message is
trusted no more than a resync: the worker acts on it only when the database
shows its task as being canceled, so publishing on the backend alone cannot
cancel a task. Publishing never raises into the worker
(:func:`~.publishers.carry`).
"""

from __future__ import annotations

import logging
import math
import random
import select as _select
import time
from collections.abc import Callable, Sequence
from typing import Any

from django.conf import settings

from ... import get_backend
from ...backends.listener import Subscriber
from ...backends.perprocess import PerProcess
from ...message import Message
from ...metrics import count
from ...registry import CANCEL, RUNNERS, UNBLOCKERS, WAKEUP
from ...validation import MAX_RECEIVERS
from . import cancels
from .publishers import also_notify, carry, target, targeted
from .sql import parse

logger = logging.getLogger(__name__)

#: After finding the unblocking lock taken, look again this soon, doubling up to the cap.
UNBLOCK_RETRY = 0.05
UNBLOCK_RETRY_MAX = 1.0
#: Seconds between a quiet worker's safety looks; unset: pulpcore's WORKER_TTL; 0: none.
SAFETY_LOOK = "PUBSUB_PULPCORE_SAFETY_LOOK"


def next_safety_look() -> float:
    """When a quiet worker of either type looks next (``time.monotonic()``; inf: never).

    Jittered so that a fleet started together spreads out. By default one
    WORKER_TTL from now (three heartbeat periods, 30 s unless configured): as
    long as the fleet takes to notice a dead worker, and, on an idle fleet,
    about one look's transactions per worker per TTL on top of its heartbeats.
    PUBSUB_PULPCORE_SAFETY_LOOK (seconds) sets another; 0 turns it off.
    """
    seconds = getattr(settings, SAFETY_LOOK, None)
    if seconds is None:
        seconds = float(getattr(settings, "WORKER_TTL", 30))
    if not seconds:
        return math.inf
    return time.monotonic() + float(seconds) * random.uniform(0.75, 1.0)


class WorkerCursor:
    """Replaces ``PulpcoreWorker.cursor``: pub/sub SQL goes to the layer."""

    def __init__(self, worker: Any, real: Any = None) -> None:
        self.worker = worker
        self.real = real

    def execute(self, sql: Any, params: Sequence[Any] | None = None) -> Any:
        statement = parse(sql, params)
        if statement is None:
            # Not messaging: pulpcore 3.123 sends none here, but a later
            # harmless query should behave as it always did.
            return self._real().execute(sql, params)
        subscriber: Subscriber = self.worker.pubsub
        if statement.verb == "listen":
            subscriber.subscribe(statement.channel, self.worker.on_pubsub_message)
            if statement.channel == WAKEUP and targeted():
                for group in self.worker.wakeup_groups():
                    subscriber.subscribe(WAKEUP, self.worker.on_pubsub_message, group=group)
        elif statement.verb == "unlisten":
            subscriber.unsubscribe(statement.channel, self.worker.on_pubsub_message)
        else:
            group = target(statement.channel, statement.payload)
            receivers = 1
            if group == RUNNERS and subscriber.backend.targets:
                # pulpcore sends one "handle" after unblocking: one worker per ready task.
                receivers = max(1, min(self.worker.runners_wanted(), MAX_RECEIVERS))
                if self.worker.task is None:
                    # An idle sender is one of them, as it hears its own NOTIFY on
                    # PostgreSQL: it is awake already, so no other worker is woken for it.
                    # It takes none of the others' (the select seam lets it take
                    # "handle" again when it is back, idle, in its wait).
                    self.worker.wakeup_handle = True
                    subscriber.set_accepting(WAKEUP, RUNNERS, False)
                    receivers -= 1
            if receivers:  # carry() never raises into the worker
                carry(statement.channel, statement.payload, group=group, receivers=receivers)
            if also_notify():
                self._real().execute(sql, params)  # the stock NOTIFY too (rollout)
        return self

    def _real(self) -> Any:
        if self.real is None:
            from django.db import connection

            self.real = connection.cursor()
        return self.real

    def close(self) -> None:
        if self.real is not None:
            self.real.close()
            self.real = None


class SelectShim:
    """Stands in for the ``select`` module inside ``pulpcore.tasking.worker``.

    With no subscriber attached (a stock worker class, the task process
    forked from a worker) it is the plain ``select.select``.
    """

    def __init__(self) -> None:
        # (subscriber, worker); a task process forked from the worker sees none.
        self._attached: PerProcess[tuple[Subscriber, Any]] = PerProcess()

    def attach(self, subscriber: Subscriber, worker: Any = None) -> None:
        self._attached.set((subscriber, worker))

    def detach(self, subscriber: Subscriber) -> None:
        attached = self._attached.peek()
        if attached is not None and attached[0] is subscriber:
            self._attached.set(None)

    def select(
        self,
        rlist: Sequence[Any],
        wlist: Sequence[Any],
        xlist: Sequence[Any],
        timeout: float | None = None,
    ) -> tuple[list[Any], list[Any], list[Any]]:
        attached = self._attached.peek()
        if attached is None:
            return _select.select(rlist, wlist, xlist, timeout)
        subscriber, worker = attached
        retry_at = chore_at = None
        if worker is not None:
            now = time.monotonic()
            # Before it takes wake-ups again: what it sends is for the others.
            chore_at = worker.while_waiting(now)
            # Back in its wait, the worker has acted on the wake-ups it was
            # handed; while it runs a task, "handle" is for the idle ones.
            subscriber.set_accepting(WAKEUP, RUNNERS, worker.task is None)
            subscriber.ack()
            retry_at = worker.unblock_retry_at
            for due in (retry_at, worker.safety_look_at, chore_at):
                if due is not None and due != math.inf:
                    left = max(0.0, due - now)
                    timeout = left if timeout is None else min(timeout, left)
        fd = subscriber.fileno()
        readable, writable, failed = _select.select([*rlist, fd], wlist, xlist, timeout)
        if worker is not None:
            now = time.monotonic()
            if retry_at is not None and now >= retry_at:
                # pulpcore's loop unblocks right after select() when the flag is set.
                worker.unblock_retry_at = None
                worker.wakeup_unblock = not worker.auxiliary
            if now >= worker.safety_look_at:
                worker.safety_look()
            if chore_at is not None and now >= chore_at:
                worker.while_waiting(now)
        if fd in readable:
            subscriber.dispatch()
            readable = [item for item in readable if not (isinstance(item, int) and item == fd)]
        return readable, writable, failed

    def __getattr__(self, name: str) -> Any:
        return getattr(_select, name)


#: The one shim; a worker process runs one worker.
select_shim = SelectShim()


class PubSubWorkerMixin:
    """Mixed in front of ``PulpcoreWorker``; see the module docstring."""

    # What pulpcore's class provides (declared for the type checker).
    auxiliary: bool
    task: Any
    cursor: Any
    wakeup_unblock: bool
    wakeup_handle: bool
    cancel_task: bool
    _pg_notify_handler: Callable[[Any], None]
    #: When to try the unblocking lock again (time.monotonic()), or None.
    unblock_retry_at: float | None = None
    _unblock_backoff: float = UNBLOCK_RETRY
    #: When to look for work (or at the running task's cancel) with no message: see safety_look().
    safety_look_at: float = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # pulpcore opened a real cursor for its LISTENs; it is never needed.
        real, self.cursor = self.cursor, None
        if real is not None:
            real.close()
        self.pubsub = get_backend().subscriber(manual_ack=True)
        self.cursor = WorkerCursor(self)
        self.schedule_safety_look()
        select_shim.attach(self.pubsub, self)

    def run(self, burst: bool = False) -> Any:
        try:
            return super().run(burst=burst)  # type: ignore[misc]
        finally:
            select_shim.detach(self.pubsub)
            self.pubsub.close()
            self.cursor.close()

    def unblock_tasks(self) -> Any:
        """pulpcore's, looking again shortly when the lock was taken (see the module doc)."""
        result = super().unblock_tasks()  # type: ignore[misc]
        if result is None and targeted() and self.pubsub.backend.targets:
            self.unblock_retry_at = time.monotonic() + self._unblock_backoff
            self._unblock_backoff = min(self._unblock_backoff * 2, UNBLOCK_RETRY_MAX)
        else:
            self.unblock_retry_at = None
            self._unblock_backoff = UNBLOCK_RETRY
        return result

    def schedule_safety_look(self) -> None:
        self.safety_look_at = next_safety_look()

    def while_waiting(self, now: float) -> float | None:
        """What the worker does in its wait, as it enters it and when the time this returned
        (``time.monotonic()``) comes; this type has nothing to do."""
        return None

    def safety_look(self) -> None:
        """Act as if woken: a wake-up or a cancel the layer lost costs one period, never a stall.

        Wake-ups are advisory; the database stays the truth. An idle worker
        looks for tasks (as on an unknown wake-up), a busy one asks whether its
        task is being canceled; the few queries this costs run once per
        period, and not at all while real wake-ups keep coming.
        """
        self.schedule_safety_look()
        backend = self.pubsub.backend
        count(backend.stats, "pulpcore_safety_looks", backend.name)
        if self.task is None:
            self.wakeup_unblock = not self.auxiliary
            self.wakeup_handle = True
        else:
            self.cancel_task = self.cancel_task or self._task_is_canceling()

    def wakeup_groups(self) -> tuple[str, ...]:
        """Only non-auxiliary workers unblock tasks."""
        return (RUNNERS,) if self.auxiliary else (UNBLOCKERS, RUNNERS)

    def runners_wanted(self) -> int:
        """Tasks ready for a worker: pulpcore's own test for sending "handle", counted."""
        from pulpcore.app.models import Task
        from pulpcore.constants import TASK_INCOMPLETE_STATES

        return int(
            Task.objects.filter(state__in=TASK_INCOMPLETE_STATES, app_lock=None)
            .exclude(unblocked_at=None)
            .count()
        )

    def on_pubsub_message(self, message: Message) -> None:
        if message.channel == WAKEUP:
            self.schedule_safety_look()  # about to look anyway
        if message.channel == CANCEL and not message.resync:
            self._on_cancel(message)
            return
        if not message.resync:
            self._pg_notify_handler(message)
            return
        if message.channel == WAKEUP:
            logger.info("Wake-ups may have been missed (%s); looking for work.", message.channel)
            self.wakeup_unblock = not self.auxiliary
            self.wakeup_handle = True
        elif message.channel == CANCEL and self.task is not None:
            self.cancel_task = self.cancel_task or self._task_is_canceling()
        # A missed metrics heartbeat only means this worker may report once more.

    def _on_cancel(self, message: Message) -> None:
        """Act on a cancel only when the database says the running task is being canceled
        (see :mod:`.cancels`)."""
        task = self.task
        if task is None or message.payload != str(task.pk):
            return  # pulpcore ignores it too: not the task this worker runs
        if self._task_is_canceling():
            self._pg_notify_handler(message)
            return
        cancels.refuse(message)

    def _task_is_canceling(self) -> bool:
        from pulpcore.app.models import Task
        from pulpcore.constants import TASK_STATES

        return bool(Task.objects.filter(pk=self.task.pk, state=TASK_STATES.CANCELING).exists())


def make_worker_class(base: type) -> type:
    """``base`` (pulpcore's ``PulpcoreWorker``) with the layer mixed in front."""
    return type(
        "PubSubPulpcoreWorker",
        (PubSubWorkerMixin, base),
        {"__module__": __name__, "__doc__": PubSubWorkerMixin.__doc__},
    )


def install(worker_module: Any) -> bool:
    """Make ``worker_module.PulpcoreWorker`` the integrated class; idempotent.

    ``pulpcore-worker`` imports the name only after ``django.setup()`` has run
    our ``AppConfig.ready()``, so the stock command (``--reload``,
    ``--burst``, ``--auxiliary`` included) runs this class.
    """
    current = worker_module.PulpcoreWorker
    if issubclass(current, PubSubWorkerMixin):
        return False
    worker_module.PulpcoreWorker = make_worker_class(current)
    worker_module.select = select_shim
    return True


def uninstall(worker_module: Any) -> None:
    current = worker_module.PulpcoreWorker
    if issubclass(current, PubSubWorkerMixin):
        worker_module.PulpcoreWorker = next(
            base for base in current.__mro__[1:] if not issubclass(base, PubSubWorkerMixin)
        )
    if worker_module.select is select_shim:
        worker_module.select = _select
