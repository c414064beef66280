"""OpenTelemetry metrics and the reconnect log, read as an operator would read them.

The counts come from the OpenTelemetry SDK's in-memory reader, installed as
the process's meter provider. Every test counts on channels of its own, so
it reads its own series whatever ran before it; instruments without a
channel are read as the change over the test.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import override_settings
from opentelemetry import metrics as otel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from pulp_pubsub import Message, get_backend, publish
from pulp_pubsub.backends import memory
from pulp_pubsub.backends.listener import outage as outage_log
from pulp_pubsub.exceptions import PubSubError

from .test_subscriber import MEMORY
from .util import dispatch_until, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENT = "messaging.client.sent.messages"
CONSUMED = "messaging.client.consumed.messages"
_installed: tuple[MeterProvider, InMemoryMetricReader] | None = None


@pytest.fixture(scope="module")
def reader() -> InMemoryMetricReader:
    """The SDK's in-memory reader, behind the global meter provider (set once per process)."""
    global _installed
    if _installed is None:
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        otel.set_meter_provider(provider)
        _installed = provider, reader
    provider, reader = _installed
    assert otel.get_meter_provider() is provider, "another meter provider was installed first"
    return reader


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    """(attributes, data point) of every series of instrument ``name``."""
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            if scope.scope.name != "pulp_pubsub":
                continue
            for metric in scope.metrics:
                if metric.name == name:
                    found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
    return found


def value(reader: InMemoryMetricReader, name: str, **attributes: Any) -> float:
    """The sum over the series of ``name`` whose attributes include ``attributes``."""
    wanted = {key.replace("__", "."): v for key, v in attributes.items()}
    return sum(p.value for attrs, p in points(reader, name) if wanted.items() <= attrs.items())


def histogram_count(reader: InMemoryMetricReader, name: str, **attributes: Any) -> int:
    wanted = {key.replace("__", "."): v for key, v in attributes.items()}
    return sum(p.count for attrs, p in points(reader, name) if wanted.items() <= attrs.items())


@pytest.fixture
def backend() -> Iterator[Any]:
    with override_settings(**MEMORY, PUBSUB_OPTIONS={"reconnect_min": 0.01}):
        yield get_backend()


@pytest.fixture
def channel() -> str:
    return f"metrics.{uuid.uuid4().hex[:8]}"


def break_connection_of(backend: Any, channel: str) -> None:
    """Break only the connection(s) listening on ``channel``, as the server would."""
    with memory._hub.lock:
        victims = list(memory._hub.listeners.get(backend.wire_name(channel), ()))
    assert victims
    for transport in victims:
        transport.kill()


def test_known_traffic_is_counted_per_channel(reader, backend, channel):
    got: list[Message] = []
    with backend.subscriber() as sub:
        sub.subscribe(channel, got.append)
        for payload in ["a", "b", "b"]:
            publish(channel, payload)
        wait_until(lambda: sub.stats["received"] + sub.stats["folded"] == 3, what="arrival")
        assert sub.dispatch() == 2
    assert [m.payload for m in got] == ["a", "b"]
    on = {"messaging__system": "memory", "messaging__destination__name": channel}
    assert value(reader, SENT, messaging__operation__name="publish", **on) == 3
    assert value(reader, CONSUMED, messaging__operation__name="dispatch", **on) == 2
    assert value(reader, "pulp_pubsub.received.messages", **on) == 2
    assert value(reader, "pulp_pubsub.folded.messages", **on) == 1
    assert value(reader, "pulp_pubsub.handler.errors", **on) == 0
    assert not any(
        "error.type" in attrs for attrs, _ in points(reader, SENT) if channel in attrs.values()
    )


