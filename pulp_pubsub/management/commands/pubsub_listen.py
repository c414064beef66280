from __future__ import annotations

import datetime
import json
import time
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pulp_pubsub import Message, get_backend, registry
from pulp_pubsub.exceptions import PubSubError


class Command(BaseCommand):
    help = "Print messages as they arrive: time, channel, payload."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "channels", nargs="*", help="Channels to listen on (default: every declared channel)."
        )
        parser.add_argument("--count", type=int, help="Stop after this many messages.")
        parser.add_argument("--timeout", type=float, help="Stop after this many seconds.")
        parser.add_argument("--json", action="store_true", help="One JSON object per line.")

    def handle(self, *args: Any, **options: Any) -> None:
        channels = options["channels"] or [c.name for c in registry.channels()]
        count, timeout = options["count"], options["timeout"]
        if count is not None and count < 1:
            raise CommandError("--count must be at least 1.")
        if timeout is not None and timeout <= 0:
            raise CommandError("--timeout must be positive.")
        seen = 0

        def show(message: Message) -> None:
            nonlocal seen
            seen += 1
            stamp = datetime.datetime.fromtimestamp(message.received_at, datetime.UTC)
            if options["json"]:
                line = json.dumps(
                    {
                        "time": stamp.isoformat(),
                        "channel": message.channel,
                        "payload": message.payload,
                        "resync": message.resync,
                    }
                )
            else:
                tag = " (resync: messages may have been missed)" if message.resync else ""
                line = f"{stamp:%H:%M:%S.%f} {message.channel} {message.payload}{tag}"
            self.stdout.write(line)
            self.stdout.flush()

        try:
            backend = get_backend()
            subscriber = backend.subscriber()
        except (PubSubError, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc
        with subscriber:
            try:
                for channel in channels:
                    subscriber.subscribe(channel, show)
            except PubSubError as exc:
                raise CommandError(str(exc)) from exc
            if not subscriber.wait_connected(backend.config["connect_timeout"]):
                raise CommandError(
                    f"Cannot reach the {backend.name} server: {subscriber.last_error}"
                )
            if options["verbosity"] >= 2:
                self.stderr.write(f"Listening on {', '.join(channels)}")
            deadline = None if timeout is None else time.monotonic() + timeout
            while count is None or seen < count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                subscriber.dispatch(timeout=left)
