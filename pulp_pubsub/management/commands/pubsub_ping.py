from __future__ import annotations

import statistics
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pulp_pubsub import get_backend
from pulp_pubsub.control_auth import policy
from pulp_pubsub.exceptions import IntrospectionDisabled, PubSubError
from pulp_pubsub.management.inspect import ControlClient, signing_key

from .pubsub_channels import NO_ANSWER_HINT


class Command(BaseCommand):
    help = (
        "Send messages to yourself through the configured backend and print the round trip; "
        "with --expect-subscribers, also ask the fleet's live subscribers to answer. Exits "
        "non-zero with the cause when the backend cannot be reached or too few subscribers "
        "answer: a health check for Kubernetes or systemd."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--count", type=int, default=1, help="Round trips to make.")
        parser.add_argument(
            "--timeout", type=float, default=5.0, help="Seconds to wait for each reply."
        )
        parser.add_argument(
            "--expect-subscribers",
            type=int,
            metavar="N",
            help="Also ask the live subscribers --count times and fail unless at least N "
            "different ones answer. Each query waits until N have answered or --timeout.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        rounds, timeout = options["count"], options["timeout"]
        expect = options["expect_subscribers"]
        if rounds < 1:
            raise CommandError("--count must be at least 1.")
        if timeout <= 0:
            raise CommandError("--timeout must be positive.")
        if expect is not None and expect < 0:
            raise CommandError("--expect-subscribers cannot be negative.")
        try:
            if expect is not None:
                signing_key(policy())  # before any round trip: say at once why it cannot ask
            backend = get_backend()
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        try:
            client = ControlClient(backend)
        except (PubSubError, OSError) as exc:
            raise CommandError(
                f"Cannot reach the {backend.name} server: {exc}.{_degraded_note(backend)}"
            ) from exc
        with client:
            try:
                rtts = [self._round_trip(client, timeout) for _ in range(rounds)]
                self.stdout.write(self.style.SUCCESS(f"{backend.name}: {_summary(rtts)}"))
                if hasattr(backend, "relay_health"):
                    self._relay_health(backend.relay_health(timeout))
                if expect is not None:
                    self._ask_subscribers(client, rounds, timeout, expect)
            except IntrospectionDisabled as exc:
                raise CommandError(str(exc)) from exc
            except (PubSubError, OSError) as exc:
                raise CommandError(
                    f"The {backend.name} server failed: {exc}.{_degraded_note(backend)}"
                ) from exc

    def _relay_health(self, relays: list[dict[str, Any]]) -> None:
        """Each relay's own health: a relay down, or deaf to PostgreSQL, fails the check."""
        unhealthy = []
        for relay in relays:
            url = relay["url"]
            if "error" in relay:
                unhealthy.append(f"{url}: {relay['error']}")
                continue
            postgres = relay["postgres"]
            text = (
                f"relay {url}: PostgreSQL {postgres}, {relay['clients']} client(s), "
                f"{relay['channels']} channel(s), {relay['rtt'] * 1000:.2f} ms"
            )
            if postgres in ("listening", "off"):
                self.stdout.write(self.style.SUCCESS(text))
            else:
                self.stdout.write(self.style.ERROR(text))
                unhealthy.append(f"{url}: PostgreSQL {postgres} ({relay.get('postgres_error')})")
        if unhealthy:
            raise CommandError("Unhealthy relay(s): " + "; ".join(unhealthy))

    def _round_trip(self, client: ControlClient, timeout: float) -> float:
        rtt = client.round_trip(timeout)
        if rtt is None:
            raise CommandError(
                f"No reply from the {client.backend.name} server within {timeout:g} s "
                "(connected, but the message never came back)." + client.backend.deaf_hint()
            )
        return rtt

    def _ask_subscribers(
        self, client: ControlClient, rounds: int, timeout: float, expect: int
    ) -> None:
        seen: set[str] = set()
        latencies: list[float] = []
        for _ in range(rounds):
            answers = client.query(timeout, expect=expect)
            seen.update(a.id for a in answers)
            latencies.extend(a.latency for a in answers)
        name = client.backend.name
        if len(seen) < expect:
            raise CommandError(
                f"Only {len(seen)} live {name} subscriber(s) answered within {timeout:g} s; "
                f"expected at least {expect}.{NO_ANSWER_HINT if not seen else ''}"
            )
        text = f"{name}: {len(seen)} live subscriber(s) answered"
        if latencies:
            text += f"; {_summary(latencies)}"
        self.stdout.write(self.style.SUCCESS(text))


def _summary(rtts: list[float]) -> str:
    if len(rtts) == 1:
        return f"1 round trip(s), {rtts[0] * 1000:.2f} ms"
    return (
        f"{len(rtts)} round trip(s), min {min(rtts) * 1000:.2f} ms, "
        f"median {statistics.median(rtts) * 1000:.2f} ms, max {max(rtts) * 1000:.2f} ms"
    )


def _degraded_note(backend: Any) -> str:
    """What the fleet does meanwhile: an operator reading a failed health check needs it."""
    interval = backend.config.get("outage_interval")
    if not interval:
        return (
            " Subscribers that cannot reach it hear nothing until it is back (outage_interval 0)."
        )
    return (
        f" Subscribers that cannot reach it are degraded: they resync every {interval:g} s "
        "(outage_interval) until it is back."
    )
