"""The worker side for ``WORKER_TYPE = "redis"``: an idle worker waits for a message.

pulpcore's ``RedisWorker`` loops ``handle_tasks()`` (fetch and run tasks
until none is left) and ``sleep()`` (``beat()``, then ``time.sleep(workers
x 10 ms)``), and supervises a running task in ``select.select([sentinel,
task process], ..., heartbeat period)``, reading the task's cancel key in
Redis after each return. The integration copies none of that and changes
three names of ``pulpcore.tasking.redis_worker``:

* ``RedisWorker``: a subclass (:class:`PubSubRedisWorkerMixin`) that
  subscribes in ``run()`` (cancels always, wake-ups outside burst mode, in the
  ``handle`` group), marks itself idle for the length of pulpcore's
  ``sleep()``, and after each task it ran, once it has looked again itself,
  wakes workers for the tasks that task's resource locks held back;
* ``time``: :data:`idle_wait`, whose ``sleep()`` inside an idle worker's
  ``sleep()`` waits on the subscriber's ``fileno()`` and the worker's signal
  pipe instead, running pulpcore's own ``beat()`` whenever a heartbeat is due,
  until a wake-up, a signal, or the safety look; anywhere else it is
  ``time.sleep``;
* ``select``: the pulpcore type's :data:`~.worker.select_shim`, so a
  supervising worker's wait also ends when a message comes. A cancel message
  thus makes pulpcore read its task's cancel key at once; pulpcore's key,
  set by its ``cancel_task()`` before the message is sent, stays the only
  authority, so a forged message cancels nothing (it is logged and counted).

The subscriber acknowledges a wake-up when its worker is back in a wait
(it has looked), and takes none while it runs a task, exactly as on the
pulpcore type. A worker that hears nothing for ``PUBSUB_PULPCORE_SAFETY_LOOK``
seconds (default WORKER_TTL) looks anyway.
"""

from __future__ import annotations

import logging
import os
import time as _time
from typing import Any

from ... import get_backend
from ...backends.listener import Subscriber
from ...backends.perprocess import PerProcess
from ...message import Message
from ...metrics import count
from ...registry import CANCEL, RUNNERS, WAKEUP
from . import cancels
from .publishers import targeted
from .redis_tasks import CANCELING, WAITING, waiting_behind, wake
from .worker import next_safety_look, select_shim

logger = logging.getLogger(__name__)

#: Past a heartbeat's due time before waking to beat: pulpcore's test is "older than" the period.
HEARTBEAT_SLACK = 0.05
#: Seconds a worker that has just started a task leaves it before counting what the tasks it
#: ran before held back (see PubSubRedisWorkerMixin.while_waiting()).
HELD_BACK_AFTER = 0.25


class IdleWait:
    """Stands in for the ``time`` module inside ``pulpcore.tasking.redis_worker``."""

    def __init__(self) -> None:
        self._worker: PerProcess[Any] = PerProcess()

    def attach(self, worker: Any) -> None:
        self._worker.set(worker)

    def detach(self, worker: Any) -> None:
        if self._worker.peek() is worker:
            self._worker.set(None)

    def sleep(self, seconds: float) -> None:
        worker = self._worker.peek()
        if worker is None or not worker.idle:
            _time.sleep(seconds)
            return
        worker.wait_for_work()

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


#: The one stand-in; a worker process runs one worker.
idle_wait = IdleWait()


