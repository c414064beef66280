"""The management commands, driven through call_command with captured output."""

from __future__ import annotations

import io
import json
import threading
from unittest.mock import patch

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from pulp_pubsub import CANCEL, WAKEUP, get_backend, publish
from pulp_pubsub.backends.memory import MemoryBackend

from .test_subscriber import MEMORY


def run(*args, **kwargs) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO(), **kwargs)
    return out.getvalue()


@pytest.fixture(autouse=True)
def memory_backend():
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}):
        yield


def test_publish_reaches_a_subscriber():
    with get_backend().subscriber() as sub:
        got: list[str] = []
        sub.subscribe(WAKEUP, lambda m: got.append(m.payload))
        assert "Published to pulp_worker_wakeup" in run("pubsub_publish", WAKEUP, "handle")
        sub.dispatch(timeout=5)
    assert got == ["handle"]


@pytest.mark.parametrize(
    "args, cause",
    [
        (["bad name", "x"], "whitespace"),
        ([CANCEL, "nonsense"], "expects a task UUID"),
        (["demo_events", "x" * 8000], "limit is 7999 bytes"),
    ],
)
def test_publish_fails_with_the_cause(args, cause):
    with pytest.raises(CommandError, match=cause):
        run("pubsub_publish", *args)


def test_listen_prints_messages_until_count():
    out = io.StringIO()
    subscribed = threading.Event()
    backend = get_backend()
    original = backend.subscriber

    def spying_subscriber():
        sub = original()
        real = sub.wait_connected

        def wait_connected(timeout=None):
            result = real(timeout)
            subscribed.set()
            return result

        sub.wait_connected = wait_connected
        return sub

    backend.subscriber = spying_subscriber
    listener = threading.Thread(
        target=call_command,
        args=("pubsub_listen", "demo_events"),
        kwargs={"count": 2, "json": True, "timeout": 30, "stdout": out},
    )
    listener.start()
    assert subscribed.wait(10)
    publish("demo_events", "first")
    publish("demo_events", "second ☃")
    listener.join(30)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(line["channel"], line["payload"], line["resync"]) for line in lines] == [
        ("demo_events", "first", False),
        ("demo_events", "second ☃", False),
    ]


def test_listen_stops_at_the_timeout_with_nothing_printed():
    assert run("pubsub_listen", "demo_events", timeout=0.2) == ""


def test_listen_rejects_bad_arguments():
    with pytest.raises(CommandError, match="--count"):
        run("pubsub_listen", count=0)
    with pytest.raises(CommandError, match="whitespace"):
        run("pubsub_listen", "bad name", timeout=1)


def test_channels_lists_declared_channels_and_handlers():
    text = run("pubsub_channels")
    assert "backend: memory" in text
    for channel in ["pulp_worker_wakeup", "pulp_worker_cancel", "demo_events"]:
        assert channel in text
    data = json.loads(run("pubsub_channels", json=True))
    assert data["backend"] == "memory"
    rows = {row["channel"]: row for row in data["channels"]}
    assert rows["pulp_worker_cancel"]["payload"] == "a task UUID"


def test_channels_says_which_delivery_each_channel_gets_on_the_backend():
    rows = {
        row["channel"]: row for row in json.loads(run("pubsub_channels", json=True))["channels"]
    }
    assert rows["pulp_worker_wakeup"]["groups"] == ["unblock", "handle"]
    assert rows["pulp_worker_wakeup"]["delivery"].startswith("targeted (groups: unblock, handle)")
    assert rows["pulp_worker_cancel"]["delivery"] == "broadcast"
    # A backend that cannot target says so.
    with patch.object(MemoryBackend, "targets", False):
        text = run("pubsub_channels")
    assert "broadcast (the memory backend cannot target" in text


def test_channels_counts_live_subscribers():
    with get_backend().subscriber() as sub:
        sub.subscribe("demo_events", lambda m: None)
        data = json.loads(run("pubsub_channels", json=True))
    rows = {row["channel"]: row for row in data["channels"]}
    assert rows["demo_events"]["subscribers"] == 1
    assert rows["pulp_worker_wakeup"]["subscribers"] == 0


def test_channels_never_prints_the_password():
    with override_settings(PUBSUB_URL="memory://user:hunter2@localhost"):
        text = run("pubsub_channels") + run("pubsub_channels", json=True)
    assert "hunter2" not in text
    assert "user:***@localhost" in text


def test_ping_reports_a_round_trip():
    assert "memory: 3 round trip(s), min" in run("pubsub_ping", count=3)


def test_ping_fails_when_the_server_is_down():
    from pulp_pubsub.backends import memory

    memory.set_server_down(True)
    try:
        with pytest.raises(CommandError, match="Cannot reach the memory server"):
            run("pubsub_ping", timeout=0.5)
    finally:
        memory.set_server_down(False)


def test_unknown_backend_is_a_command_error():
    with override_settings(PUBSUB_BACKEND="nosuch"):
        with pytest.raises(CommandError, match="neither a known alias"):
            run("pubsub_publish", WAKEUP, "handle")
