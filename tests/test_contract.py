"""The delivery contract, written once and run against every backend.

Each test takes the session's ``harness`` (a running server of one backend,
see tests/harness.py) and talks to it through the public API only.
"""

from __future__ import annotations

import os
import threading

import pytest
from django.db import transaction

from pulp_pubsub import Message, publish, publish_soon
from pulp_pubsub.exceptions import InvalidChannel, InvalidPayload

from .util import dispatch_until, senders_of, wait_until

pytestmark = pytest.mark.backend

FAST_FAULTS = {"probe_interval": 0.5, "probe_timeout": 1.0, "reconnect_max": 0.3}


def collect(sub, channel: str) -> list[Message]:
    got: list[Message] = []
    sub.subscribe(channel, got.append)
    return got


def payloads(messages: list[Message]) -> list[str]:
    return [m.payload for m in messages if not m.resync]


def await_comeback(harness, sub, got: list[Message]) -> None:
    """A resync; where the engine replays what was missed (etcd), a replay instead."""
    if harness.replays:
        wait_until(lambda: sub.stats["replays"] >= 1, timeout=30, what="replay")
    else:
        dispatch_until(sub, lambda: any(m.resync for m in got), timeout=30)


def test_a_published_message_reaches_its_subscriber(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.basic")
        publish("contract.basic", "hello")
        dispatch_until(sub, lambda: got)
        assert [(m.channel, m.payload, m.resync) for m in got] == [
            ("contract.basic", "hello", False)
        ]
        assert got[0].received_at > 0


def test_several_subscribers_and_channels(harness):
    with harness.configured() as backend:
        with backend.subscriber() as one, backend.subscriber() as two:
            one_a, one_b = collect(one, "contract.a"), collect(one, "contract.b")
            two_a = collect(two, "contract.a")
            publish("contract.a", "A")
            publish("contract.b", "B")
            dispatch_until(one, lambda: one_a and one_b)
            dispatch_until(two, lambda: two_a)
            assert payloads(one_a) == ["A"]
            assert payloads(one_b) == ["B"]
            assert payloads(two_a) == ["A"]


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "unblock",
        "naïve ☃ 漢字 🚀",
        "quotes ' \" and ; -- DROP TABLE x; \\ backslash",
        "line\nbreaks\r\nand\ttabs",
        "  leading and trailing spaces  ",
    ],
)
def test_payloads_arrive_byte_exact(harness, payload):
    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.exact")
        publish("contract.exact", payload)
        dispatch_until(sub, lambda: got)
        assert got[0].payload.encode("utf-8") == payload.encode("utf-8")


