"""Live subscriber introspection (``pubsub_channels --live``) and ``pubsub_ping``.

The unit tests run on the memory backend. The fleet tests run on every
backend: on a server, 20 forked subscriber processes; on the memory backend,
whose "server" lives in one process, 20 subscribers of this process.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from pulp_pubsub import get_backend, publish
from pulp_pubsub.backends import memory
from pulp_pubsub.backends.listener.responder import (
    CONTROL_CHANNEL,
    describe_subscriber,
    parse_query,
    process_name,
)
from pulp_pubsub.control_auth import OVERHEAD, control_key, query_body, sign
from pulp_pubsub.management.inspect import ControlClient, gather
from pulp_pubsub_tools.testing import free_port

from .test_subscriber import MEMORY
from .util import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLEET = 20
KILLED = 5


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.fixture
def backend() -> Iterator[Any]:
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}):
        yield get_backend()


# -- answers -------------------------------------------------------------------------


def test_an_answer_describes_the_subscriber_and_its_state(backend):
    with backend.subscriber() as sub:
        sub.subscribe("intro.b", lambda m: None)
        sub.subscribe("intro.a", lambda m: None)
        publish("intro.a", "x")
        wait_until(lambda: sub.stats["received"] == 1, what="arrival")
        [answer] = gather(backend, timeout=10, expect=1)
    assert answer.pid == os.getpid()
    assert answer.host and answer.process
    assert answer.backend == "memory"
    assert answer.channels == ("intro.a", "intro.b")
    assert answer.channels_total == 2
    assert answer.connected_since == sub.connected_since
    assert (answer.received, answer.resyncs, answer.last_resync_at) == (1, 0, None)
    assert 0 < answer.latency < 10


def test_an_answer_reports_resyncs_after_a_reconnect(backend):
    with backend.subscriber() as sub:
        sub.subscribe("intro.r", lambda m: None)
        memory.drop_connections()
        wait_until(lambda: sub.stats["resyncs"] == 1 and sub.connected, what="reconnect")
        [answer] = gather(backend, timeout=10, expect=1)
    assert (answer.resyncs, answer.reconnects) == (1, 1)
    assert answer.last_resync_at == sub.last_resync_at


def test_an_answer_fits_postgres_payload_limit_and_counts_what_it_left_out(backend):
    channels = [f"intro.{i:03d}.{'x' * 50}" for i in range(300)]
    with backend.subscriber() as sub:
        for channel in channels:
            sub.subscribe(channel, lambda m: None)
        text = describe_subscriber(sub, "0123456789abcdef", 7999 - OVERHEAD)
        [answer] = gather(backend, timeout=10, expect=1)
    # Signed, as it goes on the wire.
    assert len(sign(b"k" * 32, "answer", "pubsub_reply_0123456789abcdef", text).encode()) <= 7999
    data = json.loads(text)
    assert data["channels_total"] == 300
    assert 0 < len(data["channels"]) < 300
    assert data["channels"] == sorted(channels)[: len(data["channels"])]
    assert answer.channels_total == 300 and len(answer.channels) == len(data["channels"])


def test_answers_hold_no_settings_or_secrets(backend):
    with override_settings(PUBSUB_URL="memory://admin:hunter2@example.com"):
        backend = get_backend()
        with backend.subscriber() as sub:
            sub.subscribe("intro.s", lambda m: None)
            text = describe_subscriber(sub, "0123456789abcdef")
    assert "hunter2" not in text and "example.com" not in text and "admin" not in text
    assert set(json.loads(text)) == {
        "query", "id", "host", "pid", "process", "backend", "channels", "channels_total",
        "connected_since", "received", "resyncs", "last_resync_at", "reconnects", "probe_rtt",
        "degraded_since",
    }  # fmt: skip


@pytest.mark.parametrize(
    "argv, name",
    [
        (["/usr/bin/pulpcore-worker"], "pulpcore-worker"),
        (["/srv/manage.py", "rqworker", "--password=hunter2"], "manage.py rqworker"),
        (["/srv/manage.py", "hunter2 secret"], "manage.py"),
        (["/usr/local/bin/tool", "hunter2"], "tool"),
        (["/usr/lib/python3/site-packages/pytest/__main__.py", "-k", "x"], "pytest"),
    ],
)
def test_the_process_name_never_includes_arguments(monkeypatch, argv, name):
    monkeypatch.setattr(sys, "argv", argv)
    assert process_name() == name


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "[]",
        '{"query": "0123456789abcdef"}',
        '{"query": "0123456789abcdef", "reply": "pulp_worker_wakeup"}',
        '{"query": "not hex!", "reply": "pubsub_reply_0123456789abcdef", "ts": 1}',
        '{"query": "0123456789abcdef", "reply": "pubsub_reply_0123456789abcdef"}',
        '{"query": "0123456789abcdef", "reply": "pubsub_reply_0123456789abcdef", "ts": "1"}',
        '{"query": "0123456789abcdef", "reply": "pubsub_reply_0123456789abcdef", "ts": true}',
    ],
)
def test_malformed_queries_and_replies_to_user_channels_are_refused(payload):
    assert parse_query(payload) is None


def test_a_well_formed_query_parses():
    body = '{"query": "0123456789abcdef", "reply": "pubsub_reply_0123456789abcdef", "ts": 5}'
    assert parse_query(body) == ("0123456789abcdef", "pubsub_reply_0123456789abcdef", 5.0)


def test_control_messages_never_reach_callbacks_or_break_the_listener(backend):
    got: list[Any] = []
    with backend.subscriber() as sub:
        sub.subscribe("pulp_worker_wakeup", got.append)
        control = backend.wire_name(CONTROL_CHANNEL)
        backend.send(control, "garbage")
        # A query may not make the fleet publish on a channel with handlers.
        body = query_body("0123456789abcdef", "pulp_worker_wakeup")
        backend.send(control, sign(control_key(), "query", control, body))
        assert len(gather(backend, timeout=10, expect=1)) == 1
        assert sub.connected and sub.stats["reconnects"] == 0
        assert sub.dispatch(timeout=0.2) == 0
    assert got == []
    assert sub.stats["received"] == 0


def test_the_querier_is_not_a_subscriber_and_does_not_answer_itself(backend):
    assert gather(backend, timeout=0.2) == []


def test_a_subscriber_of_another_install_prefix_does_not_answer(backend):
    other = memory.MemoryBackend(channel_prefix="other.")
    try:
        with other.subscriber() as sub:
            sub.subscribe("intro.p", lambda m: None)
            assert len(gather(other, timeout=10, expect=1)) == 1
            assert gather(backend, timeout=0.2) == []
    finally:
        other.close()


# -- the fleet, on every backend ------------------------------------------------------


class Fleet:
    """``FLEET`` subscribers, each on ``demo_events`` and a channel of its own."""

    def __init__(self, harness: Any) -> None:
        self.harness = harness
        self.members: dict[str, Any] = {}  # own channel -> pid, or the in-process subscriber
        self._stop_w: int | None = None

    @staticmethod
    def channels(i: int) -> list[str]:
        return ["demo_events", f"fleet.{i:02d}"]

    def start(self) -> None:
        if not self.harness.cross_process:
            for i in range(FLEET):
                sub = get_backend().subscriber()
                for channel in self.channels(i):
                    sub.subscribe(channel, lambda m: None)
                assert sub.wait_connected(10)
                self.members[self.channels(i)[1]] = sub
            return
        stop_r, self._stop_w = os.pipe()
        ready_r, ready_w = os.pipe()
        connections.close_all()  # no child may share the parent's database socket
        for i in range(FLEET):
            pid = os.fork()
            if pid == 0:
                self._child(i, stop_r, ready_w)
            self.members[self.channels(i)[1]] = pid
        os.close(stop_r)
        os.close(ready_w)
        ready = b""
        while len(ready) < FLEET:
            chunk = os.read(ready_r, FLEET)
            assert chunk, f"only {len(ready)} subscriber processes started"
            ready += chunk
        os.close(ready_r)
        assert ready == b"1" * FLEET, "a subscriber process could not connect"

    def _child(self, i: int, stop_r: int, ready_w: int) -> None:
        status = 1
        try:
            with get_backend().subscriber() as sub:
                for channel in self.channels(i):
                    sub.subscribe(channel, lambda m: None)
                os.write(ready_w, b"1" if sub.wait_connected(30) else b"0")
                # Live until the parent says so, or dies (end of file).
                select.select([stop_r], [], [])
            status = 0
        finally:
            os._exit(status)

    def kill(self, count: int) -> list[str]:
        victims = sorted(self.members)[:count]
        for name in victims:
            member = self.members.pop(name)
            if isinstance(member, int):
                os.kill(member, signal.SIGKILL)
                os.waitpid(member, 0)
            else:
                member.close()
        return victims

    def stop(self) -> None:
        if self._stop_w is not None:
            os.close(self._stop_w)
        for member in self.members.values():
            if isinstance(member, int):
                os.waitpid(member, 0)
            else:
                member.close()
        self.members.clear()


@contextmanager
def fleet_of(harness: Any) -> Iterator[Fleet]:
    fleet = Fleet(harness)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.kill(len(fleet.members))
        fleet.stop()


def live(timeout: float) -> dict[str, Any]:
    return json.loads(run("pubsub_channels", "--live", "--json", "--timeout", str(timeout)))


def check_listing(fleet: Fleet, listing: dict[str, Any]) -> None:
    found = {}
    for answer in listing["live"]["subscribers"]:
        own = [c for c in answer["channels"] if c.startswith("fleet.")]
        assert len(own) == 1, answer
        assert own[0] not in found, f"two answers for {own[0]}"
        found[own[0]] = answer
    assert sorted(found) == sorted(fleet.members)
    for name, answer in found.items():
        assert answer["channels"] == sorted(["demo_events", name])
        member = fleet.members[name]
        assert answer["pid"] == (member if isinstance(member, int) else os.getpid())
        assert answer["connected_since"] and answer["host"]
    rows = {row["channel"]: row for row in listing["channels"]}
    assert rows["demo_events"]["live_subscribers"] == len(fleet.members)


@pytest.mark.backend
def test_live_listing_shows_every_subscriber_process_and_drops_killed_ones(harness):
    with harness.configured(), fleet_of(harness) as fleet:
        # Every member answers: wait for all of them (returns as soon as they have)...
        assert len(gather(get_backend(), timeout=30, expect=FLEET)) == FLEET
        # ...then the command, which waits its whole timeout (its default, 2 s), lists exactly
        # them.
        check_listing(fleet, live(timeout=2))
        text = run("pubsub_channels", "--live", "--timeout", "2")
        assert f"Live subscribers: {FLEET} answered" in text
        killed = fleet.kill(KILLED)
        listing = live(timeout=2)
        check_listing(fleet, listing)
        assert len(listing["live"]["subscribers"]) == FLEET - KILLED
        assert not any(
            name in answer["channels"]
            for answer in listing["live"]["subscribers"]
            for name in killed
        )


# -- pubsub_ping, the health probe ------------------------------------------------------


def ping_process(harness: Any, *args: str, url: str | None = None) -> subprocess.CompletedProcess:
    """``manage.py pubsub_ping`` as a health check runs it: exit status and output."""
    settings = harness.settings(connect_timeout=2)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "demo.settings",
        "PUBSUB_BACKEND": settings["PUBSUB_BACKEND"],
        "PUBSUB_URL": url or settings["PUBSUB_URL"],
        "PUBSUB_OPTIONS": json.dumps(settings["PUBSUB_OPTIONS"]),
    }
    return subprocess.run(
        [sys.executable, "manage.py", "pubsub_ping", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def unreachable(url: str) -> str:
    """``url`` with its port changed to one that nothing listens on (each, in a list)."""
    if "," in url:
        return ",".join(unreachable(part) for part in url.split(","))
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{free_port()}"
    return parts._replace(netloc=netloc).geturl()


@pytest.mark.backend
def test_ping_exit_status_says_healthy_too_few_or_unreachable(harness):
    with harness.configured(), get_backend().subscriber() as one, get_backend().subscriber() as two:
        for sub in (one, two):
            sub.subscribe("demo_events", lambda m: None)
            assert sub.wait_connected(10)
        if harness.cross_process:
            ok = ping_process(harness, "--count", "3", "--expect-subscribers", "2")
            assert ok.returncode == 0, ok.stderr
            assert f"{harness.name}: 2 live subscriber(s) answered; 6 round trip(s)" in ok.stdout
            few = ping_process(harness, "--expect-subscribers", "3", "--timeout", "1")
            assert few.returncode != 0
            assert f"Only 2 live {harness.name} subscriber(s) answered" in few.stderr
            down = ping_process(harness, url=unreachable(harness.url))
            assert down.returncode != 0
            assert f"Cannot reach the {harness.name} server" in down.stderr
        else:
            assert "2 live subscriber(s) answered" in run(
                "pubsub_ping", "--count", "3", "--expect-subscribers", "2"
            )
            with pytest.raises(CommandError, match="Only 2 live memory subscriber"):
                run("pubsub_ping", "--expect-subscribers", "3", "--timeout", "1")
            harness.freeze()
            try:
                with pytest.raises(CommandError, match="Cannot reach the memory server"):
                    run("pubsub_ping")
            finally:
                harness.thaw()


def test_ping_round_trips_go_through_a_bare_connection(backend):
    with ControlClient(backend) as client:
        rtt = client.round_trip(timeout=10)
    assert rtt is not None and rtt >= 0
    assert backend.stats["published"] == 0
