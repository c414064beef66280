"""Dependency floors: what the layer does on an older libpq, and the checks that say so.

redis-py's floor (4.3, as pulpcore allows) is tested by .ci/run, which runs tests/test_redis.py
again in a throwaway virtualenv with redis==4.3.6.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from django.db import connections
from django.test import override_settings

from pulp_pubsub import checks
from pulp_pubsub.backends.postgres.backend import PostgresBackend
from pulp_pubsub_tools.testing import PostgresServer

from .util import wait_until


def old_libpq(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psycopg.pq, "version", lambda: 130011)


@pytest.mark.backend
@pytest.mark.servers
def test_without_pipeline_mode_the_probe_is_an_empty_query_not_a_reconnect(monkeypatch):
    old_libpq(monkeypatch)
    name = f"floor {uuid.uuid4().hex[:8]}"
    with PostgresServer() as server:
        options = {"application_name": name, "probe_interval": 0.1, "queue_check_interval": 0.1}
        backend = PostgresBackend(url=server.url, options=options)
        try:
            with backend.subscriber() as sub:
                sub.subscribe("a", lambda m: None)
                assert sub.wait_connected(10)
                wait_until(lambda: sub.stats["probes"] >= 5 and sub.probe_rtt, 15, "5 probes")
                assert sub.stats["reconnects"] == 0 and sub.stats["probe_failures"] == 0
                with psycopg.connect(server.url, autocommit=True) as admin:
                    [(last,)] = admin.execute(
                        "SELECT query FROM pg_stat_activity WHERE application_name = %s",
                        [name],
                    ).fetchall()
                # The session's last statement is the probe's empty query (a bare Sync in
                # pipeline mode would have left its LISTEN there).
                assert last == ""
        finally:
            backend.close()


def test_a_libpq_without_pipeline_mode_is_a_warning_at_start_up(monkeypatch):
    with override_settings(PUBSUB_BACKEND="postgres", PUBSUB_URL="postgresql://h/db"):
        assert checks.check_libpq() == []
        old_libpq(monkeypatch)
        [warning] = checks.check_libpq()
    assert warning.id == "pulp_pubsub.W010" and "libpq 130011" in warning.msg
    with override_settings(PUBSUB_BACKEND="memory"):
        assert checks.check_libpq() == []


def test_the_deploy_check_asks_for_a_connect_timeout_on_djangos_connection():
    alias = f"floor_{uuid.uuid4().hex[:8]}"
    base = {**connections.settings["default"], "ENGINE": "django.db.backends.postgresql"}
    connections.settings[alias] = {**base, "OPTIONS": {}}
    try:
        with override_settings(
            PUBSUB_BACKEND="postgres", PUBSUB_URL=None, PUBSUB_OPTIONS={"database": alias}
        ):
            [warning] = checks.check_notify_connect_timeout()
            assert warning.id == "pulp_pubsub.W011" and "connect_timeout" in warning.hint
            connections.settings[alias]["OPTIONS"] = {"connect_timeout": 5}
            assert checks.check_notify_connect_timeout() == []
        with override_settings(PUBSUB_BACKEND="postgres", PUBSUB_URL="postgresql://h/db"):
            assert checks.check_notify_connect_timeout() == []
    finally:
        del connections.settings[alias]
