"""What each agent does. Everything here runs in the agent, never in the parent.

Every agent that consumes waits the way Pulp's worker does: ``select()`` on
the subscriber's ``fileno()`` (beside its control socket, as the worker
watches its signal pipe), then ``dispatch()`` in its own thread. Times are
``time.monotonic()``, which on Linux is one clock for every process, so a
publisher's send time and a subscriber's receive time can be subtracted.
"""

from __future__ import annotations

import os
import random
import select
import time
import uuid
from collections.abc import Callable
from typing import Any

from pulp_pubsub.conf import PubSubSettings
from pulp_pubsub.handler import create_backend
from pulp_pubsub.message import Message

from .agents import Link, Role
from .board import Board
from .monitor import EVENT_INSERT, TASK_MAX, TASK_POLL
from .raw import RawClient

#: Seconds an agent waits for its server before it reports that it is not ready.
CONNECT_WAIT = 30.0
#: Seconds a ping waits for its pong before it counts as lost.
PONG_WAIT = 5.0


def use_database(database: dict[str, Any]) -> Callable[[], None]:
    """An agent set-up: make ``database`` this process's ``default``, as in a Pulp worker."""

    def setup() -> None:
        from django.db import DEFAULT_DB_ALIAS, connections

        configured = connections.configure_settings({DEFAULT_DB_ALIAS: dict(database)})
        connections.settings[DEFAULT_DB_ALIAS] = configured[DEFAULT_DB_ALIAS]

    return setup


def voluntary_switches() -> int | None:
    """How often this process's threads have blocked and been woken again, summed (Linux).

    Per message, that is how many thread wake-ups a message costs: unlike a latency, a count
    that other work on the machine hardly moves. None where /proc does not say.
    """
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            continue  # a thread that ended meanwhile
    return total


def _commands(link: Link, handle: Callable[[dict[str, Any]], None] | None = None) -> bool:
    """Run the commands that have arrived; False when the agent should stop."""
    for command in link.take():
        if command.get("cmd") == "stop":
            return False
        if command.get("cmd") == "cpu":
            link.send({"cpu": time.process_time()})
        elif command.get("cmd") == "switches":
            link.send({"switches": voluntary_switches()})
        elif handle is not None:
            handle(command)
    return not link.eof


def _command_loop(link: Link, handle: Callable[[dict[str, Any]], None]) -> None:
    """Wait for commands and run them until told to stop."""
    while True:
        if not link.pending:
            select.select([link.fileno()], [], [])
            link.fill()
        if not _commands(link, handle):
            return


