"""Carry stock pulpcore's NOTIFYs onto the layer while a fleet moves to another backend.

During a rolling move from LISTEN/NOTIFY to (say) Redis, processes not yet
restarted still send ``pg_notify`` and processes already moved listen on
Redis. One bridge process closes that gap: it LISTENs on PostgreSQL (a direct
session, never through a transaction pooler) on pulpcore's three channels
and publishes every message through the configured backend. The other
direction is covered by ``PUBSUB_PULPCORE_ALSO_NOTIFY = True`` on the moved
processes. See docs/pulp.md ("Rolling it out").

Run it in a Pulp environment with the *new* settings::

    PULP_SETTINGS=/etc/pulp/settings.py python -m pulp_pubsub.contrib.pulpcore.bridge \\
        --postgres-url postgresql://pulp@db.example.com:5432/pulp

A message the bridge forwards twice (a moved process's own NOTIFY copy) is a
harmless duplicate: wake-ups and cancels are idempotent. When the bridge's
own PostgreSQL session drops, it reconnects and publishes an empty wake-up
(which every worker treats as "look for work"); cancels sent while it was
down are lost, as they would be for a LISTEN that dropped.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
from typing import Any

from ...registry import CANCEL, METRICS_HEARTBEAT, WAKEUP

logger = logging.getLogger(__name__)

CHANNELS = (WAKEUP, CANCEL, METRICS_HEARTBEAT)
APPLICATION_NAME = "pulp-pubsub bridge"


class Bridge:
    def __init__(self, postgres_url: str | None = None) -> None:
        from ... import get_backend
        from ...backends.postgres.backend import PostgresBackend

        self.target = get_backend()
        if self.target.name == "postgres":
            raise SystemExit(
                "PUBSUB_BACKEND is 'postgres': the fleet already shares PostgreSQL's channels "
                "and needs no bridge."
            )
        self.source = PostgresBackend(
            url=postgres_url, options={"application_name": APPLICATION_NAME}
        )
        self.subscriber = self.source.subscriber()
        self.forwarded = 0

    def forward(self, message: Any) -> None:
        from ... import publish

        if message.resync:
            if message.channel == WAKEUP:
                publish(WAKEUP, "")  # every worker looks for work
            return
        publish(message.channel, message.payload)
        self.forwarded += 1

    def run(self) -> None:
        """Forward until SIGTERM or SIGINT."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        stopping: list[int] = []
        previous = signal.set_wakeup_fd(wake_w)
        handlers = {
            signum: signal.signal(signum, lambda signum, frame: stopping.append(signum))
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for channel in CHANNELS:
                self.subscriber.subscribe(channel, self.forward)
            logger.warning(
                "pulp-pubsub bridge: PostgreSQL %s -> %s",
                self.source.describe().get("url") or "(Django's database)",
                self.target.name,
            )
            fd = self.subscriber.fileno()
            while not stopping:
                readable, _, _ = select.select([fd, wake_r], [], [])
                if fd in readable:
                    self.subscriber.dispatch()
        finally:
            signal.set_wakeup_fd(previous)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            os.close(wake_r)
            os.close(wake_w)
            self.subscriber.close()
            self.source.close()
            logger.warning(
                "pulp-pubsub bridge stopped after forwarding %d messages", self.forwarded
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pulp_pubsub.contrib.pulpcore.bridge")
    parser.add_argument(
        "--postgres-url",
        default=None,
        help="where stock processes NOTIFY (default: Django's database, which must then "
        "be a direct connection, not a transaction pooler)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pulpcore.app.settings")
    import django

    django.setup()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    Bridge(args.postgres_url).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
