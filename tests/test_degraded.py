"""Degraded mode: a subscriber cut off from its server keeps its owner looking for work.

On the memory backend (its server can be taken down and brought back in-process) and on a
throwaway Redis that is stopped and started again.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from pulp_pubsub import Message, get_backend, publish
from pulp_pubsub.backends import memory
from pulp_pubsub.backends.listener.responder import describe_subscriber
from pulp_pubsub_tools.testing import RedisServer

from .test_redis import redis_backend
from .util import dispatch_until, wait_until

MEMORY = {"PUBSUB_BACKEND": "memory", "PUBSUB_URL": None, "PUBSUB_CHANNEL_PREFIX": ""}
#: Fast enough for a test; the reconnect backoff stays longer than an interval, so the
#: periodic resyncs come from the wait between attempts, as in a real outage.
FAST = {"outage_interval": 0.05, "reconnect_min": 0.2, "reconnect_max": 0.4}


@pytest.fixture
def server_down() -> Iterator[None]:
    try:
        memory.set_server_down(True)
        memory.drop_connections()
        yield
    finally:
        memory.set_server_down(False)


def resyncs(got: list[Message], channel: str) -> int:
    return sum(1 for m in got if m.resync and m.channel == channel)


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and text in r.message)


def test_cut_off_from_its_server_a_subscriber_resyncs_every_channel_until_it_returns(caplog):
    got: list[Message] = []
    with override_settings(**MEMORY, PUBSUB_OPTIONS=FAST), get_backend().subscriber() as sub:
        sub.subscribe("a", got.append)
        sub.subscribe("b", got.append)
        assert sub.wait_connected(10)
        assert sub.degraded_since is None
        memory.set_server_down(True)
        try:
            memory.drop_connections()
            # No connection can be made: every resync here is degraded mode's.
            dispatch_until(sub, lambda: min(resyncs(got, "a"), resyncs(got, "b")) >= 3)
            assert sub.degraded_since is not None
            assert warnings(caplog, "subscriber is degraded") == 1  # once per outage
            assert json.loads(describe_subscriber(sub, "q"))["degraded_since"] is not None
        finally:
            memory.set_server_down(False)
        assert sub.wait_connected(10)
        assert sub.degraded_since is None
        assert warnings(caplog, "no longer degraded") == 1
        got.clear()
        publish("a", "pushed again")
        dispatch_until(sub, lambda: any(m.payload == "pushed again" for m in got))
    assert sub.stats["degraded"] == 1


def test_outage_interval_zero_turns_degraded_mode_off(server_down):
    with override_settings(**MEMORY, PUBSUB_OPTIONS={"outage_interval": 0}):
        with get_backend().subscriber() as sub:
            sub.subscribe("a", lambda m: None)
            wait_until(lambda: sub.stats["reconnects"] >= 1, what="the failed connect")
            assert sub._loop.degraded.left() == math.inf
            assert sub.degraded_since is None


@pytest.mark.parametrize("bad", [-1, "5", None])
def test_a_bad_outage_interval_is_refused(bad):
    with override_settings(**MEMORY, PUBSUB_OPTIONS={"outage_interval": bad}):
        with pytest.raises(ImproperlyConfigured, match="outage_interval"):
            get_backend()


@pytest.mark.backend
@pytest.mark.servers
def test_redis_stopped_mid_run_degrades_to_periodic_resyncs_and_push_resumes(caplog):
    got: list[Message] = []
    with RedisServer() as server:
        with redis_backend(server.url, **FAST) as backend, backend.subscriber() as sub:
            sub.subscribe("jobs", got.append)
            assert sub.wait_connected(10)
            server.stop()
            dispatch_until(sub, lambda: resyncs(got, "jobs") >= 3)
            assert sub.degraded_since is not None
            server.start()
            assert sub.wait_connected(30)
            assert sub.degraded_since is None
            got.clear()
            backend.publish("jobs", "after")
            dispatch_until(sub, lambda: any(m.payload == "after" for m in got))
    assert warnings(caplog, "subscriber is degraded") == 1
    assert warnings(caplog, "no longer degraded") == 1
