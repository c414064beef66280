"""PostgreSQL behind a transaction pooler: a LISTEN session that cannot hear must say so.

PgBouncer in transaction pooling mode lends a server connection for one transaction at a
time, so a LISTEN lands on a connection that goes back to the pool at once and nothing it
is notified of is passed on. A real PgBouncer, started by the test, in front of a throwaway
PostgreSQL server.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from pulp_pubsub import Message, get_backend
from pulp_pubsub_tools.testing import PgBouncerServer, PostgresServer

from .util import dispatch_until, wait_until

pytestmark = [pytest.mark.backend, pytest.mark.servers]

FAST = {"probe_interval": 0.2, "probe_timeout": 1.0, "reconnect_min": 0.1, "reconnect_max": 0.5}


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[PostgresServer, PgBouncerServer]]:
    with PostgresServer() as pg, PgBouncerServer(pg, default_pool_size=2) as bouncer:
        yield pg, bouncer


@contextlib.contextmanager
def backend_on(database: dict[str, Any], url: str | None = None, **options: Any) -> Iterator[Any]:
    """The postgres backend with Django's database at ``database`` (and PUBSUB_URL ``url``)."""
    alias = f"pooled_{uuid.uuid4().hex[:8]}"
    connections.settings[alias] = {**connections.settings["default"], **database}
    opts = {"database": alias, "application_name": f"pooler {alias}", **FAST, **options}
    try:
        with override_settings(PUBSUB_BACKEND="postgres", PUBSUB_URL=url, PUBSUB_OPTIONS=opts):
            backend = get_backend()
            try:
                yield backend
            finally:
                backend.close()
    finally:
        if hasattr(connections._connections, alias):
            connections[alias].close()
            delattr(connections._connections, alias)
        del connections.settings[alias]


def test_a_listen_session_behind_a_transaction_pooler_fails_loudly(
    servers, caplog, django_db_blocker
):
    _, bouncer = servers
    caplog.set_level(logging.ERROR, logger="pulp_pubsub")
    with django_db_blocker.unblock(), backend_on(bouncer.django_database()) as backend:
        with backend.subscriber() as sub:
            got: list[Message] = []
            sub.subscribe("jobs", got.append)
            wait_until(lambda: sub.stats["deaf"] >= 1, 15, "the hear check to fail")
            assert sub.deaf and not sub.connected
            for text in (sub.last_error or "", caplog.text):
                assert "pooler" in text and "PgBouncer" in text, text
                assert "Set PUBSUB_URL to a direct connection" in text, text
            levels = {r.levelname for r in caplog.records if "deaf" in r.getMessage()}
            assert levels == {"ERROR"}
        # The operator's health check fails too, and says what to do.
        with pytest.raises(CommandError, match=r"pooler.*PUBSUB_URL to a direct connection"):
            call_command("pubsub_ping", "--timeout=2")


def test_the_fix_the_error_names_works_a_direct_pubsub_url(servers, django_db_blocker):
    pg, bouncer = servers
    with django_db_blocker.unblock(), backend_on(bouncer.django_database(), url=pg.url) as backend:
        with backend.subscriber() as sub:
            got: list[Message] = []
            sub.subscribe("jobs", got.append)
            assert sub.wait_connected(10) and not sub.deaf
            with psycopg.connect(pg.url, autocommit=True) as other:
                other.execute("SELECT pg_notify('jobs', 'heard')")
            dispatch_until(sub, lambda: any(m.payload == "heard" for m in got))
            assert sub.stats["deaf"] == 0
        call_command("pubsub_ping", "--timeout=5")


def test_the_hear_check_follows_a_listen_not_every_probe(servers, django_db_blocker):
    """Idle cost: a NOTIFY wakes every listening session, so probes stay bare Syncs."""
    pg, _ = servers
    with django_db_blocker.unblock(), backend_on(pg.django_database()) as backend:
        with backend.subscriber() as sub:
            sub.subscribe("a", lambda m: None)
            assert sub.wait_connected(10) and not sub.deaf
            wait_until(lambda: sub.stats["probes"] >= 5, 15, "five probes")
            assert sub.stats["hear_checks"] == 1
            sub.subscribe("b", lambda m: None)  # a new LISTEN: checked again
            wait_until(lambda: sub.stats["hear_checks"] == 2, 10, "a hear check after LISTEN")
            probes = sub.stats["probes"]
            wait_until(lambda: sub.stats["probes"] >= probes + 5, 15, "five more probes")
            assert sub.stats["hear_checks"] == 2 and sub.stats["deaf"] == 0
