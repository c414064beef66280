from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import ssl
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from pulp_pubsub.exceptions import MissingDependency

logger = logging.getLogger("pulp_pubsub.relay")

RELAY_APPLICATION_NAME = "pulp-pubsub relay"


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value

    parse.__name__ = kind.__name__
    return parse


class Command(BaseCommand):
    help = (
        "Run a pub/sub relay: one PostgreSQL session LISTENing for all of its WebSocket "
        "clients (the 'relay' backend). Run several side by side for availability; they "
        "share nothing. The token comes from the PUBSUB_RELAY_TOKEN setting or --token-file."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--bind", default="127.0.0.1:8765", metavar="HOST:PORT", help="Where to listen."
        )
        parser.add_argument(
            "--database",
            default="default",
            metavar="ALIAS",
            help="The Django database whose server the relay LISTENs on (default: default). "
            "Connect it to PostgreSQL itself, never through a transaction pooler.",
        )
        parser.add_argument(
            "--database-url",
            metavar="URL",
            default=os.environ.get("PUBSUB_RELAY_DATABASE_URL") or None,
            help="A postgresql:// URL to LISTEN on instead of the Django database (default: "
            "$PUBSUB_RELAY_DATABASE_URL; prefer it to this option, which ps shows).",
        )
        parser.add_argument(
            "--no-postgres",
            action="store_true",
            help="Hold no PostgreSQL session: only publishers in 'direct' mode reach clients.",
        )
        parser.add_argument("--token-file", metavar="PATH", help="Read the shared token here.")
        parser.add_argument("--certfile", metavar="PATH", help="TLS certificate chain (wss://).")
        parser.add_argument("--keyfile", metavar="PATH", help="TLS private key.")
        parser.add_argument(
            "--max-clients", type=_positive(int), default=1000, help="Refuse more (HTTP 503)."
        )
        parser.add_argument(
            "--send-queue",
            type=_positive(int),
            default=1000,
            help="Frames waiting for one client before it is disconnected as too slow.",
        )
        parser.add_argument(
            "--probe-interval",
            type=_positive(float),
            default=30.0,
            help="Seconds between NOTIFY round trips proving the LISTEN session hears.",
        )
        parser.add_argument("--probe-timeout", type=_positive(float), default=10.0)

    def handle(self, *args: Any, **options: Any) -> None:
        # The system checks may have used Django's connection (pulpcore's query the
        # database); the relay holds one session, its LISTEN, and never uses Django's.
        connections.close_all()
        try:
            from pulp_pubsub.relay.server import Relay
        except ImportError as exc:
            raise CommandError(str(MissingDependency("relay", "relay", exc))) from exc
        host, port = _bind(options["bind"])
        token = self._token(options["token_file"])
        context = self._tls(options["certfile"], options["keyfile"])
        pg_factory = None if options["no_postgres"] else self._pg_factory(options)
        if token is None and not _loopback(host):
            self.stderr.write(
                self.style.WARNING(
                    "No token: any client that reaches this address may subscribe. "
                    "Set PUBSUB_RELAY_TOKEN."
                )
            )
        relay = Relay(
            host=host,
            port=port,
            token=token,
            ssl_context=context,
            max_clients=options["max_clients"],
            queue_size=options["send_queue"],
            pg_factory=pg_factory,
        )
        try:
            asyncio.run(self._serve(relay, "wss" if context else "ws"))
        except OSError as exc:
            raise CommandError(f"Cannot listen on {options['bind']}: {exc}") from exc

    async def _serve(self, relay: Any, scheme: str) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Only the main thread may; call_command from elsewhere stops by cancellation.
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await relay.start()
        where = "no PostgreSQL" if relay.pg is None else "PostgreSQL " + relay.pg.where
        self.stdout.write(f"Relay listening on {scheme}://{relay.host}:{relay.port} ({where})")
        self.stdout.flush()
        try:
            await stop.wait()
        finally:
            await relay.stop()
            self.stdout.write("Relay stopped.")

    @staticmethod
    def _token(path: str | None) -> str | None:
        token: Any
        if path:
            try:
                with open(path) as f:
                    token = f.read().strip()
            except OSError as exc:
                raise CommandError(f"Cannot read --token-file: {exc}") from exc
        else:
            token = getattr(settings, "PUBSUB_RELAY_TOKEN", None) or None
        if token is not None and (not isinstance(token, str) or not token.isprintable()):
            raise CommandError("The relay token must be printable text.")
        return token

    @staticmethod
    def _tls(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
        if not certfile:
            if keyfile:
                raise CommandError("--keyfile needs --certfile.")
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise CommandError(f"Cannot load the TLS certificate: {exc}") from exc
        return context

    @staticmethod
    def _pg_factory(options: dict[str, Any]) -> Any:
        try:
            from pulp_pubsub.backends.postgres.backend import PostgresBackend
            from pulp_pubsub.backends.postgres.session import scrub
            from pulp_pubsub.relay.pglink import PgLink
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from exc
        try:
            backend = PostgresBackend(
                url=options["database_url"],
                options={
                    "database": options["database"],
                    "application_name": RELAY_APPLICATION_NAME,
                },
            )
        except ImproperlyConfigured as exc:
            raise CommandError(f"{exc} (or pass --database-url, or --no-postgres)") from exc
        params = backend.connection_params(RELAY_APPLICATION_NAME)
        where = f"{params.get('host', '')}:{params.get('port', '')}/{params.get('dbname', '')}"

        def factory(relay: Any) -> PgLink:
            link = PgLink(
                backend,
                asyncio.get_running_loop(),
                on_up=relay.pg_up,
                on_down=relay.pg_down,
                on_batch=relay.pg_batch,
                probe_interval=options["probe_interval"],
                probe_timeout=options["probe_timeout"],
            )
            link.where = scrub(where, backend.secret)
            return link

        return factory


def _bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise CommandError(f"--bind must be HOST:PORT, not {text!r}.")
    return host, int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
