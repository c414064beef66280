"""The Pulp side of the end-to-end run: an "API process" that dispatches and cancels.

Run inside the Pulp virtualenv with ``PULP_SETTINGS`` set::

    python -m pulp_pubsub_tools.e2e.agent drive '{"latency_tasks": 20, ...}'

It prints one line ``E2E-RESULT {json}``. Task times come from the database
(``pulp_created`` is set by a trigger, ``started_at``/``finished_at`` by the
worker), so the observer's polling adds nothing to them. The observer polls
on a direct connection of its own, which also LISTENs on pulpcore's channels
to count every NOTIFY that still reaches PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

RESULT_MARK = "E2E-RESULT "
CHANNELS = ("pulp_worker_wakeup", "pulp_worker_cancel", "pulp_worker_metrics_heartbeat")
FINAL = ("completed", "failed", "canceled")


def setup_django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pulpcore.app.settings")
    import django

    django.setup()
    from django_guid import set_guid

    set_guid(uuid.uuid4().hex)  # dispatch() stores it; outside a request nobody sets it


class Observer:
    """A direct connection that reads task rows and counts stray NOTIFYs."""

    def __init__(self, dsn: str, spy: bool) -> None:
        import psycopg

        self.conn = psycopg.connect(dsn, autocommit=True)
        self.notifies: Counter[str] = Counter()
        self.workers: dict[str, str] = {}
        self.seen_lock: dict[str, str] = {}
        if spy:
            self.conn.add_notify_handler(lambda n: self.notifies.update([n.channel]))
            for channel in CHANNELS:
                self.conn.execute(f"LISTEN {channel}")

    def rows(self, pks: list[str]) -> dict[str, dict[str, Any]]:
        cur = self.conn.execute(
            "SELECT t.pulp_id::text, t.state, t.pulp_created, t.unblocked_at, t.started_at,"
            " t.finished_at, a.name"
            " FROM core_task t LEFT JOIN core_appstatus a ON a.pulp_id = t.app_lock_id"
            " WHERE t.pulp_id::text = ANY(%s)",
            [pks],
        )
        out = {}
        for pk, state, created, unblocked, started, finished, worker in cur.fetchall():
            if worker:
                self.seen_lock[pk] = worker
            out[pk] = {
                "state": state,
                "created": created,
                "unblocked": unblocked,
                "started": started,
                "finished": finished,
            }
        return out

    def wait(self, pks: list[str], states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            rows = self.rows(pks)
            if all(rows[pk]["state"] in states for pk in pks) or time.monotonic() > deadline:
                return rows
            pause.wait(0.01)

    def drain_notifies(self) -> None:
        self.conn.execute("SELECT 1")  # psycopg hands over notifications as it reads


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


def _record(observer: Observer, pk: str, row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": pk,
        "state": row["state"],
        "wait": _seconds(row["created"], row["started"]),
        # The first hop of ``wait``: the unblock wake-up and the unblocking transaction.
        "unblock": _seconds(row["created"], row["unblocked"]),
        "run": _seconds(row["started"], row["finished"]),
        "worker": observer.seen_lock.get(pk),
    }


def drive(opts: dict[str, Any]) -> dict[str, Any]:
    setup_django()
    from pulpcore.app.tasks.test import sleep as sleep_task
    from pulpcore.app.util import get_domain, set_domain
    from pulpcore.tasking.tasks import adispatch, cancel_task, dispatch

    if opts.get("as_api"):
        # The Redis type's cancel of a waiting task records the canceling process, which
        # must be a Pulp app (an API process is one): so this one registers as one.
        from pulpcore.app.apps import pulp_plugin_configs
        from pulpcore.app.models import AppStatus

        versions = {app.label: app.version for app in pulp_plugin_configs()}
        AppStatus.objects.create(name=f"e2e-api-{os.getpid()}", app_type="api", versions=versions)
    observer = Observer(opts["observer_dsn"], opts.get("spy", True))
    timeout = float(opts.get("start_timeout", 30))
    out: dict[str, Any] = {"phases": {}, "integration": _integration_state()}

    async def async_dispatch(domain: Any) -> Any:
        # What the content app does; the domain lookup itself is sync-only.
        set_domain(domain)
        return await adispatch(sleep_task, args=(0,))

    # Seconds of quiet before each latency task (drawn from [gap, 2 x gap]): the worker that
    # ran the previous one is back in its wait, so the task goes to an idle fleet, at a
    # random point of a polling worker's cycle, instead of to the worker just winding down.
    gap = float(opts.get("latency_gap", 0))

    def run_sequential(n: int, use_async: bool) -> list[dict[str, Any]]:
        records = []
        for _ in range(n):
            if gap:
                threading.Event().wait(random.uniform(gap, 2 * gap))  # a load pattern
            if use_async:
                task = asyncio.run(async_dispatch(get_domain()))
            else:
                task = dispatch(sleep_task, args=(0,))
            pk = str(task.pk)
            rows = observer.wait([pk], FINAL, timeout)
            records.append(_record(observer, pk, rows[pk]))
            if rows[pk]["state"] not in FINAL:
                break  # nobody is taking tasks: do not wait once per task
        return records

    phases = out["phases"]
    phases["warmup"] = run_sequential(1, use_async=False)
    if phases["warmup"][0]["state"] in FINAL:
        phases["latency"] = run_sequential(int(opts.get("latency_tasks", 0)), use_async=False)
        phases["async"] = run_sequential(int(opts.get("async_tasks", 0)), use_async=True)
    burst = int(opts.get("burst_tasks", 0))
    if burst:
        seconds = float(opts.get("burst_seconds", 0.3))
        pks = [str(dispatch(sleep_task, args=(seconds,)).pk) for _ in range(burst)]
        rows = observer.wait(pks, FINAL, float(opts.get("burst_timeout", timeout)))
        phases["burst"] = [_record(observer, pk, rows[pk]) for pk in pks]
    if opts.get("cancel") and phases["warmup"][0]["state"] in FINAL:
        out["cancel"] = cancel_running(
            observer, dispatch, cancel_task, sleep_task, timeout, float(opts.get("cancel_wait", 10))
        )
        out["cancel_waiting"] = cancel_waiting(observer, dispatch, cancel_task, sleep_task)
    observer.drain_notifies()
    out["stray_notifies"] = dict(observer.notifies)
    return out


def cancel_running(
    observer: Observer, dispatch: Any, cancel: Any, task: Any, timeout: float, wait: float = 10
):
    """Cancel a running sleep(30): how long (waiting at most ``wait``) until its worker has
    ended it."""
    from django.utils import timezone

    pk = str(dispatch(task, args=(30,)).pk)
    rows = observer.wait([pk], ("running", *FINAL), timeout)
    if rows[pk]["state"] != "running":
        return {"state": rows[pk]["state"], "latency": None}
    asked = timezone.now()
    cancel(pk)
    rows = observer.wait([pk], FINAL, wait)
    row = rows[pk]
    return {
        "state": row["state"],
        "latency": _seconds(asked, row["finished"]),
        "worker": observer.seen_lock.get(pk),
    }


def cancel_waiting(observer: Observer, dispatch: Any, cancel: Any, task: Any) -> dict[str, Any]:
    """Cancel a task queued behind another (``wakeup_worker('handle')`` path)."""
    resource = f"e2e:{uuid.uuid4().hex}"
    first = str(dispatch(task, args=(0.5,), exclusive_resources=[resource]).pk)
    second = str(dispatch(task, args=(0,), exclusive_resources=[resource]).pk)
    observer.wait([first], ("running", *FINAL), 10)
    cancel(second)
    rows = observer.wait([first, second], FINAL, 10)
    return {"first": rows[first]["state"], "second": rows[second]["state"]}


def _integration_state() -> dict[str, Any]:
    from django.apps import apps

    if not apps.is_installed("pulp_pubsub"):
        return {"installed": False, "reason": "pulp_pubsub is not in INSTALLED_APPS"}
    from pulp_pubsub.contrib.pulpcore import state
    from pulp_pubsub.handler import backends

    return {
        "installed": state.installed,
        "reason": state.reason,
        "problems": state.problems,
        "backend": backends.get().name,
    }


def hear(opts: dict[str, Any]) -> dict[str, Any]:
    """Subscribe through the layer as configured, then ``pg_notify`` it directly.

    Sends ``notifies`` wake-ups on a direct connection (``direct_dsn``) once the
    subscription is confirmed, and watches until the subscriber is found deaf or
    ``timeout`` passes: what it heard, its error and how long finding out took.
    """
    import psycopg

    setup_django()
    from pulp_pubsub import WAKEUP, get_backend

    backend = get_backend()
    heard: list[Any] = []
    began = time.monotonic()
    subscriber = backend.subscriber()
    try:
        subscriber.subscribe(WAKEUP, heard.append)
        with psycopg.connect(opts["direct_dsn"], autocommit=True) as conn:
            for _ in range(int(opts["notifies"])):
                conn.execute("SELECT pg_notify(%s, 'handle')", [backend.wire_name(WAKEUP)])
        deadline = began + float(opts["timeout"])
        while not subscriber.deaf and time.monotonic() < deadline:
            subscriber.dispatch(0.05)
        deaf_after = time.monotonic() - began if subscriber.deaf else None
        subscriber.dispatch(0)
        return {
            "backend": backend.name,
            "sent": int(opts["notifies"]),
            "heard": sum(1 for m in heard if not m.resync),
            "deaf": subscriber.deaf,
            "deaf_after": deaf_after,
            "last_error": subscriber.last_error,
        }
    finally:
        subscriber.close()


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def main(argv: list[str]) -> int:
    command, opts = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    if command == "drive":
        result = drive(opts)
    elif command == "dispatch":
        setup_django()
        from pulpcore.app.tasks.test import sleep as sleep_task
        from pulpcore.tasking.tasks import dispatch

        task = dispatch(sleep_task, args=(float(opts["seconds"]),))
        result = {"task": str(task.pk)}
    elif command == "hear":
        result = hear(opts)
    elif command == "contract":
        from .contract import run_contract

        setup_django()
        result = run_contract(opts)
    else:
        raise SystemExit(f"unknown command {command!r}")
    sys.stdout.write(RESULT_MARK + json.dumps(result, default=_default) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
