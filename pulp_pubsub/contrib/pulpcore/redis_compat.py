"""Whether pulpcore's Redis-type worker is still what the integration rebinds.

pulpcore added ``WORKER_TYPE = "redis"`` in 3.108 (``pulpcore.tasking.redis_worker``,
``redis_tasks``, ``redis_locks``); the series before it have no such worker and run
their ``pulpcore`` workers whatever the setting says. As for the other type, the
facts about pulpcore's source the integration relies on (:data:`REDIS_SEAMS`), not
the version, decide whether it installs, read on pulpcore's own classes and
functions (never on the stand-ins put in their place).

A Redis-type worker that the integration cannot serve is left stock, and stock
Redis-type workers poll the task table, so none of them is ever deaf to work: a
moved seam here turns the integration off with a warning (``pulp_pubsub.W101``)
rather than stopping Pulp.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import select
import time
from typing import Any

from .compat import ENTRYPOINT, Seam, pulpcore_version, source_problems

REDIS_WORKER = "pulpcore.tasking.redis_worker"
REDIS_TASKS = "pulpcore.tasking.redis_tasks"
#: The first pulpcore series with the Redis-type worker.
FIRST_SERIES = "3.108"

REDIS_SEAMS: tuple[Seam, ...] = (
    Seam(
        f"{REDIS_WORKER}:RedisWorker.run",
        ("self.handle_tasks()", "self.sleep()"),
        "the worker looks for tasks, then sleeps",
    ),
    Seam(
        f"{REDIS_WORKER}:RedisWorker.sleep",
        ("self.beat()", "time.sleep("),
        "the idle worker beats, then waits in the module's time.sleep()",
    ),
    Seam(
        f"{REDIS_WORKER}:RedisWorker.handle_tasks",
        ("self.fetch_task()", "self.supervise_task(task)", "self.supervise_immediate_task(task)"),
        "the worker runs the tasks it fetches in these two methods",
    ),
    Seam(
        f"{REDIS_WORKER}:RedisWorker.supervise_task",
        ("self.task = task", "select.select(", "check_cancel_signal(task.pk)", "self.task = None"),
        "the busy worker waits in the module's select.select(), then reads its task's cancel key",
    ),
    Seam(
        f"{REDIS_WORKER}:RedisWorker.__init__",
        ("self.sentinel", "signal.set_wakeup_fd(", "self.heartbeat_period", "self.app_status"),
        "signals reach the worker through its sentinel pipe",
    ),
    Seam(
        f"{REDIS_WORKER}:RedisWorker.beat",
        ("self.app_status.last_heartbeat", "self.heartbeat_period", "self.app_worker_cleanup()"),
        "a heartbeat is due one heartbeat period after the last",
    ),
    Seam(
        f"{REDIS_TASKS}:cancel_task",
        ("task.set_canceling()", "publish_cancel_signal(task.pk)", "task.set_canceled("),
        "a running task's cancel is a Redis key set before cancel_task() returns",
    ),
    Seam(
        f"{REDIS_TASKS}:cancel_task_group",
        ("cancel_task(task_id)",),
        "a task group is canceled through the module's cancel_task()",
    ),
    Seam(
        "pulpcore.tasking.tasks:dispatch",
        ("from pulpcore.tasking.redis_tasks import dispatch as redis_dispatch",),
        "dispatch() finds the Redis type's dispatch by name at each call",
    ),
    Seam(
        "pulpcore.tasking.tasks:adispatch",
        ("from pulpcore.tasking.redis_tasks import adispatch as redis_adispatch",),
        "adispatch() finds the Redis type's adispatch by name at each call",
    ),
    Seam(
        "pulpcore.tasking.tasks:cancel_task",
        ("from pulpcore.tasking.redis_tasks import cancel_task as redis_cancel_task",),
        "cancel_task() finds the Redis type's cancel_task by name at each call",
    ),
    Seam(
        "pulpcore.tasking.tasks:cancel_task_group",
        ("from pulpcore.tasking.redis_tasks import cancel_task_group",),
        "cancel_task_group() finds the Redis type's by name at each call",
    ),
)
#: Each of these must occur exactly once in the worker's module: the stand-ins
#: for its ``time`` and ``select`` are for those calls alone.
ONE_CALL = ("time.sleep(", "select.select(")


def _stock(obj: Any) -> Any:
    from .redis_worker import PubSubRedisWorkerMixin, stock

    if isinstance(obj, type) and issubclass(obj, PubSubRedisWorkerMixin):
        return stock(obj)
    return inspect.unwrap(obj) if callable(obj) else obj


def _source(where: str) -> str:
    module_name, _, qualname = where.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(_stock(obj), part)
    return inspect.getsource(_stock(obj))


def redis_seam_problems() -> list[str]:
    """Why the Redis-type integration cannot install on this pulpcore (empty: it can)."""
    try:
        spec = importlib.util.find_spec(REDIS_WORKER)
    except ImportError:  # no pulpcore at all
        spec = None
    if spec is None:
        return [
            f"pulpcore {pulpcore_version()} has no Redis-type worker ({REDIS_WORKER}, "
            f"pulpcore {FIRST_SERIES} and later), so the Redis type is not integrated; "
            "this pulpcore runs its 'pulpcore' workers whatever WORKER_TYPE says"
        ]
    problems = source_problems(REDIS_SEAMS, _source)
    problems += _module_problems()
    if problem := _states_problem():
        problems.append(problem)
    return problems


def _states_problem() -> str | None:
    from pulpcore.constants import TASK_STATES

    from .redis_tasks import CANCELED, CANCELING, RAN, WAITING

    ours = (WAITING, CANCELING, CANCELED, *RAN)
    theirs = tuple(
        getattr(TASK_STATES, name, None)
        for name in ("WAITING", "CANCELING", "CANCELED", "COMPLETED", "FAILED")
    )
    if ours != theirs:
        return f"pulpcore's task states are {theirs}, not {ours}"
    return None


def _module_problems() -> list[str]:
    from .redis_worker import idle_wait
    from .worker import select_shim

    problems = []
    module = importlib.import_module(REDIS_WORKER)
    text = inspect.getsource(module)
    for call in ONE_CALL:
        if (n := text.count(call)) != 1:
            problems.append(f"{REDIS_WORKER} calls {call}...) {n} times, not once")
    if getattr(module, "time", None) not in (time, idle_wait):
        problems.append(f"{REDIS_WORKER}.time is no longer the time module")
    if getattr(module, "select", None) not in (select, select_shim):
        problems.append(f"{REDIS_WORKER}.select is no longer the select module")
    tasks = importlib.import_module(REDIS_TASKS)
    for name in ("dispatch", "adispatch", "cancel_task"):
        found = getattr(tasks, name, None)
        if found is None or not inspect.isfunction(inspect.unwrap(found)):
            problems.append(f"{REDIS_TASKS}.{name} is no longer a function")
    spec = importlib.util.find_spec(ENTRYPOINT)
    entry = ""
    if spec is not None and spec.origin is not None:
        with open(spec.origin, encoding="utf-8") as f:
            entry = f.read()
    setup = entry.find("django.setup()")
    imported = entry.find("from pulpcore.tasking.redis_worker import RedisWorker")
    if setup < 0 or imported < setup or "RedisWorker().run(" not in entry:
        problems.append(
            f"{ENTRYPOINT} no longer imports RedisWorker after django.setup() and runs it, "
            "so pulpcore-worker would not run the integrated worker"
        )
    return problems
