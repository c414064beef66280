"""Which pulpcore the integration was tested with, and whether its seams are still there.

The integration relies on a handful of facts about pulpcore's source, listed
in :data:`SEAMS`. A pulpcore outside :data:`TESTED` is refused outright; and
even inside it, each seam is checked at start-up, so a patch release that
moved one makes the system check fail instead of a worker going deaf.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any

#: The pulpcore release series (major, minor) the integration has been tested with.
TESTED = (3, 123)
TESTED_TEXT = ">=3.123,<3.124"


def pulpcore_version() -> str | None:
    try:
        return metadata.version("pulpcore")
    except metadata.PackageNotFoundError:
        return None


def version_problem(found: str | None = None) -> str | None:
    """Why this pulpcore version is not supported, or None when it is."""
    found = pulpcore_version() if found is None else found
    if found is None:
        return "pulpcore is not installed"
    match = re.match(r"(\d+)\.(\d+)(?:\.\d+)*", found)
    if match is None:
        return f"pulpcore reports an unreadable version {found!r}"
    if (int(match[1]), int(match[2])) != TESTED:
        return (
            f"pulpcore {found} is installed, but this pulp-pubsub was tested only with "
            f"pulpcore{TESTED_TEXT}"
        )
    return None


@dataclass(frozen=True)
class Seam:
    """One fact about pulpcore's source the integration depends on."""

    where: str  # module:qualname, or module for the whole file
    needs: tuple[str, ...]  # substrings that must all be present
    why: str


SEAMS: tuple[Seam, ...] = (
    Seam(
        "pulpcore.tasking.tasks:wakeup_worker",
        ("connection.connection.cursor()", "pg_notify('pulp_worker_wakeup', %s)"),
        "wake-ups are sent with this statement on the module's `connection`",
    ),
    Seam(
        "pulpcore.tasking.tasks:cancel_task",
        ("connection.cursor()", "pg_notify('pulp_worker_cancel', %s)", "wakeup_worker("),
        "cancels are sent with this statement on the module's `connection`",
    ),
    Seam(
        "pulpcore.tasking.tasks:dispatch",
        ("wakeup_worker(",),
        "dispatch wakes workers through wakeup_worker()",
    ),
    Seam(
        "pulpcore.tasking.tasks:adispatch",
        ("wakeup_worker)(",),
        "adispatch wakes workers through wakeup_worker()",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.__init__",
        ("self.cursor = connection.cursor()",),
        "the worker keeps one cursor for its messaging",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.run",
        (
            'self.cursor.execute("LISTEN pulp_worker_wakeup")',
            'self.cursor.execute("LISTEN pulp_worker_cancel")',
            'self.cursor.execute("LISTEN pulp_worker_metrics_heartbeat")',
        ),
        "the worker subscribes through that cursor",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.notify_workers",
        ("self.cursor.execute(",),
        "the worker's own wake-ups go through that cursor",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.record_unblocked_waiting_tasks_metric",
        ("self.cursor.execute(", "NOTIFY pulp_worker_metrics_heartbeat"),
        "the metrics heartbeat goes through that cursor",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.sleep",
        ("select.select(",),
        "the idle worker waits in the module's select.select()",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.supervise_task",
        ("select.select(",),
        "the busy worker waits in the module's select.select()",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker._pg_notify_handler",
        ("notification.channel", "notification.payload"),
        "messages are mapped to flags from .channel and .payload",
    ),
)

#: Checked in the source text without importing it: importing the entry
#: point runs django.setup().
ENTRYPOINT = "pulpcore.tasking.entrypoint"


def _source(where: str) -> str:
    module_name, _, qualname = where.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split(".") if qualname else ():
        obj = getattr(obj, part)
    return inspect.getsource(obj)


def _entrypoint_problem() -> str | None:
    spec = importlib.util.find_spec(ENTRYPOINT)
    if spec is None or spec.origin is None:
        return f"{ENTRYPOINT} is missing"
    with open(spec.origin, encoding="utf-8") as f:
        text = f.read()
    setup = text.find("django.setup()")
    imported = text.find("from pulpcore.tasking.worker import PulpcoreWorker")
    if setup < 0 or imported < setup:
        return (
            f"{ENTRYPOINT} no longer imports PulpcoreWorker after django.setup(), so "
            "pulpcore-worker would not run the integrated worker"
        )
    return None


def seam_problems() -> list[str]:
    """Each seam that is not where the integration expects it."""
    import select

    import django.db

    problems = []
    for seam in SEAMS:
        try:
            text = _source(seam.where)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            problems.append(f"{seam.where} cannot be read ({exc}): {seam.why}")
            continue
        missing = [needle for needle in seam.needs if needle not in text]
        if missing:
            problems.append(f"{seam.where} no longer contains {missing}: {seam.why}")
    tasks = importlib.import_module("pulpcore.tasking.tasks")
    worker = importlib.import_module("pulpcore.tasking.worker")
    from .publishers import NotifyingConnection
    from .worker import select_shim

    connection = getattr(tasks, "connection", None)
    if not (connection is django.db.connection or isinstance(connection, NotifyingConnection)):
        problems.append("pulpcore.tasking.tasks.connection is no longer django.db.connection")
    if getattr(worker, "select", None) not in (select, select_shim):
        problems.append("pulpcore.tasking.worker.select is no longer the select module")
    if problem := _entrypoint_problem():
        problems.append(problem)
    return problems
