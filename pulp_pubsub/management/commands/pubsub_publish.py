from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pulp_pubsub import publish
from pulp_pubsub.exceptions import PubSubError


class Command(BaseCommand):
    help = "Publish one message through the configured pub/sub backend (a manual NOTIFY)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("channel", help="Channel name, e.g. pulp_worker_wakeup.")
        parser.add_argument("payload", nargs="?", default="", help="Message text (default: empty).")

    def handle(self, *args: Any, channel: str, payload: str, **options: Any) -> None:
        try:
            publish(channel, payload)
        except (PubSubError, ImproperlyConfigured) as exc:
            raise CommandError(f"Publish failed: {exc}") from exc
        if options["verbosity"] >= 1:
            self.stdout.write(self.style.SUCCESS(f"Published to {channel}."))
