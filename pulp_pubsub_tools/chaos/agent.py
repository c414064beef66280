"""One subscriber of a chaos run: subscribes, reports every message, stops on request.

It runs as its own process (``python -m pulp_pubsub_tools.chaos.agent``), reading its spec as one
JSON line on stdin (so the server's password never shows in ``ps``) and stopping when stdin
reaches EOF; it reports one JSON object per line on stdout and logs on stderr. For the memory
backend, whose "server" lives in one process, the same code runs on a thread instead.

Even-numbered agents consume as Pulp's worker does (``select()`` on ``fileno()``, then
``dispatch()`` in their own thread), odd-numbered ones through ``start()``, so both paths are
under fire.
"""

from __future__ import annotations

import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from pulp_pubsub.message import Message

Emit = Callable[[dict[str, Any]], None]

logger = logging.getLogger(__name__)


def build_backend(spec: dict[str, Any]) -> Any:
    """The backend of the spec, built without reading any ``PUBSUB_*`` setting."""
    from pulp_pubsub.conf import PubSubSettings
    from pulp_pubsub.handler import create_backend

    return create_backend(
        PubSubSettings(
            backend=spec["backend"],
            url=spec.get("url"),
            options=dict(spec.get("options") or {}),
            channel_prefix=spec.get("prefix", ""),
        )
    )


def run_agent(spec: dict[str, Any], emit: Emit, stop_fd: int) -> None:
    """Subscribe, report, and return once ``stop_fd`` is readable and at EOF (or has data)."""
    backend = build_backend(spec)
    if spec.get("mutation"):
        from .mutations import mutate

        def dropped(channel: str, seq: int) -> None:
            emit({"k": "drop", "c": channel, "s": seq})

        mutate(backend, spec["mutation"], spec["channels"], dropped, spec.get("seed") or 0)
    sub = backend.subscriber()

    def on_message(message: Message) -> None:
        if message.resync:
            # "d": one of degraded mode's, queued while the server was unreachable: the
            # subscriber is still without a connection (its first ones of an outage come
            # just before it says it is degraded), or it was queued before the connection
            # it has now (a reconnect's own resyncs come after that connection is made).
            before = message.received_at < (sub.connected_since or 0.0)
            degraded = sub.degraded_since is not None or not sub.connected or before
            event = {"k": "r", "c": message.channel, "t": message.received_at, "d": degraded}
            emit({**event, "since": message.since})
            return
        try:
            seq = int(message.payload)
        except ValueError:
            emit({"k": "x", "c": message.channel, "p": message.payload[:80]})
            return
        emit({"k": "m", "c": message.channel, "s": seq, "t": message.received_at})

    try:
        for channel in spec["channels"]:
            sub.subscribe(channel, on_message)
        if spec.get("work"):
            # Targeted delivery: a member of the group, besides the channel's broadcasts.
            sub.subscribe(spec["work"], on_message, group=spec["group"])
        connected = sub.wait_connected(spec.get("ready_timeout", 10))
        emit({"k": "ready", "t": time.time(), "connected": connected})
        if spec.get("mode") == "thread":
            sub.start()
            select.select([stop_fd], [], [])
        else:
            while True:
                ready, _, _ = select.select([sub.fileno(), stop_fd], [], [])
                if sub.fileno() in ready:
                    sub.dispatch()
                if stop_fd in ready:
                    break
        # Whatever is still queued was received before the stop: report it too.
        sub.dispatch()
    finally:
        stats = dict(sub.stats)
        # Resyncs a publisher asked for while its message waited to be stored (NATS with
        # JetStream, no stream leader), counted by the backend: not a gap in any history;
        # and the messages such a publisher sent along, delivered before they were stored.
        stats["unstored_resyncs"] = backend.stats["unstored_resyncs"]
        stats["unstored_deliveries"] = backend.stats["unstored_deliveries"]
        started = time.monotonic()
        sub.close()
        backend.close()
        emit({"k": "stats", "stats": stats, "close_seconds": time.monotonic() - started})


def _configure_django() -> None:
    import django
    from django.conf import settings

    if not settings.configured:
        # Nothing but what the layer needs: the agent reads no project settings, so the
        # same agent serves any project that runs the chaos command.
        settings.configure(INSTALLED_APPS=[], DATABASES={}, USE_TZ=True, LOGGING_CONFIG=None)
    django.setup()


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, spec.get("log_level", "INFO")),
        format=f"%(asctime)s {spec['name']} %(name)s %(levelname)s %(message)s",
    )
    _configure_django()
    lock = threading.Lock()
    out = sys.stdout

    def emit(event: dict[str, Any]) -> None:
        line = json.dumps(event) + "\n"
        with lock:
            out.write(line)
            out.flush()

    try:
        run_agent(spec, emit, sys.stdin.fileno())
    except Exception as exc:
        logger.exception("chaos agent %s failed", spec["name"])
        emit({"k": "err", "e": f"{type(exc).__name__}: {exc}"})
        return 1
    return 0


if __name__ == "__main__":
    os.environ.pop("DJANGO_SETTINGS_MODULE", None)
    sys.exit(main())
