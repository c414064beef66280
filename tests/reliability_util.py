"""Helpers shared by the reliability, property and security tests (every backend)."""

from __future__ import annotations

import gc
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from pulp_pubsub import Message
from pulp_pubsub.backends import memory
from pulp_pubsub.backends.base import BaseBackend
from pulp_pubsub.backends.listener import Subscriber
from pulp_pubsub.conf import PubSubSettings
from pulp_pubsub.handler import create_backend
from pulp_pubsub_tools.testing import free_port

from .harness import Harness

#: Short probe, backoff and timeouts, so that faults are noticed and recovered from in seconds.
FAST: dict[str, Any] = {
    "probe_interval": 1.0,
    "probe_timeout": 1.0,
    "reconnect_min": 0.05,
    "reconnect_max": 0.5,
    "connect_timeout": 2.0,
    "publish_timeout": 1.0,
}
#: How long a test waits for something that should take milliseconds.
PATIENCE = 15.0


def build(harness: Harness, prefix: str = "", **options: Any) -> BaseBackend:
    """A backend of the harness's server built directly, outside the process's handler.

    A fixture that outlives one test, or a property test's examples, needs one that the
    per-test reset of the handler does not close.
    """
    settings = harness.settings(**options)
    return create_backend(
        PubSubSettings(
            backend=settings["PUBSUB_BACKEND"],
            url=settings.get("PUBSUB_URL"),
            options=settings.get("PUBSUB_OPTIONS") or {},
            channel_prefix=prefix or settings.get("PUBSUB_CHANNEL_PREFIX", ""),
        )
    )


def dead_url(url: str) -> str:
    """The same URL on a loopback port where nothing listens: a server that is down.

    A comma-separated list (the relay backend's) gets a dead port for each.
    """
    if "," in url:
        return ",".join(dead_url(part) for part in url.split(","))
    parts = urllib.parse.urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + f"127.0.0.1:{free_port()}"
    return parts._replace(netloc=netloc).geturl()


class Inbox:
    """Collects messages; waits for them through dispatch() or, once started, a condition."""

    def __init__(self, sub: Subscriber, started: bool = False) -> None:
        self.sub, self.started = sub, started
        self.messages: list[Message] = []
        self.cond = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[list[Message]], bool], timeout: float = PATIENCE) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.cond:
                if predicate(self.messages):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; received only {self.messages[-20:]}")
                if self.started:
                    self.cond.wait(left)
                    continue
            self.sub.dispatch(timeout=left)

    def wait_payload(self, payload: str, channel: str | None = None) -> Message:
        def found(messages: list[Message]) -> bool:
            return any(
                m.payload == payload and not m.resync and channel in (None, m.channel)
                for m in messages
            )

        self.wait(found)
        return next(m for m in self.messages if m.payload == payload and not m.resync)

    def payloads(self, channel: str | None = None) -> list[str]:
        with self.cond:
            return [
                m.payload for m in self.messages if not m.resync and channel in (None, m.channel)
            ]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def collected_fds() -> int:
    """Open descriptors once the collector has run: a client library may leave one to it.

    kazoo's select(), for one, leaves its epoll object to the collector when registering a
    descriptor fails because the connection closed under it: garbage, not a leak.
    """
    gc.collect()
    return open_fds()


def fd_targets() -> dict[str, str]:
    """What each open descriptor is (socket, pipe, file), to say which one a test leaked."""
    targets = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # closed meanwhile
    return targets


def server_connections(harness: Harness) -> int:
    """Client connections the harness's server holds now, not counting the one asking."""
    if hasattr(harness, "server_connections"):
        return int(harness.server_connections())
    if harness.name == "memory":
        with memory._hub.lock:
            return len(memory._hub.transports)
    if harness.name == "postgres":
        with harness.connect() as conn:  # type: ignore[attr-defined]
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
        return int(row[0])
    if harness.name == "redis":
        with harness.connect() as client:  # type: ignore[attr-defined]
            return len(client.client_list()) - 1
    counter = getattr(harness, "server_connections", None)
    if counter is not None:
        return int(counter())
    raise NotImplementedError(f"no connection count for the {harness.name} harness")
