"""A small fleet of simulated Pulp workers waking each other through the layer.

Each worker waits the way Pulp's does: ``select()`` on its subscriber's
``fileno()`` (beside whatever else it would watch), then ``dispatch()``. The
memory backend only reaches its own process, so there the workers are
threads; any other backend gets one forked process per worker.
"""

from __future__ import annotations

import multiprocessing
import queue
import select
import statistics
import threading
import time
import uuid
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from pulp_pubsub import CANCEL, WAKEUP, Message, get_backend, publish
from pulp_pubsub.exceptions import PubSubError


def run_worker(name: str, control: str, reports: Any, ready: Any) -> None:
    """One simulated worker: report each message with the time it woke for it."""
    backend = get_backend()  # a forked worker gets a backend of its own here
    stop = threading.Event()

    def on_message(message: Message) -> None:
        reports.put((name, message.channel, message.payload, time.time()))

    with backend.subscriber() as subscriber:
        subscriber.subscribe(WAKEUP, on_message)
        subscriber.subscribe(CANCEL, on_message)
        subscriber.subscribe(control, lambda message: stop.set())
        ready.put(name)
        while not stop.is_set():
            readable, _, _ = select.select([subscriber.fileno()], [], [], 30)
            if not readable:
                break
            subscriber.dispatch()


class Command(BaseCommand):
    help = "Start simulated workers, publish wake-ups and a cancel, and show who woke and how fast."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--workers", type=int, default=4, help="Simulated workers (default 4).")
        parser.add_argument("--rounds", type=int, default=3, help="Wake-ups to send (default 3).")

    def handle(self, *args: Any, **options: Any) -> None:
        workers, rounds = options["workers"], options["rounds"]
        if workers < 1 or rounds < 1:
            raise CommandError("--workers and --rounds must be at least 1.")
        try:
            backend = get_backend()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        in_process = backend.name == "memory"
        self.stdout.write(
            f"Backend {backend.name}: {workers} worker {'threads' if in_process else 'processes'}"
        )
        context = multiprocessing.get_context("fork")
        reports: Any = queue.Queue() if in_process else context.Queue()
        ready: Any = queue.Queue() if in_process else context.Queue()
        # A channel of this run's own tells its workers to stop.
        control = f"pubsub_demo_{uuid.uuid4().hex[:12]}"
        connections.close_all()  # a forked child must not share the parent's DB socket
        names = [f"worker-{i + 1}" for i in range(workers)]
        runners: list[Any] = [
            (threading.Thread if in_process else context.Process)(
                target=run_worker, args=(name, control, reports, ready), daemon=True
            )
            for name in names
        ]
        for runner in runners:
            runner.start()
        try:
            for _ in names:
                ready.get(timeout=30)
            self._publish_and_report(names, rounds, reports)
        except (PubSubError, OSError) as exc:
            raise CommandError(f"Demo failed: {exc}") from exc
        finally:
            try:
                backend.publish(control, "stop")
            except PubSubError:
                pass
            for runner in runners:
                runner.join(10)
                if runner.is_alive() and hasattr(runner, "terminate"):
                    runner.terminate()

    def _publish_and_report(self, names: list[str], rounds: int, reports: Any) -> None:
        latencies: list[float] = []
        for number in range(rounds):
            reason = "handle" if number % 2 == 0 else "unblock"
            sent_at = time.time()
            publish(WAKEUP, reason)
            woke = self._collect(reports, len(names), sent_at, latencies)
            self.stdout.write(
                f"wake-up {number + 1} ({reason}): {len(woke)}/{len(names)} workers woke, "
                f"slowest after {max(woke.values()) * 1000:.2f} ms"
            )
        task_id = str(uuid.uuid4())
        publish(CANCEL, task_id)
        cancelled = 0
        for _ in names:
            _name, channel, payload, _ = reports.get(timeout=10)
            cancelled += channel == CANCEL and payload == task_id
        self.stdout.write(f"cancel {task_id}: heard by {cancelled}/{len(names)} workers")
        self.stdout.write(
            self.style.SUCCESS(
                f"wake-up latency over {len(latencies)} deliveries: "
                f"median {statistics.median(latencies) * 1000:.2f} ms, "
                f"max {max(latencies) * 1000:.2f} ms"
            )
        )

    @staticmethod
    def _collect(
        reports: Any, expected: int, sent_at: float, latencies: list[float]
    ) -> dict[str, float]:
        woke: dict[str, float] = {}
        while len(woke) < expected:
            name, channel, _, woke_at = reports.get(timeout=10)
            if channel == WAKEUP:
                woke[name] = woke_at - sent_at
                latencies.append(woke[name])
        return woke