def test_a_full_queue_counts_drops_and_the_resync_that_replaces_them(reader, channel):
    with override_settings(**MEMORY, PUBSUB_OPTIONS={"max_pending": 2}):
        with get_backend().subscriber() as sub:
            got: list[Message] = []
            sub.subscribe(channel, got.append)
            for payload in "abcd":
                publish(channel, payload)
            wait_until(lambda: sub.stats["received"] + sub.stats["dropped"] == 4, what="arrival")
            assert sub.dispatch() == 3
    assert [(m.payload, m.resync) for m in got] == [("a", False), ("b", False), ("", True)]
    on = {"messaging__destination__name": channel}
    assert value(reader, "pulp_pubsub.dropped.messages", **on) == 2
    assert value(reader, "pulp_pubsub.resyncs", **on) == 1
    assert value(reader, CONSUMED, **on) == 3


def test_a_handler_error_is_counted_with_its_type(reader, backend, channel):
    def broken(message: Message) -> None:
        raise ValueError("handler bug")

    with backend.subscriber() as sub:
        sub.subscribe(channel, broken)
        publish(channel, "x")
        assert sub.dispatch(timeout=5) == 1
    on = {"messaging__destination__name": channel}
    assert value(reader, "pulp_pubsub.handler.errors", error__type="ValueError", **on) == 1
    assert value(reader, CONSUMED, **on) == 1


def test_a_failed_publish_is_a_sent_message_with_an_error_type(reader, backend, channel):
    memory.set_server_down(True)
    try:
        with pytest.raises(PubSubError):
            publish(channel, "x")
    finally:
        memory.set_server_down(False)
    failed = {"error__type": "pulp_pubsub.exceptions.ConnectionLost"}
    assert value(reader, SENT, messaging__destination__name=channel, **failed) == 1


def test_a_forced_reconnect_counts_the_reconnect_and_the_resync(reader, backend, channel):
    got: list[Message] = []
    with backend.subscriber() as sub:
        sub.subscribe(channel, got.append)
        before = value(reader, "pulp_pubsub.reconnects", messaging__system="memory")
        break_connection_of(backend, channel)
        dispatch_until(sub, lambda: any(m.resync for m in got))
        assert sub.stats["reconnects"] == 1
    assert value(reader, "pulp_pubsub.reconnects", messaging__system="memory") - before == 1
    lost = {"error__type": "pulp_pubsub.exceptions.ConnectionLost"}
    assert value(reader, "pulp_pubsub.reconnects", **lost) >= 1
    assert value(reader, "pulp_pubsub.resyncs", messaging__destination__name=channel) == 1
    assert value(reader, CONSUMED, messaging__destination__name=channel) == 1


def test_probe_round_trips_and_failures_are_recorded(reader, channel, monkeypatch):
    fast = {"probe_interval": 0.05, "probe_timeout": 0.3, "reconnect_min": 0.01}
    with override_settings(**MEMORY, PUBSUB_OPTIONS=fast):
        with get_backend().subscriber() as sub:
            probes = histogram_count(reader, "pulp_pubsub.probe.duration")
            failures = value(reader, "pulp_pubsub.probe.failures", messaging__system="memory")
            sub.subscribe(channel, lambda m: None)
            wait_until(lambda: sub.probe_rtt is not None, what="a probe round trip")
            assert histogram_count(reader, "pulp_pubsub.probe.duration") > probes
            # A probe that goes nowhere: the server never echoes it back.
            monkeypatch.setattr(memory.MemoryTransport, "probe", lambda self, c, p: None)
            wait_until(lambda: sub.stats["probe_failures"] >= 1, what="a probe failure")
    assert value(reader, "pulp_pubsub.probe.failures", messaging__system="memory") > failures


def test_subscriptions_and_subscribers_are_observed_while_open(reader, backend, channel):
    def connected() -> float:
        return value(reader, "pulp_pubsub.subscribers", pulp_pubsub__connected=True)

    before = connected()
    sub = backend.subscriber()
    sub.subscribe(channel, lambda m: None)
    sub.subscribe(channel, lambda m: None)  # a second callback is not a second subscription
    assert sub.wait_connected(5)
    assert value(reader, "pulp_pubsub.subscriptions", messaging__destination__name=channel) == 1
    assert connected() == before + 1
    sub.close()
    assert value(reader, "pulp_pubsub.subscriptions", messaging__destination__name=channel) == 0
    assert connected() == before


