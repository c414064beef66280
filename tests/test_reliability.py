"""Publisher faults, resource hygiene and handler faults, on every backend.

Each test runs against the session's server of each backend (the ``harness`` fixture); faults
that would disturb other tests (a frozen server) are undone in ``finally``.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid

import pytest
from django.db import transaction
from django.test import override_settings

from demo.models import Event
from pulp_pubsub import get_backend, publish
from pulp_pubsub.exceptions import PublishError

from .reliability_util import (
    FAST,
    PATIENCE,
    Inbox,
    collected_fds,
    dead_url,
    fd_targets,
    open_fds,
    server_connections,
)
from .util import wait_until

#: publish_timeout is 1 s in FAST; a publish may overrun it by scheduling noise, not by a
#: second timeout of its own (a connect, a handshake) on top.
PUBLISH_BOUND = FAST["publish_timeout"] + 0.5

MODES = ["dispatch", "thread"]


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


def down_settings(harness) -> dict:
    """Settings pointing at a server that is down (nothing listens on its port)."""
    if hasattr(harness, "down_settings"):
        return harness.down_settings(**FAST)
    settings = harness.settings(**FAST)
    if harness.name == "memory":
        return settings
    return {**settings, "PUBSUB_URL": dead_url(settings["PUBSUB_URL"])}


class server_down:
    """The memory hub goes down for the block; a real backend's URL already points nowhere."""

    def __init__(self, harness) -> None:
        self.harness = harness

    def __enter__(self) -> None:
        if self.harness.name == "memory":
            self.harness.freeze()

    def __exit__(self, *exc: object) -> None:
        if self.harness.name == "memory":
            self.harness.thaw()


def timed_publish(backend, channel: str, payload: str = "x") -> tuple[BaseException | None, float]:
    """Publish on a thread, so that a hang fails the test instead of hanging it."""
    outcome: dict[str, BaseException] = {}

    def attempt() -> None:
        try:
            backend.publish(channel, payload)
        except BaseException as exc:
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(PATIENCE)
    assert not thread.is_alive(), "publish() hung"
    return outcome.get("error"), time.monotonic() - started


# -- publisher faults ----------------------------------------------------------------------


def test_publish_to_a_down_server_fails_with_publish_error_within_its_timeout(harness):
    with override_settings(**down_settings(harness)), server_down(harness):
        backend = get_backend()
        error, elapsed = timed_publish(backend, unique("down"))
        backend.close()
    assert isinstance(error, PublishError), repr(error)
    assert harness.name in str(error)
    assert elapsed < PUBLISH_BOUND, f"publish took {elapsed:.2f} s"


@pytest.mark.parametrize("connection", ["warm", "cold"])
def test_publish_to_a_frozen_server_fails_with_publish_error_within_its_timeout(
    harness, connection
):
    channel = unique("frozen")
    with harness.configured(**FAST) as backend:
        if connection == "warm":
            backend.publish(channel, "before")  # the publisher's connection is open
        harness.freeze()
        try:
            error, elapsed = timed_publish(backend, channel)
        finally:
            harness.thaw()
        assert isinstance(error, PublishError), repr(error)
        assert elapsed < PUBLISH_BOUND, f"publish took {elapsed:.2f} s"
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe(channel, inbox)
            # Thawed: the same backend publishes again (a timed-out connection was dropped).
            wait_until(lambda: _published(backend, channel, "after"), PATIENCE, "a publish")
            inbox.wait_payload("after")


def _published(backend, channel: str, payload: str) -> bool:
    try:
        backend.publish(channel, payload)
    except PublishError:
        return False
    return True