class PubSubRedisWorkerMixin:
    """Mixed in front of pulpcore's ``RedisWorker``; see the module docstring."""

    # What pulpcore's class provides (declared for the type checker).
    task: Any
    ignored_task_ids: list[Any]
    sentinel: int
    shutdown_requested: bool
    heartbeat_period: Any
    app_status: Any
    beat: Any
    #: In pulpcore's sleep(): the only time the time stand-in waits for work.
    idle: bool = False
    #: Something asked this worker to look for tasks (a wake-up, the safety look).
    look_now: bool = False
    #: What the select seam reads of a worker (the Redis type never unblocks).
    auxiliary: bool = False
    unblock_retry_at: float | None = None
    safety_look_at: float = 0.0
    #: When a supervising worker counts what its ended tasks held back (time.monotonic()).
    held_back_at: float | None = None

    def schedule_safety_look(self) -> None:
        self.safety_look_at = next_safety_look()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pubsub: Subscriber = get_backend().subscriber(manual_ack=True)
        #: Tasks this worker ran whose held-back tasks are not yet woken for (see task_ended()).
        self.ended: list[Any] = []
        self.schedule_safety_look()
        select_shim.attach(self.pubsub, self)
        idle_wait.attach(self)

    def listen(self, burst: bool) -> None:
        """Cancels always; wake-ups, in the ``handle`` group, unless in burst mode (a
        burst worker never waits for work)."""
        self.pubsub.subscribe(CANCEL, self.on_pubsub_message)
        if not burst:
            self.pubsub.subscribe(WAKEUP, self.on_pubsub_message)
            if targeted():
                self.pubsub.subscribe(WAKEUP, self.on_pubsub_message, group=RUNNERS)

    def run(self, burst: bool = False) -> Any:
        self.listen(burst)
        try:
            result = super().run(burst=burst)  # type: ignore[misc]
            self.wake_held_back()  # a burst worker, or one shut down, looks no more
            return result
        finally:
            select_shim.detach(self.pubsub)
            idle_wait.detach(self)
            self.pubsub.close()

    def handle_tasks(self) -> Any:
        self.look_now = False  # looking now
        return super().handle_tasks()  # type: ignore[misc]

    def sleep(self) -> Any:
        self.idle = True
        try:
            return super().sleep()  # type: ignore[misc]
        finally:
            self.idle = False

    def wait_for_work(self) -> None:
        """Wait for a wake-up, a signal or the safety look, beating when a heartbeat is due."""
        from django.utils import timezone

        while not (self.look_now or self.shutdown_requested):
            due = self.app_status.last_heartbeat + self.heartbeat_period - timezone.now()
            timeout = max(due.total_seconds(), 0.0) + HEARTBEAT_SLACK
            readable, _, _ = select_shim.select([self.sentinel], [], [], timeout)
            if self.sentinel in readable:
                os.read(self.sentinel, 256)  # a signal: pulpcore's loop reads its flags
                return
            if not self.look_now:
                self.beat()

    def supervise_task(self, task: Any) -> Any:
        result = super().supervise_task(task)  # type: ignore[misc]
        self.task_ended(task)
        return result

    def supervise_immediate_task(self, task: Any) -> Any:
        result = super().supervise_immediate_task(task)  # type: ignore[misc]
        self.task_ended(task)
        return result

    def task_ended(self, task: Any) -> None:
        """Its locks are released: the tasks they held back may run now.

        pulpcore's ``handle_tasks()`` looks again right after, and that look
        comes first: the worker that just finished is often the one to take
        the next task (a task created while it was still winding down), and
        a query before its look would delay that task's start. So the count
        of held-back tasks, and their wake-ups, wait until this worker is
        back in a wait (:meth:`while_waiting`), and are dropped when its look
        found nothing it could run (:meth:`fetch_task`).
        """
        self.ended.append(task)

    def fetch_task(self) -> Any:
        """pulpcore's look; one that finds nothing means no held-back task can run.

        pulpcore's ``fetch_task()`` goes through every waiting task it has
        not set aside as beyond its versions, oldest first, so when it
        returns none, each of them is held back by a lock still held (whose
        holder wakes for it when it ends) or queued behind such a task.
        """
        task = super().fetch_task()  # type: ignore[misc]
        if task is None and not self.ignored_task_ids:
            self.ended.clear()
            self.held_back_at = None
        return task

    def while_waiting(self, now: float) -> float | None:
        """Wake workers for what the tasks it ran held back: idle, at once; supervising
        the task it has just started, ``HELD_BACK_AFTER`` later (returned to the seam).

        The task process it forked is starting (Django, a database connection)
        right then, and the count is a query: on a busy host, run beside that
        start, it delayed each task's start by about as long as the query took
        (measured in docs/pulp.md). Waiting costs a held-back task at most
        ``HELD_BACK_AFTER``, and only when this worker went straight on to
        another task, when the fleet is most likely busy anyway.
        """
        if not self.ended:
            return None
        if self.task is not None:
            if self.held_back_at is None:
                self.held_back_at = now + HELD_BACK_AFTER
            if now < self.held_back_at:
                return self.held_back_at
        self.wake_held_back()
        return None

    def wake_held_back(self) -> None:
        ended, self.ended = self.ended, []
        self.held_back_at = None
        if ended:
            wake(waiting_behind(*ended))

    def app_worker_cleanup(self) -> Any:
        """pulpcore's, then: locks of missing workers may be free now, so look."""
        result = super().app_worker_cleanup()  # type: ignore[misc]
        waiting = self.waiting_tasks()
        if waiting:
            fleet = int(getattr(self, "num_workers", 0) or waiting)
            idle = self.task is None
            if idle:
                # It looks itself, so it takes none of the others' wake-ups (the select
                # seam lets it take them again when it is back in its wait).
                self.look_now = True
                self.pubsub.set_accepting(WAKEUP, RUNNERS, False)
            wake(min(waiting, fleet) - int(idle))
        return result

    def waiting_tasks(self) -> int:
        from pulpcore.app.models import Task

        return int(Task.objects.filter(state=WAITING, app_lock=None).count())

    def safety_look(self) -> None:
        """An idle worker looks for tasks; a busy one's wait ends, so pulpcore reads its
        task's cancel key (it does at every return)."""
        self.schedule_safety_look()
        backend = self.pubsub.backend
        count(backend.stats, "pulpcore_safety_looks", backend.name)
        if self.task is None:
            self.look_now = True

    def on_pubsub_message(self, message: Message) -> None:
        if message.channel == WAKEUP:
            self.schedule_safety_look()
            if self.task is None:
                self.look_now = True
        elif message.channel == CANCEL and not message.resync:
            self._check_cancel(message)
        # Any message ends a supervising worker's wait, and pulpcore then reads the
        # running task's cancel key: a cancel resync needs nothing more.

    def _check_cancel(self, message: Message) -> None:
        """A cancel of the running task with neither pulpcore's key nor the database's
        ``canceling`` behind it did not come from Pulp: say so (pulpcore ignores it)."""
        task = self.task
        if task is None or message.payload != str(task.pk):
            return
        if not (self.cancel_signalled() or self.task_is_canceling()):
            cancels.refuse(message)

    def cancel_signalled(self) -> bool:
        """pulpcore's own cancel signal for the running task: its key in Redis."""
        from pulpcore.tasking.redis_tasks import check_cancel_signal

        return bool(check_cancel_signal(self.task.pk))

    def task_is_canceling(self) -> bool:
        from pulpcore.app.models import Task

        return bool(Task.objects.filter(pk=self.task.pk, state=CANCELING).exists())


