"""Publishing never hangs on PostgreSQL's default path: NOTIFY on Django's own connection.

No ``PUBSUB_URL``: the layer publishes in the caller's session, so PostgreSQL itself defers the
message to commit. A throwaway server of the module's own is frozen (SIGSTOP: the kernel still
acknowledges every byte, so no TCP setting can notice) while a publish waits for it.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import connections, transaction
from django.test import override_settings

from pulp_pubsub import Message, get_backend
from pulp_pubsub.exceptions import PublishError
from pulp_pubsub_tools.testing import PostgresServer

from .util import dispatch_until

pytestmark = [pytest.mark.backend, pytest.mark.servers]

PUBLISH_TIMEOUT = 1.0
#: Django opens a thread's first connection itself; libpq's connect_timeout (whole seconds,
#: at least 2) in DATABASES[...]["OPTIONS"] is what bounds that, as docs/reliability.md says.
CONNECT_TIMEOUT = 2
SLACK = 0.5


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    with PostgresServer() as pg:
        yield pg


@contextlib.contextmanager
def native_backend(server: PostgresServer) -> Iterator[tuple[Any, str]]:
    alias = f"native_{uuid.uuid4().hex[:8]}"
    database = {**server.django_database(), "OPTIONS": {"connect_timeout": CONNECT_TIMEOUT}}
    connections.settings[alias] = {**connections.settings["default"], **database}
    options = {"database": alias, "publish_timeout": PUBLISH_TIMEOUT, "probe_interval": 0.5}
    try:
        with override_settings(PUBSUB_BACKEND="postgres", PUBSUB_URL=None, PUBSUB_OPTIONS=options):
            backend = get_backend()
            assert backend.defers_natively
            try:
                yield backend, alias
            finally:
                backend.close()
    finally:
        if hasattr(connections._connections, alias):
            connections[alias].close()
            delattr(connections._connections, alias)
        del connections.settings[alias]


def timed(action: Any) -> tuple[BaseException | None, float]:
    """Run ``action`` in this thread (Django's connection is per thread), timed."""
    started = time.monotonic()
    try:
        action()
    except BaseException as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


@contextlib.contextmanager
def thawed_after(server: PostgresServer) -> Iterator[None]:
    """Thawed at the end of the block, or after 30 s: a hang fails the test, not hangs it."""
    rescue = threading.Timer(30, server.thaw)
    rescue.start()
    try:
        yield
    finally:
        rescue.cancel()
        server.thaw()


@pytest.mark.parametrize("in_transaction", [False, True], ids=["autocommit", "atomic"])
def test_a_publish_on_djangos_warm_connection_to_a_frozen_server_gives_up_in_time(
    server, django_db_blocker, in_transaction
):
    channel = f"native_{uuid.uuid4().hex[:8]}"
    with django_db_blocker.unblock(), native_backend(server) as (backend, alias):
        backend.publish(channel, "warm")  # Django's connection of this thread is open

        def attempt() -> None:
            if in_transaction:
                with transaction.atomic(using=alias):
                    connections[alias].cursor().execute("SELECT 1")
                    server.freeze()
                    backend.publish(channel, "frozen")
            else:
                server.freeze()
                backend.publish(channel, "frozen")

        with thawed_after(server):
            error, elapsed = timed(attempt)
        assert isinstance(error, PublishError), repr(error)
        assert "postgres" in str(error) and channel in str(error)
        assert elapsed < PUBLISH_TIMEOUT + SLACK, f"publish took {elapsed:.2f} s"
        # Thawed: the next publish opens a fresh connection and is heard.
        with backend.subscriber() as sub:
            got: list[Message] = []
            sub.subscribe(channel, got.append)
            assert sub.wait_connected(10)
            backend.publish(channel, "after")
            dispatch_until(sub, lambda: any(m.payload == "after" for m in got))


def test_a_cold_publish_to_a_frozen_server_is_bounded_by_djangos_connect_timeout(
    server, django_db_blocker
):
    channel = f"native_{uuid.uuid4().hex[:8]}"
    with django_db_blocker.unblock(), native_backend(server) as (backend, _):
        with thawed_after(server):
            server.freeze()
            error, elapsed = timed(lambda: backend.publish(channel, "cold"))
    assert isinstance(error, PublishError), repr(error)
    assert elapsed < CONNECT_TIMEOUT + SLACK, f"publish took {elapsed:.2f} s"


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_publish_as_the_first_statement_of_atomic_waits_for_the_commit(
    server, django_db_blocker, outcome
):
    """The bounded path bypasses Django's cursor, and with it psycopg's lazy BEGIN."""
    channel = f"native_{uuid.uuid4().hex[:8]}"
    with django_db_blocker.unblock(), native_backend(server) as (backend, alias):
        with backend.subscriber() as sub:
            got: list[Message] = []
            sub.subscribe(channel, got.append)
            assert sub.wait_connected(10)
            with contextlib.suppress(RuntimeError), transaction.atomic(using=alias):
                backend.publish(channel, "first statement")
                # Notifications arrive in commit order: one that escaped the
                # transaction would come before this one, sent and committed after it.
                with psycopg.connect(server.url, autocommit=True) as other:
                    other.execute("SELECT pg_notify(%s, 'probe')", [channel])
                dispatch_until(sub, lambda: any(m.payload == "probe" for m in got))
                assert [m.payload for m in got] == ["probe"]
                if outcome == "rollback":
                    raise RuntimeError("roll back")
            backend.publish(channel, "after")
            dispatch_until(sub, lambda: any(m.payload == "after" for m in got))
            kept = ["first statement"] if outcome == "commit" else []
            assert [m.payload for m in got] == ["probe", *kept, "after"]
