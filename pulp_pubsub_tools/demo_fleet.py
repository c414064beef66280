"""The simulated workers of ``pubsub_demo``, and the proxy it cuts one of them off through.

A worker subscribes as the Pulp integration's worker does
(:mod:`pulp_pubsub.contrib.pulpcore.worker`): broadcasts on the wake-up and
cancel channels, plus membership of the wake-up channel's ``unblock`` and
``handle`` groups, with manual acknowledgement given when it is back in its
``select()``, so a wake-up it was handed counts as taken only once it has
acted on it.

To show a reconnect the demo needs to break one worker's connection and
no other's, the same way on every server. The servers' own ways differ
(Redis ``CLIENT KILL`` needs the client's address, PostgreSQL
``pg_terminate_backend`` its pid, core NATS has none without a system
account), so that worker reaches its server through a throwaway
:class:`~pulp_pubsub_tools.testing.TcpProxy` which the demo cuts, as a
network fault would.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from dataclasses import dataclass, field, replace
from importlib import import_module
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from pulp_pubsub import CANCEL, WAKEUP, Message, Subscriber, get_backend
from pulp_pubsub.backends.base import BaseBackend
from pulp_pubsub.conf import get_settings
from pulp_pubsub.handler import create_backend
from pulp_pubsub.registry import RUNNERS, UNBLOCKERS

from .testing import TcpProxy

#: A worker that hears nothing for this long (the demo's parent died) gives up.
IDLE_LIMIT = 120.0
#: How often the cut worker looks whether it has reconnected.
WATCH_INTERVAL = 0.05
#: Ports of the URL schemes a backend takes, for a URL that names none.
DEFAULT_PORTS = {
    "redis": 6379,
    "rediss": 6379,
    "nats": 4222,
    "tls": 4222,
    "etcd": 2379,
    "http": 80,
    "https": 443,
    "ws": 80,
    "wss": 443,
}
NEEDS_LOCAL = (
    "cuts a worker's connection through a local proxy, so it needs a TCP server on 127.0.0.1"
)


class Report(NamedTuple):
    """One message as a worker got it, with when (``time.monotonic()``, system-wide on Linux)."""

    worker: str
    channel: str
    payload: str
    resync: bool
    at: float
    #: "message", "warm" (it heard the warm-up), or "reconnected" (``payload`` is
    #: then how many of its reconnects replayed the gap instead of a resync).
    event: str = "message"


@dataclass
class CutPoint:
    """The proxy in front of one worker, and the server URL that goes through it."""

    proxy: TcpProxy
    url: str = field(repr=False)  # may carry the server's password


def run_worker(name: str, control: str, reports: Any, ready: Any, url: str | None) -> None:
    """One simulated worker: report every message it gets; ``url`` replaces PUBSUB_URL."""
    # A forked worker gets a backend of its own here (the handler notices the new pid).
    backend = create_backend(replace(get_settings(), url=url)) if url else get_backend()
    stop = threading.Event()

    def on_message(message: Message) -> None:
        at = time.monotonic()
        reports.put(Report(name, message.channel, message.payload, message.resync, at))

    def on_control(message: Message) -> None:
        if message.payload == "stop":
            stop.set()
        elif message.payload == "warm-up":
            reports.put(Report(name, "", "", False, time.monotonic(), "warm"))

    try:
        with backend.subscriber(manual_ack=True) as subscriber:
            subscriber.subscribe(CANCEL, on_message)
            subscriber.subscribe(WAKEUP, on_message)
            for group in (UNBLOCKERS, RUNNERS):
                subscriber.subscribe(WAKEUP, on_message, group=group)
            subscriber.subscribe(control, on_control)
            if url:
                watch(subscriber, name, reports, stop)
            ready.put(name)
            while not stop.is_set():
                # Back in its wait: it has acted on what it was handed.
                subscriber.ack()
                readable, _, _ = select.select([subscriber.fileno()], [], [], IDLE_LIMIT)
                if not readable:
                    break
                subscriber.dispatch()
    finally:
        if url:
            backend.close()


def watch(subscriber: Subscriber, name: str, reports: Any, stop: threading.Event) -> None:
    """Report each reconnect of the worker the demo cuts off.

    A resync says so on most servers, but one that replays the gap (NATS
    JetStream, etcd) sends none, so the demo also needs to see the reconnect itself.
    """

    def run() -> None:
        seen = subscriber.stats["reconnects"]
        while not stop.wait(WATCH_INTERVAL):
            lost = subscriber.stats["reconnects"]
            if lost > seen and subscriber.connected:
                seen = lost
                replays = str(subscriber.stats["replays"])
                reports.put(Report(name, "", replays, False, time.monotonic(), "reconnected"))

    threading.Thread(target=run, name="demo-watch", daemon=True).start()


def cut_point(backend: BaseBackend) -> CutPoint | str:
    """A proxy to ``backend``'s server, or why the demo cannot put one in between."""
    if backend.name == "postgres":
        return _postgres_cut_point(backend)
    target = getattr(backend, "target", None)  # Redis resolves REDIS_URL and the like once
    if target is not None:
        if target.sentinels:
            return "follows Sentinel's master, which a single proxy cannot; " + NEEDS_LOCAL
        url = str(target.url)
    else:
        default = getattr(import_module(type(backend).__module__), "DEFAULT_URL", None)
        url = str(backend.url or default or "")
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        port = None
    if "," in parts.netloc or not parts.hostname or port is None:
        return NEEDS_LOCAL
    proxy = _proxy(parts.hostname, port)
    return NEEDS_LOCAL if proxy is None else CutPoint(proxy, proxy.url_for(url))


def _postgres_cut_point(backend: Any) -> CutPoint | str:
    from psycopg.conninfo import make_conninfo

    # The listener's own parameters: PUBSUB_URL's, or those of Django's database.
    params = {
        key: value
        for key, value in backend.connection_params(backend.config["application_name"]).items()
        if value is not None
    }
    host = str(params.get("host") or "")
    if not host or host.startswith("/") or "," in host:
        return NEEDS_LOCAL
    proxy = _proxy(host, int(params.get("port") or 5432))
    if proxy is None:
        return NEEDS_LOCAL
    return CutPoint(proxy, make_conninfo("", **{**params, "host": proxy.host, "port": proxy.port}))


def _proxy(host: str, port: int) -> TcpProxy | None:
    with contextlib.suppress(ValueError, OSError, socket.gaierror):
        return TcpProxy(host, port)
    return None
