from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pulp_pubsub import get_backend, registry
from pulp_pubsub.exceptions import PubSubError
from pulp_pubsub.registry import qualname


class Command(BaseCommand):
    help = (
        "Show the configured backend (password hidden), the declared channels, their "
        "handlers and, where the server can tell, how many subscribers each has."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            backend = get_backend()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        channels = registry.channels()
        try:
            info = backend.describe()
            counts = backend.subscriber_counts([c.name for c in channels])
        except PubSubError as exc:
            raise CommandError(f"Cannot query the {backend.name} server: {exc}") from exc
        rows = [
            {
                "channel": channel.name,
                "description": channel.description,
                "payload": channel.check_doc,
                "handlers": [qualname(h) for h in registry.handlers(channel.name)],
                "subscribers": None if counts is None else counts.get(channel.name),
            }
            for channel in channels
        ]
        if options["json"]:
            self.stdout.write(json.dumps({**info, "channels": rows}, indent=2, default=str))
            return
        warnings = info.pop("warnings", [])
        for key, value in info.items():
            self.stdout.write(f"{key}: {value}")
        for warning in warnings:
            self.stdout.write(self.style.WARNING(f"warning: {warning}"))
        self.stdout.write("")
        for row in rows:
            subs = "?" if row["subscribers"] is None else row["subscribers"]
            self.stdout.write(self.style.MIGRATE_HEADING(f"{row['channel']}  subscribers: {subs}"))
            if row["description"]:
                self.stdout.write(f"  {row['description']}")
            if row["payload"]:
                self.stdout.write(f"  payload: {row['payload']}")
            for handler in row["handlers"] or ["(no handlers)"]:
                self.stdout.write(f"  handler: {handler}")
