from __future__ import annotations

import datetime
import json
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pulp_pubsub import get_backend, registry
from pulp_pubsub.control_auth import policy
from pulp_pubsub.exceptions import IntrospectionDisabled, PubSubError
from pulp_pubsub.management.inspect import Answer, gather, signing_key
from pulp_pubsub.registry import qualname


class Command(BaseCommand):
    help = (
        "Show the configured backend (password hidden), the declared channels, their "
        "handlers and, where the server can tell, how many subscribers each has. With "
        "--live, ask every live subscriber of the fleet who and where it is, on any backend."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")
        parser.add_argument(
            "--live",
            action="store_true",
            help="Ask every live subscriber, through the backend, for its host, pid, "
            "process, channels and state, and list the answers.",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=2.0,
            help="With --live: seconds to wait for answers (default 2).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["timeout"] <= 0:
            raise CommandError("--timeout must be positive.")
        try:
            if options["live"]:
                signing_key(policy())  # before asking the server anything: say why not
            backend = get_backend()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        channels = registry.channels()
        try:
            info = backend.describe()
            counts = backend.subscriber_counts([c.name for c in channels])
            answers = gather(backend, options["timeout"]) if options["live"] else None
        except IntrospectionDisabled as exc:
            raise CommandError(str(exc)) from exc
        except PubSubError as exc:
            raise CommandError(f"Cannot query the {backend.name} server: {exc}") from exc
        rows: list[dict[str, Any]] = [
            {
                "channel": channel.name,
                "description": channel.description,
                "payload": channel.check_doc,
                "handlers": [qualname(h) for h in registry.handlers(channel.name)],
                "subscribers": None if counts is None else counts.get(channel.name),
                "groups": list(channel.groups),
                "delivery": _delivery(backend, channel.groups),
            }
            for channel in channels
        ]
        if answers is not None:
            for row in rows:
                row["live_subscribers"] = _live_count(answers, row["channel"])
        if options["json"]:
            document: dict[str, Any] = {**info, "channels": rows}
            if answers is not None:
                document["live"] = {
                    "timeout": options["timeout"],
                    "subscribers": [_as_json(a) for a in answers],
                }
            self.stdout.write(json.dumps(document, indent=2, default=str))
            return
        warnings = info.pop("warnings", [])
        for key, value in info.items():
            self.stdout.write(f"{key}: {value}")
        for warning in warnings:
            self.stdout.write(self.style.WARNING(f"warning: {warning}"))
        self.stdout.write("")
        for row in rows:
            subs = "?" if row["subscribers"] is None else row["subscribers"]
            live = row.get("live_subscribers")
            live_text = "" if live is None else f"  live: {live}"
            self.stdout.write(
                self.style.MIGRATE_HEADING(f"{row['channel']}  subscribers: {subs}{live_text}")
            )
            if row["description"]:
                self.stdout.write(f"  {row['description']}")
            if row["payload"]:
                self.stdout.write(f"  payload: {row['payload']}")
            self.stdout.write(f"  delivery: {row['delivery']}")
            for handler in row["handlers"] or ["(no handlers)"]:
                self.stdout.write(f"  handler: {handler}")
        if answers is not None:
            self.stdout.write("")
            self._write_table(answers, options["timeout"])

    def _write_table(self, answers: list[Answer], timeout: float) -> None:
        self.stdout.write(
            self.style.MIGRATE_HEADING(
                f"Live subscribers: {len(answers)} answered within {timeout:g} s"
            )
        )
        if not answers:
            self.stdout.write(NO_ANSWER_HINT)
            return
        header = (
            "HOST",
            "PID",
            "PROCESS",
            "CONNECTED SINCE",
            "RECEIVED",
            "RESYNCS",
            "LAST RESYNC",
            "LATENCY",
            "DEGRADED SINCE",
            "CHANNELS",
        )
        table = [header] + [
            (
                a.host,
                str(a.pid),
                a.process,
                _time(a.connected_since) or "-",
                str(a.received),
                str(a.resyncs),
                _time(a.last_resync_at) or "never",
                f"{a.latency * 1000:.1f} ms",
                _time(a.degraded_since) or "-",
                _channel_list(a),
            )
            for a in answers
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        for row in table:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            self.stdout.write("  ".join([*cells, row[-1]]).rstrip())


def _delivery(backend: Any, groups: tuple[str, ...]) -> str:
    """What the channel's messages get on this backend, in words."""
    if not groups:
        return "broadcast"
    names = ", ".join(groups)
    if backend.targets:
        return f"targeted (groups: {names}); untargeted messages broadcast"
    return (
        f"broadcast (the {backend.name} backend cannot target: messages for the groups "
        f"{names} reach every subscriber)"
    )


NO_ANSWER_HINT = (
    "  (Subscribers answer only queries signed with the fleet's key: PUBSUB_CONTROL_KEY, or "
    "the SECRET_KEY it is derived from, must match theirs; they may also have "
    "PUBSUB_INTROSPECTION off, or be at their answer rate limit.)"
)


def _live_count(answers: list[Answer], channel: str) -> int | None:
    """Answering subscribers on ``channel``; None when a cut-short list leaves it unknown."""
    if any(a.channels_total > len(a.channels) and channel not in a.channels for a in answers):
        return None
    return sum(channel in a.channels for a in answers)


def _as_json(answer: Answer) -> dict[str, Any]:
    data = answer.as_dict()
    data["connected_since"] = _time(answer.connected_since)
    data["last_resync_at"] = _time(answer.last_resync_at)
    data["degraded_since"] = _time(answer.degraded_since)
    return data


def _time(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).isoformat(timespec="seconds")


def _channel_list(answer: Answer) -> str:
    if answer.channels_hidden:
        return f"({answer.channels_total} hidden)"
    text = ", ".join(answer.channels) or "(none)"
    missing = answer.channels_total - len(answer.channels)
    return f"{text} (+{missing} more)" if missing > 0 else text