def _serve(
    link: Link,
    fd: int,
    on_readable: Callable[[], object],
    handle: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Wait on ``fd`` and the control socket until told to stop."""
    while True:
        ready = select.select([fd, link.fileno()], [], [], 0 if link.pending else None)[0]
        if fd in ready:
            on_readable()
        if link.fileno() in ready:
            link.fill()
        if not _commands(link, handle):
            return


def subscriber(settings: PubSubSettings, channel: str, board: Board) -> Callable[[int], Role]:
    """An idle worker: posts the round number of each message it gets, and when it got it."""

    def make(slot: int) -> Role:
        def role(link: Link) -> None:
            backend = create_backend(settings)

            def on_message(message: Message) -> None:
                if message.resync:
                    board.resync(slot)
                elif message.payload.isdigit():
                    board.post(slot, int(message.payload), time.monotonic())

            with backend.subscriber() as sub:
                sub.subscribe(channel, on_message)
                connected = sub.wait_connected(CONNECT_WAIT)
                link.send({"ready": connected, "pid": os.getpid(), "last_error": sub.last_error})

                def join(command: dict[str, Any]) -> None:
                    # The targeted scenario: also a member of a work-queue group.
                    sub.subscribe(command["join"], on_message, group=command["group"])
                    link.send({"joined": True})

                _serve(link, sub.fileno(), sub.dispatch, join)
            backend.close()

        return role

    return make


def echo(settings: PubSubSettings, ping: str, pong: str) -> Role:
    """Answers every ping with a pong carrying the same payload, through the layer."""

    def role(link: Link) -> None:
        backend = create_backend(settings)
        with backend.subscriber() as sub:
            sub.subscribe(ping, lambda message: backend.publish(pong, message.payload))
            link.send({"ready": sub.wait_connected(CONNECT_WAIT), "last_error": sub.last_error})
            _serve(link, sub.fileno(), sub.dispatch)
        backend.close()

    return role


def pinger(settings: PubSubSettings, ping: str, pong: str) -> Role:
    """Measures round trips through the layer: publish a ping, wait for its pong."""

    def role(link: Link) -> None:
        backend = create_backend(settings)
        arrived: set[str] = set()
        with backend.subscriber() as sub:
            sub.subscribe(pong, lambda message: arrived.add(message.payload))
            link.send({"ready": sub.wait_connected(CONNECT_WAIT), "last_error": sub.last_error})

            def send(token: str) -> None:
                backend.publish(ping, token)

            def wait(token: str, deadline: float) -> bool:
                while token not in arrived:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        return False
                    if select.select([sub.fileno()], [], [], left)[0]:
                        sub.dispatch()
                arrived.discard(token)
                return True

            _ping_loop(link, send, wait)
        backend.close()

    return role


def raw_subscriber(
    client: Callable[[], RawClient], channel: str, board: Board
) -> Callable[[int], Role]:
    """The fanout's yardstick: an idle worker on the bare client, posting like subscriber()."""

    def make(slot: int) -> Role:
        def role(link: Link) -> None:
            raw = client()
            raw.subscribe(channel)
            link.send({"ready": True, "pid": os.getpid()})

            def on_readable() -> None:
                for _, payload in raw.read():
                    if payload.isdigit():
                        board.post(slot, int(payload), time.monotonic())

            _serve(link, raw.fileno(), on_readable)
            raw.close()

        return role

    return make


def raw_publisher(client: Callable[[], RawClient]) -> Role:
    def role(link: Link) -> None:
        raw = client()
        raw.publish("pubsub_bench_warmup", "")
        link.send({"ready": True})

        def run(command: dict[str, Any]) -> None:
            sent = time.monotonic()
            raw.publish(command["channel"], command["publish"])
            link.send({"t0": sent, "t1": time.monotonic()})

        _command_loop(link, run)
        raw.close()

    return role


def raw_echo(client: Callable[[], RawClient], ping: str, pong: str) -> Role:
    def role(link: Link) -> None:
        raw = client()
        raw.subscribe(ping)
        link.send({"ready": True})

        def on_readable() -> None:
            for _, payload in raw.read():
                raw.publish(pong, payload)

        _serve(link, raw.fileno(), on_readable)
        raw.close()

    return role


def raw_pinger(client: Callable[[], RawClient], ping: str, pong: str) -> Role:
    def role(link: Link) -> None:
        raw = client()
        raw.subscribe(pong)
        arrived: set[str] = set()
        link.send({"ready": True})

        def wait(token: str, deadline: float) -> bool:
            while token not in arrived:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return False
                if select.select([raw.fileno()], [], [], left)[0]:
                    arrived.update(payload for _, payload in raw.read())
            arrived.discard(token)
            return True

        _ping_loop(link, lambda token: raw.publish(ping, token), wait)
        raw.close()

    return role


def _ping_loop(link: Link, send: Callable[[str], None], wait: Callable[[str, float], bool]) -> None:
    """On ``{"rounds": n}``: n round trips, answered with their durations in seconds."""
    prefix = uuid.uuid4().hex[:8]

    def run(command: dict[str, Any]) -> None:
        rtts: list[float] = []
        lost = 0
        for i in range(command["rounds"]):
            token = f"{prefix}-{command.get('block', 0)}-{i}"
            started = time.perf_counter()
            send(token)
            if wait(token, started + PONG_WAIT):
                rtts.append(time.perf_counter() - started)
            else:
                lost += 1
        link.send({"rtts": rtts, "lost": lost})

    _command_loop(link, run)


def publisher(settings: PubSubSettings) -> Role:
    """Publishes on command and answers with the time just before it did.

    ``{"burst": n, "start": k}`` publishes n messages numbered from k, as fast as it can,
    and answers when the last is out (the fleet scenario reads the server's CPU over it).
    """

    def role(link: Link) -> None:
        backend = create_backend(settings)
        backend.publish("pubsub_bench_warmup", "")  # opens its connection before timing
        link.send({"ready": True})

        def run(command: dict[str, Any]) -> None:
            sent = time.monotonic()
            group = command.get("group")
            if "burst" in command:
                start, count = command["start"], command["burst"]
                for i in range(count):
                    backend.publish(command["channel"], str(start + i), group=group)
                link.send({"sent": count, "elapsed": time.monotonic() - sent})
                return
            backend.publish(command["channel"], command["publish"], group=group)
            # What this backend, as configured, made of it (NATS targets with JetStream only).
            link.send({"t0": sent, "t1": time.monotonic(), "delivery": backend.delivery(group)})

        _command_loop(link, run)
        backend.close()

    return role


def writer(settings: PubSubSettings, channel: str) -> Role:
    """Commits transactions that insert a row and, when asked, publish a wake-up."""

    def role(link: Link) -> None:
        from django.db import connection, transaction

        backend = create_backend(settings)
        cursor = connection.cursor()
        link.send({"ready": True})

        def run(command: dict[str, Any]) -> None:
            commits = errors = 0
            first_error = None
            publish = command["publish"]
            failed_before = backend.stats["deferred_failures"]
            started, cpu = time.monotonic(), time.process_time()
            end = started + command["run"]
            while time.monotonic() < end:
                try:
                    with transaction.atomic():
                        cursor.execute(EVENT_INSERT, ["bench"])
                        if publish:
                            backend.publish(channel, "handle")
                    commits += 1
                except Exception as exc:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"
            # Wake-ups still queued for the after-commit thread are part of the run:
            # the clock stops when the last one has gone out.
            if not backend.flush(command["run"] + 30):
                errors += 1
                first_error = first_error or "publishes after commit still unsent"
            elapsed = time.monotonic() - started
            lost = backend.stats["deferred_failures"] - failed_before
            if lost:
                errors += lost
                first_error = first_error or f"{lost} publish(es) after commit failed"
            link.send(
                {
                    "commits": commits,
                    "elapsed": elapsed,
                    # Every thread's, the after-commit sender's among them.
                    "cpu": time.process_time() - cpu,
                    "errors": errors,
                    "first_error": first_error,
                }
            )

        _command_loop(link, run)
        cursor.close()
        backend.close()

    return role


def poller(period: float, board: Board) -> Callable[[int], Role]:
    """Pulp's polling worker: sleep ``period``, query for new tasks, repeat."""

    def make(slot: int) -> Role:
        def role(link: Link) -> None:
            from django.db import connection

            cursor = connection.cursor()
            cursor.execute(TASK_MAX)
            last = int(cursor.fetchone()[0])
            link.send({"ready": True, "pid": os.getpid()})
            # Workers start at different times: the phase of each one is random.
            next_poll = time.monotonic() + random.uniform(0, period)
            while True:
                left = next_poll - time.monotonic()
                if select.select([link.fileno()], [], [], max(0.0, left))[0]:
                    link.fill()
                    if not _commands(link):
                        break
                    continue
                cursor.execute(TASK_POLL, [last])
                seen = time.monotonic()
                for (task,) in cursor.fetchall():
                    board.post(slot, task, seen)
                    last = max(last, task)
                next_poll = time.monotonic() + period
            cursor.close()

        return role

    return make
