"""A fleet of subscriber processes for the PgBouncer test and the benchmark.

``python -m pulp_pubsub_tools.testing.fleet N WAKEUPS`` in a Django project whose
``PUBSUB_*`` settings (from the environment) name the backend: forks N
subscriber processes (one Django start-up for all), waits until each is
subscribed to ``fleet_wakeup``, then publishes WAKEUPS wake-ups, each in
a transaction of its own on the ``default`` database, as Pulp's dispatch
does. Each subscriber answers every wake-up with a query on its own Django
connection, as a worker looks for tasks. Prints one JSON line: how many
subscribers heard every wake-up (or a resync after the ones they missed).
"""

from __future__ import annotations

import json
import os
import sys
import time

#: A channel of the fleet's own: Pulp's wake-up channel accepts only "unblock" and "handle",
#: and each wake-up here carries its number, so a subscriber can tell which it heard.
CHANNEL = "fleet_wakeup"


def _subscriber(ready_w: int, done_w: int, wakeups: int, timeout: float) -> int:
    from django.db import connection

    from pulp_pubsub import Message, get_backend

    heard: set[str] = set()
    resynced = 0

    def on_wakeup(message: Message) -> None:
        nonlocal resynced
        if message.resync:
            resynced += 1
        else:
            heard.add(message.payload)
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    with get_backend().subscriber() as sub:
        sub.subscribe(CHANNEL, on_wakeup)
        os.write(ready_w, b"r")
        deadline = time.monotonic() + timeout
        while len(heard) < wakeups and time.monotonic() < deadline:
            sub.dispatch(timeout=deadline - time.monotonic())
    connection.close()
    line = json.dumps({"heard": len(heard), "resyncs": resynced}) + "\n"
    os.write(done_w, line.encode())
    return 0 if len(heard) == wakeups or resynced else 1


def main(argv: list[str]) -> int:
    import django

    django.setup()
    from django.db import connection, connections, transaction

    from pulp_pubsub import publish

    count, wakeups = int(argv[0]), int(argv[1])
    timeout = float(argv[2]) if len(argv) > 2 else 60.0
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    connections.close_all()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(ready_r)
                os.close(done_r)
                code = _subscriber(ready_w, done_w, wakeups, timeout)
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(ready_w)
    os.close(done_w)
    ready = 0
    while ready < count:
        got = os.read(ready_r, count)
        if not got:
            break
        ready += len(got)
    started = time.monotonic()
    for i in range(wakeups):
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            publish(CHANNEL, f"wakeup {i}")
    published = time.monotonic() - started
    results = []
    with os.fdopen(done_r) as done:
        for line in done:
            results.append(json.loads(line))
    exits = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    summary = {
        "subscribers": count,
        "ready": ready,
        "wakeups": wakeups,
        "heard_all": sum(1 for r in results if r["heard"] == wakeups),
        "resynced": sum(1 for r in results if r["resyncs"]),
        "failed": sum(1 for code in exits if code),
        "publish_seconds": round(published, 3),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
