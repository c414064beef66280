"""A small fleet of simulated Pulp workers, woken the way the Pulp integration wakes them.

Each worker waits as Pulp's does (``select()`` on its subscriber's ``fileno()``,
then ``dispatch()``), joins the wake-up channel's groups as
:mod:`pulp_pubsub.contrib.pulpcore.worker` does, and acknowledges a wake-up
only when it is back in its wait. So the demo shows what a Pulp fleet gets:
where the backend targets, a wake-up wakes one idle worker and the others
sleep on; where it cannot, every worker wakes. A cancel reaches everyone. On
a server, the demo then cuts one worker's connection to show a reconnect, its
resync and the next wake-up reaching that worker again.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
import uuid
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from pulp_pubsub import CANCEL, WAKEUP, get_backend, publish
from pulp_pubsub.backends.base import TARGETED, BaseBackend
from pulp_pubsub.exceptions import PubSubError
from pulp_pubsub.registry import RUNNERS, UNBLOCKERS

from ...demo_fleet import CutPoint, Report, cut_point, run_worker

#: The group each wake-up payload goes to, as the Pulp integration sends them.
GROUPS = {"handle": RUNNERS, "unblock": UNBLOCKERS}
MAX_WORKERS = 64
MAX_ROUNDS = 100
#: How long a message may take to reach a worker before the demo calls it lost.
DELIVERY_TIMEOUT = 10.0
#: How long the workers may take to stop.
STOP_TIMEOUT = 10.0
#: How long the warm-up waits before sending itself again.
WARM_UP_AGAIN = 0.5
#: How long after the first worker woke the demo watches the others sleep on.
QUIET = 0.3
#: How long a cut worker may take to reconnect (the backoff caps at reconnect_max).
RECONNECT_TIMEOUT = 30.0


class Command(BaseCommand):
    help = (
        "Start simulated Pulp workers and show a targeted wake-up waking one idle worker, a "
        "cancel reaching all, and (on a server) a reconnect with its resync."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--workers",
            type=int,
            default=4,
            help=f"Simulated workers, 1-{MAX_WORKERS} (default 4).",
        )
        parser.add_argument(
            "--rounds",
            type=int,
            default=3,
            help=f"Wake-ups to send before the cancel, 1-{MAX_ROUNDS} (default 3).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        workers = _bounded(options["workers"], "--workers", MAX_WORKERS)
        rounds = _bounded(options["rounds"], "--rounds", MAX_ROUNDS)
        try:
            backend = get_backend()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        fleet = Fleet(self, backend, workers)
        try:
            fleet.start()
            fleet.show(rounds)
        except (PubSubError, OSError) as exc:
            raise CommandError(f"Demo failed: {exc}") from exc
        finally:
            fleet.stop()
        if fleet.problems:
            raise CommandError("Demo failed: " + "; ".join(fleet.problems))


def _bounded(value: Any, option: str, most: int) -> int:
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        number = int(value)
    if number is None or not 1 <= number <= most:
        raise CommandError(f"{option} must be a whole number from 1 to {most}, not {value!r}.")
    return number


class Fleet:
    """The workers, the proxy in front of the last one, and what they report."""

    def __init__(self, command: Command, backend: BaseBackend, workers: int) -> None:
        self.command = command
        self.backend = backend
        self.in_process = backend.name == "memory"
        self.names = [f"worker-{i + 1}" for i in range(workers)]
        self.targeted = backend.delivery(RUNNERS) == TARGETED
        self.context = multiprocessing.get_context("fork")
        self.reports: Any = queue.Queue() if self.in_process else self.context.Queue()
        self.ready: Any = queue.Queue() if self.in_process else self.context.Queue()
        # A channel of this run's own tells its workers to stop.
        self.control = f"pubsub_demo_{uuid.uuid4().hex[:12]}"
        self.runners: list[Any] = []
        self.cut: CutPoint | None = None
        self.skip_reason = ""
        self.reconnected: str | None = None
        self.woken = 0
        self.sent = 0
        self.problems: list[str] = []

    def write(self, line: str, style: Any = None) -> None:
        self.command.stdout.write(style(line) if style else line)

    # -- the fleet -------------------------------------------------------------

    def start(self) -> None:
        kind = "threads" if self.in_process else "processes"
        url = self.backend.describe().get("url")
        where = f" at {url}" if url else ""
        count = len(self.names)
        kind = kind if count > 1 else kind[:-1] if self.in_process else "process"
        self.write(f"Backend {self.backend.name}{where}: {count} worker {kind}")
        if self.in_process:
            self.skip_reason = "needs a real server (set PUBSUB_BACKEND and PUBSUB_URL)"
        else:
            found = cut_point(self.backend)
            if isinstance(found, str):
                self.skip_reason = found
            else:
                self.cut = found
        connections.close_all()  # a forked child must not share the parent's DB socket
        # The worker behind the proxy starts last: on Redis it is then the one
        # idle since the latest time, which takes the wake-ups, so the demo cuts
        # the worker that is doing the work.
        self._spawn(self.names[:-1], None)
        self._wait_ready(self.names[:-1])
        self._spawn(self.names[-1:], self.cut.url if self.cut else None)
        if self.cut is not None:
            self.cut.proxy.start()
        self._wait_ready(self.names[-1:])
        self._warm_up()
        if self.targeted:
            self.write(
                "Wake-ups are targeted: each goes to one idle worker of the group "
                f"({RUNNERS!r} or {UNBLOCKERS!r}); the others stay asleep."
            )
        else:
            self.write(
                f"The {self.backend.name} backend cannot target a wake-up at one worker: "
                "each one is a broadcast that wakes every worker "
                "(docs/backends.md, targeted delivery).",
                self.command.style.WARNING,
            )

    def _spawn(self, names: list[str], url: str | None) -> None:
        for name in names:
            args = (name, self.control, self.reports, self.ready, url)
            runner = (threading.Thread if self.in_process else self.context.Process)(
                target=run_worker, args=args, daemon=True
            )
            runner.start()
            self.runners.append(runner)

    def _wait_ready(self, names: list[str]) -> None:
        for _ in names:
            try:
                self.ready.get(timeout=DELIVERY_TIMEOUT * 3)
            except queue.Empty:
                raise CommandError("A worker did not subscribe within 30 s.") from None

    def _warm_up(self) -> None:
        """One message to every worker first: a first delivery pays for imports and the like.

        Sent again until every worker has heard it: a worker that reconnected
        meanwhile got a resync instead, as a subscriber may.
        """
        warm: set[str] = set()
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while len(warm) < len(self.names):
            self.backend.publish(self.control, "warm-up")
            again = min(deadline, time.monotonic() + WARM_UP_AGAIN)
            while len(warm) < len(self.names):
                report = self._next(again)
                if report is None:
                    break
                if report.event == "warm":
                    warm.add(report.worker)
            if time.monotonic() >= deadline and len(warm) < len(self.names):
                raise CommandError(f"A worker did not hear within {DELIVERY_TIMEOUT:g} s.")

    def stop(self) -> None:
        try:
            self.backend.publish(self.control, "stop")
            deadline = time.monotonic() + STOP_TIMEOUT
        except PubSubError:
            deadline = 0.0  # they cannot hear it: no point waiting
        for runner in self.runners:
            runner.join(max(0.0, deadline - time.monotonic()))
            if runner.is_alive() and hasattr(runner, "terminate"):
                runner.terminate()
                runner.join(STOP_TIMEOUT)
        if self.cut is not None:
            self.cut.proxy.close()

    # -- the show ----------------------------------------------------------------

    def show(self, rounds: int) -> None:
        for number in range(1, rounds + 1):
            self.wake(number, "handle" if number % 2 else "unblock")
        self.cancel()
        if self.cut is None:
            self.write(f"reconnect: skipped, it {self.skip_reason}.")
        elif self.reconnect():
            self.wake(rounds + 1, "handle")
        effect = (
            f"as broadcasts they would have woken {self.sent * len(self.names)}"
            if self.targeted
            else f"{self.backend.name} broadcasts every wake-up to every worker"
        )
        self.write(
            f"{self.sent} wake-ups woke {self.woken} workers in all; {effect}.",
            self.command.style.SUCCESS,
        )

    def wake(self, number: int, reason: str) -> None:
        sent_at = time.monotonic()
        publish(WAKEUP, reason, group=GROUPS[reason])
        self.sent += 1
        woke: dict[str, float] = {}
        deadline = sent_at + DELIVERY_TIMEOUT
        while len(woke) < len(self.names):
            report = self._next(deadline)
            if report is None:
                break
            if report.channel == WAKEUP and not report.resync:
                woke.setdefault(report.worker, report.at - sent_at)
                if self.targeted and len(woke) == 1:
                    deadline = min(deadline, report.at + QUIET)
        self.woken += len(woke)
        head = f"wake-up {number} ({reason}):"
        if not woke:
            self._problem(f"{head} no worker woke within {DELIVERY_TIMEOUT:g} s")
        elif not self.targeted:
            slowest = max(woke.values()) * 1000
            line = f"{head} {len(woke)}/{len(self.names)} workers woke (broadcast)"
            if self.reconnected in woke:
                line += f", {self.reconnected} (reconnected) among them"
            self.write(f"{line}, slowest after {slowest:.2f} ms")
            if len(woke) < len(self.names):
                self._problem(f"{head} only {len(woke)} of {len(self.names)} workers woke")
        elif len(woke) == 1:
            [(name, latency)] = woke.items()
            asleep = len(self.names) - 1
            rest = f"; the other {asleep} stayed asleep" if asleep else ""
            self.write(f"{head} {self._who(name)} woke after {latency * 1000:.2f} ms{rest}")
        else:
            names = ", ".join(self._who(name) for name in sorted(woke))
            self._problem(f"{head} {len(woke)} workers woke for one targeted wake-up: {names}")

    def cancel(self) -> None:
        task_id = str(uuid.uuid4())
        sent_at = time.monotonic()
        publish(CANCEL, task_id)
        heard: dict[str, float] = {}
        deadline = sent_at + DELIVERY_TIMEOUT
        while len(heard) < len(self.names):
            report = self._next(deadline)
            if report is None:
                break
            if report.channel == CANCEL and report.payload == task_id:
                heard.setdefault(report.worker, report.at - sent_at)
        slowest = f", slowest after {max(heard.values()) * 1000:.2f} ms" if heard else ""
        self.write(
            f"cancel {task_id[:8]}: reached {len(heard)}/{len(self.names)} workers "
            f"(broadcast){slowest}"
        )
        if len(heard) < len(self.names):
            self._problem(f"the cancel reached only {len(heard)} of {len(self.names)} workers")

    def reconnect(self) -> bool:
        assert self.cut is not None
        name = self.names[-1]
        cut_at = time.monotonic()
        self.cut.proxy.cut()
        resynced: dict[str, float] = {}
        back: Report | None = None
        deadline = cut_at + RECONNECT_TIMEOUT
        while len(resynced) < 2 or back is None:
            report = self._next(deadline)
            if report is None:
                break
            if report.worker != name or report.at < cut_at:
                continue
            if report.event == "reconnected" and back is None:
                back = report
                # The resyncs are queued as it reconnects: they come at once or not at all.
                deadline = min(deadline, report.at + QUIET)
            elif report.resync:
                resynced.setdefault(report.channel, report.at - cut_at)
        head = f"reconnect: cut {name}'s connection;"
        if back is None:
            self._problem(f"{head} it did not reconnect within {RECONNECT_TIMEOUT:g} s")
            return False
        after = f"back after {back.at - cut_at:.2f} s"
        if len(resynced) == 2:
            channels = ", ".join(sorted(resynced))
            self.write(f"{head} {after} with resync=True on {channels}")
        elif back.payload != "0":
            self.write(
                f"{head} {after}; the server keeps history, so it replayed what it "
                "missed instead of a resync"
            )
        else:
            self._problem(f"{head} {after} but without a resync on both channels")
            return False
        self.reconnected = name
        # Rejoining its groups' idle members follows the resync by a moment.
        time.sleep(QUIET)
        return True

    def _next(self, deadline: float) -> Report | None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            report: Report = self.reports.get(timeout=left)
        except queue.Empty:
            return None
        return report

    def _who(self, name: str) -> str:
        return f"{name} (reconnected)" if name == self.reconnected else name

    def _problem(self, text: str) -> None:
        self.problems.append(text)
        self.write(text, self.command.style.ERROR)
