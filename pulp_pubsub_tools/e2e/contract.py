"""The worker contract, checked on pulpcore's real classes inside a Pulp process.

Run by :mod:`.agent` (``contract``) with the integration installed, a real
backend, and a database of its own. Every check drives pulpcore's unchanged
code (``run()``, ``notify_workers()``, ``record_unblocked_waiting_tasks_metric()``,
``dispatch()``, ``adispatch()``, ``cancel_task()``) and waits for the effect
through the worker's own ``select()``; a check that a message did *not* set a
flag waits for a later marker message instead of for time to pass.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from typing import Any

CHANNELS = ("pulp_worker_wakeup", "pulp_worker_cancel", "pulp_worker_metrics_heartbeat")


class Contract:
    def __init__(self, opts: dict[str, Any]) -> None:
        import pulpcore.tasking.worker as worker_module

        self.opts = opts
        self.worker_module = worker_module
        self.results: dict[str, dict[str, Any]] = {}

    def check(self, name: str, ok: object, detail: object = "") -> None:
        self.results[name] = {"ok": bool(ok), "detail": str(detail)}

    # -- helpers ---------------------------------------------------------------

    def pump(self, worker: Any, until: Any, timeout: float = 5.0) -> bool:
        """Run the worker's own select() until ``until()`` holds."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = self.worker_module.select.select([worker.sentinel], [], [], left)
            if worker.sentinel in readable:
                os.read(worker.sentinel, 256)
        return True

    def marker(self, worker: Any) -> bool:
        """Publish a heartbeat and wait for it: everything sent before has arrived."""
        from django.utils import timezone

        from pulp_pubsub import METRICS_HEARTBEAT, publish

        stamp = timezone.now()
        publish(METRICS_HEARTBEAT, str(stamp))
        return self.pump(worker, lambda: worker.last_metric_heartbeat == stamp)

    @staticmethod
    def reset(worker: Any) -> None:
        worker.wakeup_unblock = worker.wakeup_handle = worker.cancel_task = False

    def kill_connections(self) -> int:
        import redis

        client = redis.Redis.from_url(self.opts["redis_url"])
        try:
            return int(client.client_kill_filter(_type="pubsub"))
        finally:
            client.close()

    def new_worker(self, auxiliary: bool = False) -> Any:
        from pulpcore.app.models import AppStatus

        from pulp_pubsub.contrib.pulpcore.worker import select_shim

        # One worker per process is pulpcore's rule; the previous one has shut down.
        AppStatus.objects._current_app_status = None
        worker = self.worker_module.PulpcoreWorker(auxiliary=auxiliary)
        select_shim.attach(worker.pubsub)
        return worker

    def subscribe_all(self, worker: Any) -> None:
        for channel in CHANNELS:  # exactly what run() executes
            worker.cursor.execute(f"LISTEN {channel}")

    def finish(self, worker: Any) -> None:
        from pulp_pubsub.contrib.pulpcore.worker import select_shim

        select_shim.detach(worker.pubsub)
        worker.pubsub.close()
        worker.shutdown()

    # -- the checks ------------------------------------------------------------------

    def installed(self) -> None:
        import pulpcore.tasking.tasks as tasks_module

        from pulp_pubsub.contrib.pulpcore import state
        from pulp_pubsub.contrib.pulpcore.publishers import NotifyingConnection
        from pulp_pubsub.contrib.pulpcore.worker import PubSubWorkerMixin, select_shim

        self.check(
            "installed: tasks.connection, PulpcoreWorker and select are rebound",
            state.installed
            and issubclass(self.worker_module.PulpcoreWorker, PubSubWorkerMixin)
            and isinstance(tasks_module.connection, NotifyingConnection)
            and self.worker_module.select is select_shim,
            state.reason or state.problems,
        )

    def runs(self) -> None:
        """What run() subscribes to, in burst mode and out of it."""
        for burst in (True, False):
            self.run_once(burst)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def run_once(self, burst: bool) -> None:
        worker = self.new_worker()
        seen: list[str] = []
        ready = threading.Event()
        subscribe = worker.pubsub.subscribe

        def spy(channel: str, callback: Any, group: str | None = None) -> None:
            subscribe(channel, callback, group=group)
            if group is None:  # a group joined on a channel is not another subscription
                seen.append(channel)
            if channel == CHANNELS[0]:
                ready.set()

        def stop() -> None:
            # SIGTERM is how an operator stops a worker; it wakes its select().
            if ready.wait(10):
                os.kill(os.getpid(), signal.SIGTERM)

        worker.pubsub.subscribe = spy
        if not burst:
            threading.Thread(target=stop, daemon=True).start()
        worker.run(burst=burst)
        expected = sorted(CHANNELS[1:] if burst else CHANNELS)
        mode = "burst" if burst else "normal"
        self.check(
            f"{mode} run() subscribes to {', '.join(c.split('_')[-1] for c in expected)}",
            sorted(seen) == expected,
            seen,
        )
        self.check(f"{mode} run() closes its subscriber", worker.pubsub.closed)

    def flags(self, auxiliary: bool) -> None:
        """Each message sets the flags stock pulpcore sets for the same NOTIFY."""
        from pulp_pubsub import CANCEL, WAKEUP, publish

        kind = "auxiliary" if auxiliary else "worker"
        worker = self.new_worker(auxiliary)
        self.subscribe_all(worker)

        def outcome(payload: str) -> tuple[bool, bool]:
            self.reset(worker)
            publish(WAKEUP, payload)
            self.marker(worker)
            return worker.wakeup_unblock, worker.wakeup_handle

        self.check(
            f"{kind}: 'unblock' sets unblock" + (" (ignored: auxiliary)" if auxiliary else ""),
            outcome("unblock") == (not auxiliary, False),
        )
        self.check(f"{kind}: 'handle' sets handle", outcome("handle") == (False, True))
        self.check(
            f"{kind}: an unknown payload sets both flags",
            outcome("") == (not auxiliary, True),
        )

        self.reset(worker)
        worker.notify_workers("handle")
        self.check(
            f"{kind}: hears its own 'handle'", self.pump(worker, lambda: worker.wakeup_handle)
        )

        from django.utils import timezone

        stamp = timezone.now()
        publish("pulp_worker_metrics_heartbeat", str(stamp))
        self.check(
            f"{kind}: a metrics heartbeat moves its timer",
            self.pump(worker, lambda: worker.last_metric_heartbeat == stamp),
        )

        from pulpcore.app.models import Task
        from pulpcore.app.tasks.test import sleep as sleep_task
        from pulpcore.tasking.tasks import dispatch

        task = dispatch(sleep_task, args=(0,))
        Task.objects.filter(pk=task.pk).update(state="running")
        self.reset(worker)
        publish(CANCEL, str(task.pk))
        self.marker(worker)
        idle_ignores = not worker.cancel_task
        worker.task = task
        publish(CANCEL, str(uuid.uuid4()))
        self.marker(worker)
        other_ignored = not worker.cancel_task
        publish(CANCEL, str(task.pk))  # forged: the database says running
        self.marker(worker)
        forged_ignored = not worker.cancel_task
        Task.objects.filter(pk=task.pk).update(state="canceling")
        publish(CANCEL, str(task.pk))
        matched = self.pump(worker, lambda: worker.cancel_task)
        worker.task = None
        Task.objects.filter(pk=task.pk).update(state="canceled")
        self.check(
            f"{kind}: cancel acts only on the running task's id, once the database says "
            "it is being canceled",
            idle_ignores and other_ignored and forged_ignored and matched,
            {
                "idle": idle_ignores,
                "other": other_ignored,
                "forged": forged_ignored,
                "match": matched,
            },
        )

        self.reset(worker)
        killed = self.kill_connections()
        resynced = self.pump(worker, lambda: worker.wakeup_handle, timeout=15)
        self.marker(worker)
        self.check(
            f"{kind}: a resync sets both flags" + (" (unblock stays off)" if auxiliary else ""),
            killed and resynced and worker.wakeup_unblock == (not auxiliary),
            {"killed": killed, "flags": (worker.wakeup_unblock, worker.wakeup_handle)},
        )
        self.finish(worker)

    def publishers(self) -> None:
        """dispatch, adispatch, cancel and the heartbeat publish through the layer."""
        from django.db import transaction
        from django.utils import timezone
        from pulpcore.app.models import Task
        from pulpcore.app.tasks.test import sleep as sleep_task
        from pulpcore.app.util import get_domain, set_domain
        from pulpcore.tasking.tasks import adispatch, cancel_task, dispatch

        from pulp_pubsub import CANCEL, WAKEUP, get_backend
        from pulp_pubsub.registry import RUNNERS, UNBLOCKERS

        worker = self.new_worker()
        self.subscribe_all(worker)
        got: list[tuple[str, str]] = []
        spy = get_backend().subscriber()

        def note(message: Any) -> None:
            got.append((message.channel, message.payload))

        for channel in (WAKEUP, CANCEL):
            spy.subscribe(channel, note)
        # Wake-ups are targeted: the spy is the one member taking them.
        for group in (UNBLOCKERS, RUNNERS):
            spy.subscribe(WAKEUP, note, group=group)
            worker.pubsub.set_accepting(WAKEUP, group, False)

        def heard(expected: tuple[str, str]) -> bool:
            deadline = time.monotonic() + 5
            while expected not in got and time.monotonic() < deadline:
                spy.dispatch(timeout=deadline - time.monotonic())
            found = expected in got
            got.clear()
            return found

        task = dispatch(sleep_task, args=(0,))
        self.check("dispatch() publishes 'unblock'", heard((WAKEUP, "unblock")))

        async def content_app() -> Any:
            set_domain(domain)
            return await adispatch(sleep_task, args=(0,))

        domain = get_domain()
        asyncio.run(content_app())
        self.check("adispatch() publishes 'unblock'", heard((WAKEUP, "unblock")))

        cancel_task(task.pk)  # waiting, no worker holds it: wakes a worker to clean up
        self.check("cancel_task() of a waiting task publishes 'handle'", heard((WAKEUP, "handle")))

        running = dispatch(sleep_task, args=(0,))
        Task.objects.filter(pk=running.pk).update(app_lock=worker.app_status)
        cancel_task(running.pk)
        self.check(
            "cancel_task() of a held task publishes its id on the cancel channel",
            heard((CANCEL, str(running.pk))),
        )

        # Wake-ups leave through the after-commit sender, which counts each after the
        # server took it (the spy may hear one first): all counted before the baseline.
        get_backend().flush()
        published = get_backend().stats["published"]
        with transaction.atomic():
            dispatch(sleep_task, args=(0,))
            held = get_backend().stats["published"] == published
        at_commit = heard((WAKEUP, "unblock"))
        self.check(
            "dispatch() inside atomic() publishes at commit",
            held and at_commit,
            {"held_until_commit": held, "heard_after_commit": at_commit},
        )

        # A resync on the cancel channel asks the database about the running task.
        worker.task = Task.objects.get(pk=running.pk)  # it is canceling now
        self.reset(worker)
        self.kill_connections()
        self.check(
            "a resync while running a canceling task sets cancel",
            self.pump(worker, lambda: worker.cancel_task, timeout=15),
        )
        worker.task = None

        stamp = timezone.now()

        class Rollback(Exception):
            pass

        try:
            with transaction.atomic():
                worker.record_unblocked_waiting_tasks_metric(stamp)
                raise Rollback
        except Rollback:
            pass
        self.marker(worker)
        rolled_back_silent = worker.last_metric_heartbeat != stamp
        worker.record_unblocked_waiting_tasks_metric(stamp)
        committed_heard = self.pump(worker, lambda: worker.last_metric_heartbeat == stamp)
        self.check(
            "the metrics heartbeat goes out at commit, never after a rollback",
            rolled_back_silent and committed_heard,
            {"rollback_silent": rolled_back_silent, "commit_heard": committed_heard},
        )
        spy.close()
        self.finish(worker)

    def run(self) -> dict[str, Any]:
        import psycopg

        spy = psycopg.connect(self.opts["observer_dsn"], autocommit=True)
        stray: list[str] = []
        spy.add_notify_handler(lambda n: stray.append(n.channel))
        for channel in CHANNELS:
            spy.execute(f"LISTEN {channel}")
        self.installed()
        for step in (self.runs, lambda: self.flags(False), lambda: self.flags(True)):
            step()
        self.publishers()
        spy.execute("SELECT 1")
        spy.close()
        self.check("no NOTIFY reached PostgreSQL", not stray, stray)
        return {"checks": self.results}


def run_contract(opts: dict[str, Any]) -> dict[str, Any]:
    return Contract(opts).run()
