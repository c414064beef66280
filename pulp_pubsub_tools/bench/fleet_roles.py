"""What the agents of the ``fleet`` scenario do: many subscribers to one process.

A fleet of 2,000 workers cannot be 2,000 forked benchmark processes on one
machine (each holds a Django start-up's worth of private pages once it runs),
so an agent here holds several subscribers, each with its own backend
subscriber (its own connection and listener thread), as that many workers on
one host would. Each subscriber has a thread of its own that waits the way a
worker does, in ``select()`` on the subscriber's ``fileno()``, and dispatches
there; the agent's main thread answers the parent. Everything here runs in the
agent.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from pulp_pubsub.conf import PubSubSettings
from pulp_pubsub.handler import create_backend
from pulp_pubsub.message import Message

from .agents import Link, Role
from .board import Board
from .raw import RawClient
from .roles import CONNECT_WAIT, _command_loop


def raise_fd_limit() -> None:
    """Each subscriber holds a socket or two and two pipes: let the process have what it may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def memory_kb(pid: int | str = "self") -> tuple[int, int]:
    """(PSS, RSS) of one process in kB: PSS shares the pages a fork still shares."""
    pss = rss = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    return pss, rss


class Owners:
    """One thread per subscriber, each waiting on its own descriptor as a worker's main thread
    waits on its ``select()``: a message costs the agent what it costs a worker, not a share
    of one loop over many sockets."""

    def __init__(self) -> None:
        self.stop_r, self.stop_w = os.pipe()
        self.threads: list[threading.Thread] = []

    def start(self, fd: int, on_readable: Callable[[], object]) -> None:
        thread = threading.Thread(target=self._own, args=(fd, on_readable), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _own(self, fd: int, on_readable: Callable[[], object]) -> None:
        stop = self.stop_r
        while True:
            ready = select.select([fd, stop], [], [])[0]
            if stop in ready:
                return
            on_readable()

    def serve(self, link: Link, report: Callable[[], dict[str, Any]]) -> None:
        """Answer the parent until told to stop, then stop every owner thread."""

        def handle(command: dict[str, Any]) -> None:
            if command.get("cmd") == "report":
                link.send(report())

        try:
            _command_loop(link, handle)
        finally:
            self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.stop_w, b"x")  # never read: every owner sees it
        for thread in self.threads:
            thread.join(5)


def _report(probes: Callable[[], int], count: int) -> dict[str, Any]:
    pss, rss = memory_kb()
    return {
        "cpu": time.process_time(),
        "pss_kb": pss,
        "rss_kb": rss,
        "probes": probes(),
        "subscribers": count,
    }


def members(
    settings: PubSubSettings,
    wake: str,
    work: str,
    group: str,
    board: Board,
    per_agent: int,
    total: int,
    connect_wait: float = CONNECT_WAIT,
) -> Callable[[int], Role]:
    """Agent ``i`` holds the subscribers of slots ``i * per_agent`` onwards (up to ``total``).

    Each listens on ``wake`` (broadcasts) and is a member of ``group`` on ``work``
    (targeted), and posts the round number of every message it handles.
    """

    def make(index: int) -> Role:
        slots = range(index * per_agent, min((index + 1) * per_agent, total))

        def role(link: Link) -> None:
            raise_fd_limit()
            backend = create_backend(settings)
            subs = []
            owners = Owners()
            try:
                for slot in slots:

                    def on_message(message: Message, slot: int = slot) -> None:
                        if message.resync:
                            board.resync(slot)
                        elif message.payload.isdigit():
                            board.post(slot, int(message.payload), time.monotonic())

                    sub = backend.subscriber()
                    subs.append(sub)
                    sub.subscribe(wake, on_message)
                    sub.subscribe(work, on_message, group=group)
                deadline = time.monotonic() + connect_wait
                ready = all(
                    sub.wait_connected(max(0.0, deadline - time.monotonic())) for sub in subs
                )
                errors = sorted({str(s.last_error) for s in subs if s.last_error})
                link.send({"ready": ready, "pid": os.getpid(), "last_error": "; ".join(errors)})
                for sub in subs:
                    owners.start(sub.fileno(), sub.dispatch)
                owners.serve(
                    link, lambda: _report(lambda: sum(s.stats["probes"] for s in subs), len(subs))
                )
            finally:
                owners.close()
                for sub in subs:
                    sub.close()
                backend.close()

        return role

    return make


def raw_members(
    client: Callable[[], RawClient], channel: str, board: Board, per_agent: int, total: int
) -> Callable[[int], Role]:
    """The bare client's fleet, held the same way: several connections to one process."""

    def make(index: int) -> Role:
        slots = range(index * per_agent, min((index + 1) * per_agent, total))

        def role(link: Link) -> None:
            raise_fd_limit()
            raws: list[RawClient] = []
            owners = Owners()
            try:
                readers: dict[int, Callable[[], object]] = {}
                for slot in slots:
                    raw = client()
                    raws.append(raw)
                    raw.subscribe(channel)

                    def on_readable(raw: RawClient = raw, slot: int = slot) -> None:
                        for _, payload in raw.read():
                            if payload.isdigit():
                                board.post(slot, int(payload), time.monotonic())

                    readers[raw.fileno()] = on_readable
                for fd, reader in readers.items():
                    owners.start(fd, reader)
                link.send({"ready": True, "pid": os.getpid()})
                owners.serve(link, lambda: _report(lambda: 0, len(raws)))
            finally:
                owners.close()
                for raw in raws:
                    with contextlib.suppress(Exception):
                        raw.close()

        return role

    return make