def make_worker_class(base: type) -> type:
    """``base`` (pulpcore's ``RedisWorker``) with the layer mixed in front."""
    return type(
        "PubSubRedisWorker",
        (PubSubRedisWorkerMixin, base),
        {"__module__": __name__, "__doc__": PubSubRedisWorkerMixin.__doc__},
    )


def stock(cls: type) -> type:
    """pulpcore's own class behind an integrated subclass."""
    return next(base for base in cls.__mro__ if not issubclass(base, PubSubRedisWorkerMixin))


def install(worker_module: Any) -> bool:
    """Make ``worker_module.RedisWorker`` the integrated class; idempotent.

    ``pulpcore-worker`` imports the name only after ``django.setup()`` has
    run our ``AppConfig.ready()``, so the stock command runs this class.
    """
    current = worker_module.RedisWorker
    if issubclass(current, PubSubRedisWorkerMixin):
        return False
    worker_module.RedisWorker = make_worker_class(current)
    worker_module.select = select_shim
    worker_module.time = idle_wait
    return True


def uninstall(worker_module: Any) -> None:
    import select

    current = worker_module.RedisWorker
    if issubclass(current, PubSubRedisWorkerMixin):
        worker_module.RedisWorker = stock(current)
    if worker_module.select is select_shim:
        worker_module.select = select
    if worker_module.time is idle_wait:
        worker_module.time = _time