@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_a_failed_publish_at_commit_is_logged_and_counted_and_the_data_is_kept(harness, caplog):
    note = unique("kept")
    with override_settings(**down_settings(harness)), server_down(harness):
        backend = get_backend()
        alias = backend.database_alias  # the database whose commits publish() follows
        assert not backend.defers_natively
        with (
            caplog.at_level(logging.ERROR, logger="pulp_pubsub"),
            transaction.atomic(using=alias),
        ):
            Event.objects.using(alias).create(note=note)
            publish("demo_events", "lost at commit")
        # Redis sends publishes deferred to commit from a thread of its own.
        assert backend.flush(timeout=30)
        assert backend.stats["deferred_failures"] == 1
        backend.close()
    assert Event.objects.using(alias).filter(note=note).count() == 1
    failures = [r for r in caplog.records if "after commit failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR


# -- resource hygiene ------------------------------------------------------------------------


#: A hundred in the default tier; the thousand-cycle soak is in the long tier.
@pytest.mark.parametrize("cycles", [100, pytest.param(1000, marks=pytest.mark.long)])
def test_subscriber_lifecycles_leave_no_threads_fds_or_connections(harness, cycles):
    with harness.configured(**FAST) as backend:
        channel = unique("cycle")
        backend.publish(channel, "warm")  # the publisher's connection is part of the baseline
        # So is what a process's first subscriber starts once for all (NATS's loop thread:
        # core NATS publishes no longer start it).
        with backend.subscriber() as first:
            first.subscribe(channel, lambda message: None)
            assert first.wait_connected(PATIENCE)
        gc.collect()  # what earlier tests left for the collector is not this test's to count
        threads, fds, targets = threading.active_count(), open_fds(), fd_targets()
        connections = server_connections(harness)
        for i in range(cycles):
            sub = backend.subscriber()
            sub.subscribe(channel, lambda message: None)
            if i % (cycles // 10) == 0:  # now and then, prove the subscription is real
                inbox = Inbox(sub)
                sub.subscribe(channel, inbox)
                backend.publish(channel, f"cycle {i}")
                inbox.wait_payload(f"cycle {i}")
            sub.unsubscribe(channel)
            sub.close()
        # At most the baseline: an earlier test's leftovers may still close meanwhile.
        wait_until(lambda: threading.active_count() <= threads, PATIENCE, "threads to end")
        try:
            wait_until(lambda: collected_fds() <= fds, PATIENCE, "descriptors to close")
        except AssertionError as exc:
            opened = set(fd_targets().items()) - set(targets.items())
            raise AssertionError(f"{exc}; opened since the baseline: {sorted(opened)}") from None
        wait_until(
            lambda: server_connections(harness) == connections, PATIENCE, "server connections"
        )


#: Ten in the default tier; a hundred in the long tier.
@pytest.mark.parametrize("forks", [10, pytest.param(100, marks=pytest.mark.long)])
def test_forks_leave_the_parent_as_it_was(harness, forks):
    channel, child_channel = unique("parent"), unique("child")
    with harness.configured(**FAST) as backend, backend.subscriber() as sub:
        inbox = Inbox(sub)
        sub.subscribe(channel, inbox)
        backend.publish(channel, "before")
        inbox.wait_payload("before")
        threads, fds = threading.active_count(), open_fds()
        connections = server_connections(harness)
        for i in range(forks):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: its own backend, its own round trip, then os._exit
                code = 1
                try:
                    os.close(read_end)
                    _child_round_trip(child_channel, i)
                    if harness.cross_process:
                        publish(channel, f"from child {i}")
                    get_backend().close()
                    sub.close()  # the inherited copy: must leave the parent's alone
                    code = 0
                except BaseException as exc:
                    os.write(write_end, f"{type(exc).__name__}: {exc}".encode()[:2000])
                finally:
                    os._exit(code)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as pipe:
                complaint = pipe.read().decode(errors="replace")
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, f"child {i}: {complaint}"
        if harness.cross_process:
            inbox.wait(lambda messages: len(messages) == forks + 1)
            assert inbox.payloads()[1:] == [f"from child {i}" for i in range(forks)]
        backend.publish(channel, "after")
        inbox.wait_payload("after")
        assert sub.connected and sub.stats["reconnects"] == 0
        # kazoo leaves a closed connection's epoll object to the collector, and its
        # connection thread opens and closes descriptors on its own clock: counted after a
        # collection, and waited for, as the lifecycle test does.
        wait_until(
            lambda: threading.active_count() == threads and collected_fds() == fds,
            PATIENCE,
            "the parent's threads and descriptors as before the forks",
        )
        wait_until(
            lambda: server_connections(harness) == connections, PATIENCE, "server connections"
        )


def _child_round_trip(channel: str, i: int) -> None:
    backend = get_backend()
    with backend.subscriber() as sub:
        inbox = Inbox(sub)
        sub.subscribe(channel, inbox)
        backend.publish(channel, f"child {i}")
        inbox.wait_payload(f"child {i}")


# -- handler faults --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_raising_handler_is_logged_and_counted_and_the_listener_goes_on(harness, caplog, mode):
    channel = unique("raise")

    def broken(message):
        raise RuntimeError(f"handler broke on {message.payload}")

    with harness.configured(**FAST) as backend, backend.subscriber() as sub:
        inbox = Inbox(sub, started=mode == "thread")
        sub.subscribe(channel, broken)
        sub.subscribe(channel, inbox)
        if mode == "thread":
            sub.start()
        with caplog.at_level(logging.ERROR, logger="pulp_pubsub"):
            for n in range(3):
                backend.publish(channel, str(n))
            inbox.wait(lambda messages: len(messages) == 3)
        assert inbox.payloads() == ["0", "1", "2"]
        assert sub.stats["handler_errors"] == 3
        assert caplog.text.count("RuntimeError: handler broke on") == 3
        assert sub.connected and sub.stats["reconnects"] == 0


def test_a_blocked_handler_overflows_its_own_channel_while_others_keep_flowing(harness, caplog):
    hog, calm = unique("hog"), unique("calm")
    entered, release = threading.Event(), threading.Event()

    def stuck(message):
        if message.payload == "first":
            entered.set()
            release.wait(PATIENCE)

    with harness.configured(**FAST, max_pending=10) as backend, backend.subscriber() as sub:
        inbox = Inbox(sub, started=True)
        sub.subscribe(hog, stuck)
        sub.subscribe(hog, inbox)
        sub.subscribe(calm, inbox)
        sub.start()
        try:
            backend.publish(hog, "first")
            assert entered.wait(PATIENCE), "the handler never ran"
            with caplog.at_level(logging.WARNING, logger="pulp_pubsub"):
                for _ in range(3):
                    backend.publish(hog, "same")  # identical wake-ups, folded into one
                for n in range(30):
                    backend.publish(hog, f"hog {n}")
                for n in range(5):
                    backend.publish(calm, f"calm {n}")
                wait_until(
                    lambda: sum(sub.stats[k] for k in ("received", "folded", "dropped")) >= 39,
                    PATIENCE,
                    "the listener to take in every message",
                )
        finally:
            release.set()
        inbox.wait(lambda ms: any(m.resync and m.channel == hog for m in ms))
        inbox.wait(lambda ms: len([m for m in ms if m.channel == calm]) >= 5)
        assert inbox.payloads(calm) == [f"calm {n}" for n in range(5)]
        assert not any(m.resync for m in inbox.messages if m.channel == calm)
        assert sub.stats["folded"] == 2
        assert sub.stats["dropped"] >= 30 + 3 - 2 - 10
        assert any("queue full" in r.getMessage() for r in caplog.records)
        assert sub.connected and sub.stats["reconnects"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_handler_may_publish_from_inside_itself(harness, mode):
    ping, pong = unique("ping"), unique("pong")
    with harness.configured(**FAST) as backend, backend.subscriber() as sub:
        inbox = Inbox(sub, started=mode == "thread")

        def relay(message):
            n = int(message.payload)
            if n < 20:
                publish(ping, str(n + 1))
                backend.publish(pong, str(n))

        sub.subscribe(ping, relay)
        sub.subscribe(ping, inbox)
        sub.subscribe(pong, inbox)
        if mode == "thread":
            sub.start()
        backend.publish(ping, "0")
        inbox.wait(lambda ms: len(ms) == 41)
        assert inbox.payloads(ping) == [str(n) for n in range(21)]
        assert inbox.payloads(pong) == [str(n) for n in range(20)]
        assert sub.stats["handler_errors"] == 0