def test_channel_names_stay_out_of_metrics_when_the_setting_says_so(reader, channel):
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}, PUBSUB_METRICS_CHANNEL_ATTRIBUTES=False):
        before = value(reader, SENT, messaging__system="memory")
        with get_backend().subscriber() as sub:
            sub.subscribe(channel, lambda m: None)
            publish(channel, "x")
            assert sub.dispatch(timeout=5) == 1
            seen = [
                attrs
                for name in (SENT, CONSUMED, "pulp_pubsub.subscriptions")
                for attrs, _ in points(reader, name)
            ]
        assert value(reader, SENT, messaging__system="memory") == before + 1
    assert seen
    assert not any(channel in attrs.values() for attrs in seen)


def test_control_traffic_is_not_counted(reader, backend, channel):
    from pulp_pubsub.management.inspect import gather

    with backend.subscriber() as sub:
        sub.subscribe(channel, lambda m: None)
        assert len(gather(backend, timeout=10, expect=1)) == 1
        assert sub.dispatch() == 0
        assert sub.stats["received"] == sub.stats["delivered"] == 0
    assert backend.stats["published"] == 0
    named = [
        attrs.get("messaging.destination.name", "")
        for name in (SENT, CONSUMED, "pulp_pubsub.received.messages")
        for attrs, _ in points(reader, name)
    ]
    assert not any(n.startswith(("pubsub_control", "pubsub_reply_")) for n in named)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "demo.settings", "PUBSUB_BACKEND": "memory"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_an_sdk_installed_after_the_first_event_takes_over():
    result = run_python(
        """
        import django
        django.setup()
        from collections import Counter
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from pulp_pubsub.metrics import count

        stats = Counter()
        count(stats, "published", "memory", "early")  # instruments made on the API's proxy
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        count(stats, "published", "memory", "late")
        [metric] = reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
        print(metric.name, sorted((dict(p.attributes)["messaging.destination.name"], p.value)
                                  for p in metric.data.data_points), stats["published"])
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "messaging.client.sent.messages [('late', 1)] 2"


def test_without_opentelemetry_the_stats_still_count():
    result = run_python(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if the otel extra were not installed
        import django
        django.setup()
        from pulp_pubsub import get_backend, publish
        from pulp_pubsub import metrics

        with get_backend().subscriber() as sub:
            sub.subscribe("plain", lambda m: None)
            publish("plain", "x")
            assert sub.dispatch(timeout=5) == 1
            print(metrics._instruments(), get_backend().stats["published"], sub.stats["delivered"])
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == "None 1 1"


# -- the reconnect log -----------------------------------------------------------------


def outage(backend: Any, sub: Any, channel: str, got: list[Message]) -> None:
    """Break the connection once and wait until the subscriber has come back."""
    resyncs = sum(m.resync for m in got)
    break_connection_of(backend, channel)
    dispatch_until(sub, lambda: sum(m.resync for m in got) > resyncs)


def test_reconnects_log_the_cause_once_and_the_recovery_without_flooding(
    backend, channel, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG, logger="pulp_pubsub.backends.listener")
    got: list[Message] = []

    def records(level: int) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level]

    with backend.subscriber() as sub:
        sub.subscribe(channel, got.append)
        for _ in range(3):
            outage(backend, sub, channel, got)
        [warning] = records(logging.WARNING)
        assert "memory subscriber lost its connection" in warning
        assert "the memory server dropped this connection" in warning  # the cause
        [recovery] = records(logging.INFO)
        assert "reconnected after" in recovery
        # The two outages held back are named by the next warning that is due.
        monkeypatch.setattr(outage_log, "OUTAGE_LOG_INTERVAL", 0.0)
        outage(backend, sub, channel, got)
        assert "2 more outage(s) since the last warning" in records(logging.WARNING)[-1]
        assert len(records(logging.INFO)) == 2
