"""The publishing side for ``WORKER_TYPE = "redis"``: what makes a task runnable says so.

pulpcore's Redis-type workers never wait for a message: each idle one polls
the task table every ``workers x 10 ms``. Once they wait on the layer
instead (:mod:`.redis_worker`), something has to wake them, and only the
code that makes a task runnable knows when. On this worker type that code
is in ``pulpcore.tasking.redis_tasks``, and ``pulpcore.tasking.tasks`` reaches
it by name at every call (``from pulpcore.tasking.redis_tasks import dispatch
as redis_dispatch`` inside ``dispatch()``), so rebinding three names of that
module reaches every caller, the REST API, the content app, plugins and
``cancel_task_group()`` (which calls the module's ``cancel_task``) included.
Each stand-in calls pulpcore's own function and publishes after it returns:

* ``dispatch`` / ``adispatch``: a task left waiting for a worker wakes one
  idle worker; a task run at once in this process (``immediate``) has
  released its resource locks, so the tasks those held back are woken for;
* ``cancel_task``: a running task's cancel is pulpcore's own Redis key, set
  before the function returns; a cancel message follows, so the supervising
  worker reads that key at once instead of at its next heartbeat. The key is
  the authority: a message alone cancels nothing. A waiting task's cancel
  frees its place in the queue, so the tasks behind it are woken for.

Wake-ups are ``handle``, targeted (``PUBSUB_PULPCORE_TARGETED``) to as many
idle members of the ``handle`` group as there are tasks to take, and carried
by :func:`~.publishers.carry` (at commit inside ``atomic()``, never raising
into pulpcore).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async

from ...registry import CANCEL, RUNNERS, WAKEUP
from ...validation import MAX_RECEIVERS
from .publishers import carry, target

#: pulpcore's prefix of a shared resource in ``Task.reserved_resources_record``.
SHARED = "shared:"
#: Marks a stand-in, so installing twice wraps once and the seam check reads pulpcore's own.
MARK = "__pulp_pubsub__"
#: pulpcore's ``TASK_STATES`` values read here (the seam check compares them with pulpcore's).
WAITING, CANCELING, CANCELED = "waiting", "canceling", "canceled"
RAN = ("completed", "failed")


def held_back_by(record: list[str] | None) -> list[str]:
    """The ``reserved_resources_record`` entries of tasks a task with ``record`` holds back.

    An exclusive resource holds back every task that names it, exclusive or
    shared; a shared one only the tasks that want it exclusively.
    """
    names: list[str] = []
    for entry in record or ():
        if entry.startswith(SHARED):
            names.append(entry[len(SHARED) :])
        else:
            names += [entry, SHARED + entry]
    return names


def waiting_behind(*tasks: Any) -> int:
    """Waiting tasks that the resources of ``tasks`` held back: those their end may let run.

    One ``COUNT`` on the sender, never one per worker. It may count a task
    that something else still holds back: that costs the worker woken for it
    one look, as a poll would.
    """
    names = sorted(
        {name for task in tasks for name in held_back_by(task.reserved_resources_record)}
    )
    if not names:
        return 0
    from pulpcore.app.models import Task

    return int(
        Task.objects.filter(
            state=WAITING, app_lock=None, reserved_resources_record__overlap=names
        ).count()
    )


def wake(receivers: int) -> None:
    """Send ``handle`` to that many idle workers (to every worker when untargeted)."""
    if receivers <= 0:
        return
    group = target(WAKEUP, RUNNERS)
    carry(WAKEUP, RUNNERS, group=group, receivers=min(receivers, MAX_RECEIVERS) if group else 1)


def dispatched(task: Any) -> None:
    """After pulpcore's dispatch: wake a worker for what is now runnable."""
    if task.state == WAITING and task.app_lock_id is None:
        wake(1)  # left for a worker
    elif task.state in RAN:
        wake(waiting_behind(task))  # ran here, and its locks are released


def canceled(task: Any) -> None:
    """After pulpcore's cancel_task: tell the supervising worker, or free the queue."""
    if task.state == CANCELING and task.app_lock_id is not None:
        carry(CANCEL, str(task.pk))  # pulpcore's Redis key is set: read it now
    elif task.state == CANCELED:
        wake(waiting_behind(task))


def _mark(stand_in: Callable[..., Any]) -> Callable[..., Any]:
    setattr(stand_in, MARK, True)
    return stand_in


def then(after: Callable[[Any], None]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A stand-in maker: pulpcore's function, then ``after(task)`` with the task it returns."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def stand_in(*args: Any, **kwargs: Any) -> Any:
            task = original(*args, **kwargs)
            after(task)
            return task

        return _mark(stand_in)

    return wrap


def wrap_adispatch(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def adispatch(*args: Any, **kwargs: Any) -> Any:
        task = await original(*args, **kwargs)
        await sync_to_async(dispatched)(task)
        return task

    return _mark(adispatch)


#: The names rebound in ``pulpcore.tasking.redis_tasks``, and their stand-ins.
WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "dispatch": then(dispatched),
    "adispatch": wrap_adispatch,
    "cancel_task": then(canceled),
}


def install(redis_tasks_module: Any) -> bool:
    """Put the stand-ins in ``redis_tasks_module``; idempotent."""
    changed = False
    for name, wrap in WRAPPERS.items():
        current = getattr(redis_tasks_module, name)
        if not getattr(current, MARK, False):
            setattr(redis_tasks_module, name, wrap(current))
            changed = True
    return changed


def uninstall(redis_tasks_module: Any) -> None:
    for name in WRAPPERS:
        current = getattr(redis_tasks_module, name)
        if getattr(current, MARK, False):
            setattr(redis_tasks_module, name, current.__wrapped__)