def test_the_largest_payload_arrives_and_one_byte_more_is_refused(harness):
    limit = harness.payload_limit or 7999
    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.limit")
        largest = "é" * ((limit - 1) // 2) + "x" * ((limit - 1) % 2 + 1)
        assert len(largest.encode()) == limit
        publish("contract.limit", largest)
        if harness.payload_limit is not None:
            with pytest.raises(InvalidPayload, match=str(harness.payload_limit)):
                publish("contract.limit", largest + "x")
        publish("contract.limit", "after")
        dispatch_until(sub, lambda: len(got) >= 2)
        assert got[0].payload == largest
        assert got[-1].payload == "after"
        assert [m.payload for m in got] == [largest, "after"]


def test_nul_is_refused_where_the_server_cannot_carry_it(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.nul")
        if harness.allows_nul:
            publish("contract.nul", "a\x00b")
            dispatch_until(sub, lambda: got)
            assert got[0].payload == "a\x00b"
        else:
            with pytest.raises(InvalidPayload, match="NUL"):
                publish("contract.nul", "a\x00b")


@pytest.mark.parametrize("name", ["", "x" * 64, "has space", "semi;colon", "q'uote", "ctl\x01"])
def test_bad_channel_names_are_refused_the_same_way(harness, name):
    with harness.configured() as backend, backend.subscriber() as sub:
        with pytest.raises(InvalidChannel):
            sub.subscribe(name, lambda m: None)
        with pytest.raises(InvalidChannel):
            publish(name, "x")
        assert sub.channels == []


def test_names_are_case_sensitive_and_may_need_quoting(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        upper = collect(sub, "Contract.Mixed-Case_1")
        lower = collect(sub, "contract.mixed-case_1")
        publish("Contract.Mixed-Case_1", "U")
        publish("contract.mixed-case_1", "l")
        dispatch_until(sub, lambda: upper and lower)
        assert payloads(upper) == ["U"]
        assert payloads(lower) == ["l"]


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_publish_in_atomic_is_sent_at_commit_and_dropped_on_rollback(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.tx")
        with pytest.raises(RuntimeError), transaction.atomic(using=harness.db_alias):
            publish("contract.tx", "rolled back")
            raise RuntimeError("abort")
        with transaction.atomic(using=harness.db_alias):
            publish("contract.tx", "committed")
            assert sub.dispatch(timeout=0.2) == 0
        dispatch_until(sub, lambda: got)
        publish("contract.tx", "marker")
        dispatch_until(sub, lambda: "marker" in payloads(got))
        assert payloads(got) == ["committed", "marker"]


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_publishes_at_commit_go_out_in_order_off_the_committing_thread(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.after")
        sent_from = senders_of(backend)
        for n in range(30):
            with transaction.atomic(using=harness.db_alias):
                publish("contract.after", str(n))
        assert backend.flush(timeout=30)
        dispatch_until(sub, lambda: len(payloads(got)) >= 30)
        assert payloads(got) == [str(n) for n in range(30)]
        if backend.defers_natively or not backend.after_commit_thread:
            assert not sent_from  # the server (NOTIFY) or the committing thread sent them
        else:
            assert sent_from and threading.get_ident() not in sent_from
            assert backend.stats["published"] >= 30


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_publish_soon_leaves_off_the_callers_thread_in_order_and_reports(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.soon")
        sent_from = senders_of(backend)
        outcomes: list[object] = []
        for n in range(10):
            publish_soon("contract.soon", str(n), report=outcomes.append)
        with pytest.raises(RuntimeError), transaction.atomic(using=harness.db_alias):
            publish_soon("contract.soon", "rolled back", report=outcomes.append)
            raise RuntimeError("abort")
        with transaction.atomic(using=harness.db_alias):
            publish_soon("contract.soon", "10", report=outcomes.append)
        # Not ordered with publish(), which may overtake what is still queued: flush first.
        assert backend.flush(timeout=30)
        publish("contract.soon", "11")
        dispatch_until(sub, lambda: len(payloads(got)) >= 12)
        assert payloads(got) == [str(n) for n in range(12)]
        assert outcomes == [None] * 11
        if backend.after_commit_thread:
            assert sent_from and threading.get_ident() not in sent_from


def test_publish_soon_refuses_bad_input_at_once_and_sends_nothing(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.soon-bad")
        with pytest.raises(InvalidChannel):
            publish_soon("bad channel!", "x")
        with pytest.raises(InvalidPayload):
            publish_soon("contract.soon-bad", "\ud800")  # not encodable as UTF-8
        publish("contract.soon-bad", "marker")
        dispatch_until(sub, lambda: got)
        assert backend.flush(timeout=30)
        assert payloads(got) == ["marker"]


def test_an_outside_client_reaches_subscribers(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "pulp_worker_wakeup")
        harness.publish_external(backend.wire_name("pulp_worker_wakeup"), "unblock")
        dispatch_until(sub, lambda: got)
        assert payloads(got) == ["unblock"]


def test_a_failing_handler_does_not_stop_delivery(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        calls: list[str] = []

        def broken(message: Message) -> None:
            calls.append("broken")
            raise ValueError("boom")

        sub.subscribe("contract.err", broken)
        good = collect(sub, "contract.err")
        publish("contract.err", "1")
        publish("contract.err", "2")
        dispatch_until(sub, lambda: len(good) >= 2)
        assert payloads(good) == ["1", "2"]
        assert sub.stats["handler_errors"] == 2


def test_an_owner_waiting_on_fileno_reads_the_connection_in_its_own_thread(harness):
    """One wake-up per message: the owner's dispatch() reads; the listener thread sleeps."""
    with harness.configured() as backend, backend.subscriber() as sub:
        got: list[tuple[str, threading.Thread]] = []
        sub.subscribe(
            "contract.owner", lambda m: got.append((m.payload, threading.current_thread()))
        )
        sub.fileno()
        publish("contract.owner", "1")
        dispatch_until(sub, lambda: got)
        assert got == [("1", threading.current_thread())]
        assert sub.stats["owner_reads"] >= 1
        assert sub.stats["received"] == 1


def test_a_busy_owners_subscriber_reconnects_when_its_connection_closes(harness):
    """The owner reads, but never dispatches now: a closed socket still wakes the listener."""
    if harness.name in ("memory", "nats", "natsjs", "zookeeper", "zookeeper_auth"):
        # Their connection reaches the subscriber through a pipe, which no closing socket
        # hangs up: the owner's next read, or the listener's next timer turn, finds it.
        return
    with harness.configured() as backend, backend.subscriber() as sub:
        sub.subscribe("contract.busy", lambda m: None)
        sub.fileno()
        harness.kill_subscriber_connections()
        wait_until(lambda: sub.stats["reconnects"] >= 1, timeout=15, what="a reconnect")
        assert sub.stats["owner_reads"] == 0


def test_start_delivers_on_a_background_thread(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        arrived = threading.Event()
        sub.subscribe("contract.bg", lambda m: arrived.set())
        sub.start()
        publish("contract.bg", "x")
        assert arrived.wait(15)


def test_close_releases_threads_and_stops_delivery(harness):
    with harness.configured() as backend:
        before = threading.active_count()
        sub = backend.subscriber()
        got = collect(sub, "contract.close")
        sub.start()
        sub.close()
        assert threading.active_count() == before
        publish("contract.close", "after close")
        assert got == []


@pytest.mark.parametrize("fault", ["kill_subscriber_connections", "restart"])
def test_a_broken_connection_comes_back_with_a_resync(harness, fault):
    with harness.configured(**FAST_FAULTS) as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.fault")
        publish("contract.fault", "before")
        dispatch_until(sub, lambda: got)
        getattr(harness, fault)()
        await_comeback(harness, sub, got)
        wait_until(lambda: sub.connected, timeout=30, what="reconnect")
        publish("contract.fault", "after")
        dispatch_until(sub, lambda: "after" in payloads(got), timeout=30)
        assert sub.stats["reconnects"] >= 1
        if harness.replays:
            assert not any(m.resync for m in got)


def test_a_frozen_server_is_noticed_by_the_probe(harness):
    with harness.configured(**FAST_FAULTS) as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.frozen")
        harness.freeze()
        try:
            wait_until(lambda: not sub.connected, timeout=30, what="probe failure")
        finally:
            harness.thaw()
        await_comeback(harness, sub, got)
        publish("contract.frozen", "after thaw")
        dispatch_until(sub, lambda: "after thaw" in payloads(got), timeout=30)


def test_a_forked_child_subscribes_with_connections_of_its_own(harness):
    """The child builds its own backend; the parent's subscriber keeps working.

    On a cross-process backend the parent's publish reaches the child and the
    child's reaches the parent; the memory backend's "server" is per process,
    so there the child talks to itself.
    """
    from django.db import connections

    with harness.configured() as backend, backend.subscriber() as sub:
        got = collect(sub, "contract.fork")
        ready_r, ready_w = os.pipe()
        done_r, done_w = os.pipe()
        connections.close_all()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                from pulp_pubsub import get_backend

                assert get_backend() is not backend
                child_got: list[Message] = []
                with get_backend().subscriber() as child:
                    child.subscribe("contract.fork", child_got.append)
                    os.write(ready_w, b"r")
                    if not harness.cross_process:
                        publish("contract.fork", "from parent")
                    dispatch_until(child, lambda: child_got)
                    os.write(done_w, child_got[0].payload.encode())
                    publish("contract.fork", "from child")
                status = 0
            finally:
                os._exit(status)
        assert os.read(ready_r, 1) == b"r"
        if harness.cross_process:
            publish("contract.fork", "from parent")
        assert os.read(done_r, 100) == b"from parent"
        _, status = os.waitpid(pid, 0)
        assert status == 0
        if harness.cross_process:
            dispatch_until(sub, lambda: "from child" in payloads(got))
        publish("contract.fork", "parent still listens")
        dispatch_until(sub, lambda: "parent still listens" in payloads(got))
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
