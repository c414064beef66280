"""The dispatching side of the herd run (issue 15), inside the Pulp virtualenv.

    python -m pulp_pubsub_tools.e2e.herd_agent sequential '{"tasks": 20, ...}'

Commands: ``sequential`` (one task at a time, each waited for), ``burst``
(many at once, optionally spaced) and ``dispatch`` (one task, not waited
for). Each prints one ``E2E-RESULT {json}`` line, with the PostgreSQL backend
ids of this process's own sessions (``own_backends``), so the runner can
leave the dispatcher's and the observer's transactions out of the count.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from .agent import FINAL, RESULT_MARK, Observer, _default, _record, setup_django

OWN_BACKEND = (
    "SELECT virtualtransaction FROM pg_locks"
    " WHERE pid = pg_backend_pid() AND locktype = 'virtualxid'"
)


def own_backends(observer: Observer) -> list[str]:
    """The backend ids (the part of a virtual transaction id before the slash)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(OWN_BACKEND)
        django_vxid = str((cursor.fetchone() or ("?/",))[0])
    observer_vxid = str((observer.conn.execute(OWN_BACKEND).fetchone() or ("?/",))[0])
    return sorted({vxid.split("/")[0] for vxid in (django_vxid, observer_vxid)})


def sequential(opts: dict[str, Any]) -> dict[str, Any]:
    from pulpcore.app.tasks.test import sleep as sleep_task
    from pulpcore.tasking.tasks import dispatch

    observer = Observer(opts["observer_dsn"], spy=False)
    timeout = float(opts.get("start_timeout", 30))

    def one() -> dict[str, Any]:
        pk = str(dispatch(sleep_task, args=(0,)).pk)
        rows = observer.wait([pk], FINAL, timeout)
        return _record(observer, pk, rows[pk])

    warmup = one()  # the first dispatch of a process imports and connects
    mine = own_backends(observer)
    # Its echo (the worker's bookkeeping after the task) is not the window's.
    threading.Event().wait(float(opts.get("settle", 1.0)))
    started = time.time()
    records = [one() for _ in range(int(opts["tasks"]))]
    return {
        "warmup": warmup,
        "records": records,
        "window": [started, time.time()],
        "own_backends": mine,
    }


def burst(opts: dict[str, Any]) -> dict[str, Any]:
    from django.utils import timezone
    from pulpcore.app.tasks.test import sleep as sleep_task
    from pulpcore.tasking.tasks import dispatch

    observer = Observer(opts["observer_dsn"], spy=False)
    n, seconds = int(opts["tasks"]), float(opts.get("seconds", 0.5))
    spacing = float(opts.get("spacing", 0))
    began = timezone.now()
    errors: list[str] = []
    pause = threading.Event()
    took: list[float] = []
    for _ in range(n):
        began_one = time.perf_counter()
        try:
            dispatch(sleep_task, args=(seconds,))
        except Exception as exc:  # an outage: the task row exists, its wake-up is lost
            errors.append(f"{type(exc).__name__}: {exc}"[:200])
        took.append(time.perf_counter() - began_one)
        if spacing:
            pause.wait(spacing)  # spreads the burst over a fault, not a synchronisation
    pks = [
        str(pk)
        for (pk,) in observer.conn.execute(
            "SELECT pulp_id FROM core_task WHERE pulp_created >= %s AND name LIKE %s",
            [began, "%sleep%"],
        ).fetchall()
    ]
    rows = observer.wait(pks, ("running", *FINAL), float(opts.get("timeout", 60)))
    rows = observer.wait(pks, FINAL, float(opts.get("timeout", 60)))
    records = [_record(observer, pk, rows[pk]) for pk in pks]
    starts = [row["started"] for row in rows.values() if row["started"] is not None]
    return {
        "dispatched": n,
        "dispatch_errors": errors,
        "records": records,
        "first_created": min((row["created"] for row in rows.values()), default=None),
        "last_created": max((row["created"] for row in rows.values()), default=None),
        "dispatch_seconds": took,
        "last_started": max(starts, default=None),
    }


def dispatch_one(opts: dict[str, Any]) -> dict[str, Any]:
    from pulpcore.app.tasks.test import sleep as sleep_task
    from pulpcore.tasking.tasks import dispatch

    if opts.get("wait_for_go"):
        # Imported and connected: the runner freezes the workers now, then says go.
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        sys.stdin.readline()
    task = dispatch(sleep_task, args=(0,))
    return {"id": str(task.pk), "created": task.pulp_created}


def main(argv: list[str]) -> int:
    command, opts = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    commands = {"sequential": sequential, "burst": burst, "dispatch": dispatch_one}
    if command not in commands:
        raise SystemExit(f"unknown command {command!r}")
    setup_django()
    result = commands[command](opts)
    sys.stdout.write(RESULT_MARK + json.dumps(result, default=_default) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
