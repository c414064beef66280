"""A throwaway PostgreSQL for the contract and fault tests of the postgres backend.

The layer reaches it through ``PUBSUB_URL``, so it listens and publishes on
connections of its own there, and a publish inside ``atomic()`` on the Django
alias "postgres" waits for its commit through ``on_commit``. The native path,
NOTIFY on Django's own connection, needs a Django alias for the server and is
tested in tests/test_postgres.py.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg

from pulp_pubsub_tools.testing import PostgresServer

from .harness import Harness

#: The stop modes of the other harnesses, in PostgreSQL's words.
MODES = {"graceful": "fast", "kill": "immediate"}


class PostgresHarness(Harness):
    name = "postgres"
    cross_process = True
    payload_limit = 7999
    allows_nul = False
    db_alias = "postgres"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        # Our own listener sessions are told apart by name, so fault injection
        # terminates them and nothing else.
        self.application_name = f"pulp-pubsub test {uuid.uuid4().hex[:8]}"

    @property
    def url(self) -> str:
        return self.server.url

    def settings(self, **extra_options: Any) -> dict[str, Any]:
        options = {
            "application_name": self.application_name,
            "database": self.db_alias,
            **extra_options,
        }
        return {"PUBSUB_BACKEND": "postgres", "PUBSUB_URL": self.url, "PUBSUB_OPTIONS": options}

    def connect(self) -> psycopg.Connection[Any]:
        """A plain client of the server, as psql or stock Pulp would be."""
        return psycopg.connect(self.url, autocommit=True, connect_timeout=5)

    def restart(self, mode: str = "fast") -> None:
        self.server.restart(MODES.get(mode, mode))

    def kill_subscriber_connections(self) -> int:
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND pid <> pg_backend_pid()",
                [self.application_name],
            ).fetchall()
        return len(rows)

    def freeze(self) -> None:
        self.server.freeze()

    def thaw(self) -> None:
        self.server.thaw()

    def publish_external(self, wire_channel: str, payload: str) -> None:
        with self.connect() as conn:
            conn.execute("SELECT pg_notify(%s, %s)", [wire_channel, payload])


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[PostgresHarness]:
    with PostgresServer() as server:
        yield PostgresHarness(server)
