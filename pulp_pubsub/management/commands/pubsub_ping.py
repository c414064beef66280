from __future__ import annotations

import statistics
import time
import uuid
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pulp_pubsub import Message, get_backend
from pulp_pubsub.exceptions import PubSubError


class Command(BaseCommand):
    help = (
        "Send messages to yourself through the configured backend and print the round trip; "
        "exits non-zero when the backend cannot be reached (a health check)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, default=1, help="Round trips to make.")
        parser.add_argument(
            "--timeout", type=float, default=5.0, help="Seconds to wait for each reply."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["count"] < 1:
            raise CommandError("--count must be at least 1.")
        try:
            backend = get_backend()
            subscriber = backend.subscriber()
        except (PubSubError, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc
        channel = f"pubsub_ping_{uuid.uuid4().hex[:12]}"
        arrived: list[Message] = []
        with subscriber:
            subscriber.subscribe(channel, arrived.append)
            if not subscriber.wait_connected(options["timeout"]):
                raise CommandError(
                    f"Cannot reach the {backend.name} server: {subscriber.last_error}"
                )
            rtts = [self._round_trip(backend, subscriber, channel, arrived, options["timeout"])]
            for _ in range(options["count"] - 1):
                rtts.append(
                    self._round_trip(backend, subscriber, channel, arrived, options["timeout"])
                )
        summary = f"{backend.name}: {len(rtts)} round trip(s), " + (
            f"{rtts[0] * 1000:.2f} ms"
            if len(rtts) == 1
            else f"min {min(rtts) * 1000:.2f} ms, median {statistics.median(rtts) * 1000:.2f} ms, "
            f"max {max(rtts) * 1000:.2f} ms"
        )
        self.stdout.write(self.style.SUCCESS(summary))

    def _round_trip(self, backend, subscriber, channel, arrived, timeout) -> float:
        token = uuid.uuid4().hex
        started = time.monotonic()
        try:
            backend.publish(channel, token)
        except PubSubError as exc:
            raise CommandError(f"Publish failed: {exc}") from exc
        deadline = started + timeout
        while not any(m.payload == token for m in arrived):
            left = deadline - time.monotonic()
            if left <= 0:
                raise CommandError(
                    f"No reply from the {backend.name} server within {timeout} s "
                    f"({subscriber.last_error or 'connected, but the message never came back'})."
                )
            subscriber.dispatch(timeout=left)
        return time.monotonic() - started
