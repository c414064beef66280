"""Two relays side by side over a throwaway PostgreSQL, publishing through pg_notify.

Faults act on what a relay's subscriber depends on: ``kill_subscriber_connections``
kills the relays one after the other (SIGKILL, then started again), so every
subscriber loses the relay it is attached to and moves; ``restart`` restarts
PostgreSQL under the relays and then the relays; ``freeze`` stops both relays.
The PgBouncer test and the PostgreSQL-restart-under-a-relay test are in
tests/test_relay.py.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any, ClassVar

import psycopg

from pulp_pubsub.backends.relay.backend import RelayBackend
from pulp_pubsub_tools.testing import PostgresServer, RelayServer

from .harness import Harness
from .reliability_util import dead_url

#: The stop modes of the other harnesses, in PostgreSQL's words.
MODES = {"graceful": "fast", "kill": "immediate"}
RELAYS = 2


class RelayHarness(Harness):
    name = "relay"
    mode: ClassVar[str] = "pg_notify"
    cross_process = True
    payload_limit = 7999
    allows_nul = False
    db_alias = "postgres"

    def __init__(self, postgres: PostgresServer | None, relays: list[RelayServer], token: str):
        self.postgres = postgres
        self.relays = relays
        self.token = token

    @property
    def url(self) -> str:
        return ",".join(relay.url for relay in self.relays)

    def settings(self, **extra_options: Any) -> dict[str, Any]:
        options: dict[str, Any] = {"publish": self.mode, "database": self.db_alias}
        if self.postgres is not None:
            options["notify_url"] = self.postgres.url
        return {
            "PUBSUB_BACKEND": "relay",
            "PUBSUB_URL": self.url,
            # In the options, so that subprocesses given PUBSUB_OPTIONS get it too;
            # the PUBSUB_RELAY_TOKEN setting is tested in tests/test_relay.py.
            "PUBSUB_OPTIONS": {**options, "token": self.token, **extra_options},
        }

    def down_settings(self, **extra_options: Any) -> dict[str, Any]:
        """Settings whose publish path leads nowhere: no relay (and no PostgreSQL) listens."""
        settings = self.settings(**extra_options)
        settings["PUBSUB_URL"] = dead_url(self.url)
        if self.postgres is not None:
            settings["PUBSUB_OPTIONS"]["notify_url"] = dead_url(self.postgres.url)
        return settings

    def server_connections(self) -> int:
        """Clients of all the relays, not counting the ones asking."""
        # Built by hand: override_settings would reset the backend under test.
        backend = RelayBackend(self.url, {"publish": "direct", "token": self.token})
        try:
            health = backend.relay_health(5.0)
        finally:
            backend.close()
        assert all("error" not in h for h in health), health
        return sum(h["clients"] - 1 for h in health)

    def restart(self, mode: str = "fast") -> None:
        if self.postgres is not None:
            self.postgres.restart(MODES.get(mode, mode))
        for relay in self.relays:
            relay.restart("kill" if mode in ("kill", "immediate") else "graceful")

    def kill_subscriber_connections(self) -> int:
        # One at a time, so a subscriber always has a relay to move to.
        for relay in self.relays:
            relay.restart("kill")
        return len(self.relays)

    def freeze(self) -> None:
        """Everything stops answering: the relays, and PostgreSQL under them."""
        for relay in self.relays:
            relay.freeze()
        if self.postgres is not None:
            self.postgres.freeze()

    def thaw(self) -> None:
        if self.postgres is not None:
            self.postgres.thaw()
        for relay in self.relays:
            relay.thaw()

    def publish_external(self, wire_channel: str, payload: str) -> None:
        """NOTIFY from a plain PostgreSQL client, as psql or stock Pulp would."""
        assert self.postgres is not None
        with psycopg.connect(self.postgres.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT pg_notify(%s, %s)", [wire_channel, payload])


@contextlib.contextmanager
def relays_over(database_url: str | None, token: str, **kwargs: Any) -> Iterator[list[RelayServer]]:
    relays: list[RelayServer] = []
    try:
        for _ in range(RELAYS):
            relays.append(
                RelayServer(database_url, token, probe_interval=1.0, probe_timeout=2.0, **kwargs)
            )
            relays[-1].start()
        yield relays
    finally:
        for relay in relays:
            relay.cleanup()


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[RelayHarness]:
    token = secrets.token_urlsafe(24)
    with PostgresServer() as server, relays_over(server.url, token) as relays:
        yield RelayHarness(server, relays, token)
