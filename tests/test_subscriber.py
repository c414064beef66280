"""The shared subscriber machinery, exercised on the memory backend (no server)."""

from __future__ import annotations

import gc
import os
import select
import threading
import time

import pytest
from django.test import override_settings

from pulp_pubsub import Message, get_backend, publish
from pulp_pubsub.backends import memory
from pulp_pubsub.exceptions import InvalidChannel, SubscriberClosed

from .util import wait_until

MEMORY = {"PUBSUB_BACKEND": "memory", "PUBSUB_URL": None, "PUBSUB_CHANNEL_PREFIX": ""}


def readable(fd: int, timeout: float = 0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


@pytest.fixture
def backend():
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}):
        yield get_backend()


@pytest.fixture
def sub(backend):
    with backend.subscriber() as subscriber:
        yield subscriber


def test_every_callback_of_every_subscriber_gets_the_message(backend):
    got: list[tuple[str, Message]] = []
    with backend.subscriber() as one, backend.subscriber() as two:
        one.subscribe("jobs", lambda m: got.append(("one-a", m)))
        one.subscribe("jobs", lambda m: got.append(("one-b", m)))
        two.subscribe("jobs", lambda m: got.append(("two", m)))
        publish("jobs", "go")
        assert one.dispatch(timeout=5) == 1
        assert two.dispatch(timeout=5) == 1
    assert sorted(tag for tag, _ in got) == ["one-a", "one-b", "two"]
    assert {(m.channel, m.payload, m.resync) for _, m in got} == {("jobs", "go", False)}


def test_channels_are_kept_apart(sub):
    got: list[Message] = []
    sub.subscribe("a", got.append)
    sub.subscribe("b", got.append)
    publish("a", "1")
    publish("c", "nobody listens")
    publish("b", "2")
    while len(got) < 2:
        sub.dispatch(timeout=5)
    assert [(m.channel, m.payload) for m in got] == [("a", "1"), ("b", "2")]
    assert not readable(sub.fileno())


def test_fileno_is_readable_exactly_while_messages_wait(sub):
    sub.subscribe("a", lambda m: None)
    assert not readable(sub.fileno())
    publish("a", "x")
    assert readable(sub.fileno(), timeout=5)
    assert readable(sub.fileno())  # still waiting: nothing dispatched yet
    assert sub.dispatch() == 1
    assert not readable(sub.fileno())
    assert sub.dispatch() == 0


def test_dispatch_runs_callbacks_in_the_calling_thread(sub):
    threads: list[threading.Thread] = []
    sub.subscribe("a", lambda m: threads.append(threading.current_thread()))
    publish("a")
    sub.dispatch(timeout=5)
    assert threads == [threading.current_thread()]


def test_start_runs_callbacks_on_a_background_thread(sub):
    done = threading.Event()
    seen: list[tuple[str, threading.Thread]] = []

    def callback(message: Message) -> None:
        seen.append((message.payload, threading.current_thread()))
        done.set()

    sub.subscribe("a", callback)
    sub.start()
    publish("a", "bg")
    assert done.wait(5)
    assert seen[0][0] == "bg"
    assert seen[0][1] is not threading.current_thread()


def test_unsubscribe_one_callback_then_all(sub):
    first: list[str] = []
    second: list[str] = []

    def one(m: Message) -> None:
        first.append(m.payload)

    def two(m: Message) -> None:
        second.append(m.payload)

    sub.subscribe("a", one)
    sub.subscribe("a", two)
    sub.unsubscribe("a", one)
    publish("a", "1")
    sub.dispatch(timeout=5)
    sub.unsubscribe("a")
    assert sub.channels == []
    publish("a", "2")
    # The listener has dropped the channel, so nothing can become readable.
    sub.subscribe("other", lambda m: None)
    publish("other", "sync")
    sub.dispatch(timeout=5)
    assert first == []
    assert second == ["1"]


def test_a_failing_handler_is_counted_and_delivery_goes_on(sub, caplog):
    got: list[str] = []

    def broken(message: Message) -> None:
        raise RuntimeError("handler bug")

    sub.subscribe("a", broken)
    sub.subscribe("a", lambda m: got.append(m.payload))
    publish("a", "1")
    publish("a", "2")
    while len(got) < 2:
        sub.dispatch(timeout=5)
    assert got == ["1", "2"]
    assert sub.stats["handler_errors"] == 2
    assert "handler bug" in caplog.text


def test_identical_waiting_messages_are_folded(sub):
    got: list[str] = []
    sub.subscribe("a", lambda m: got.append(m.payload))
    sub.subscribe("flush", lambda m: None)
    for payload in ["x", "x", "y", "x"]:
        publish("a", payload)
    publish("flush")
    wait_until(lambda: sub.stats["received"] + sub.stats["folded"] == 5, what="all queued")
    sub.dispatch()
    assert got == ["x", "y"]
    assert sub.stats["folded"] == 2


def test_a_full_queue_drops_and_then_resyncs(backend):
    with override_settings(**MEMORY, PUBSUB_OPTIONS={"max_pending": 3}):
        small = get_backend()
        got: list[Message] = []
        with small.subscriber() as sub:
            sub.subscribe("a", got.append)
            for number in range(10):
                publish("a", str(number))
            wait_until(lambda: sub.stats["received"] + sub.stats["dropped"] == 10)
            sub.dispatch()
        assert [m.payload for m in got if not m.resync] == ["0", "1", "2"]
        assert [m.resync for m in got].count(True) == 1
        assert sub.stats["dropped"] == 7


def test_a_dropped_connection_reconnects_and_resyncs(sub):
    got: list[Message] = []
    sub.subscribe("a", got.append)
    sub.subscribe("b", got.append)
    memory.drop_connections()
    while len(got) < 2:
        sub.dispatch(timeout=5)
    assert sorted((m.channel, m.resync, m.payload) for m in got) == [
        ("a", True, ""),
        ("b", True, ""),
    ]
    publish("a", "after")
    sub.dispatch(timeout=5)
    assert got[-1].payload == "after"
    assert sub.stats["reconnects"] == 1


def test_a_resync_says_since_when_messages_may_be_missing(sub):
    """Its window opens at the lost connection's last read: what came before was heard."""
    got: list[Message] = []
    sub.subscribe("a", got.append)
    before = time.time()
    publish("a", "heard")
    sub.dispatch(timeout=5)
    heard_by = sub.last_heard
    assert heard_by is not None and heard_by >= before
    memory.drop_connections()
    while len(got) < 2:
        sub.dispatch(timeout=5)
    resync = got[-1]
    assert resync.resync and resync.since == heard_by
    assert resync.since < resync.received_at


def test_an_overflow_resync_says_since_when_messages_were_dropped(backend):
    with override_settings(**MEMORY, PUBSUB_OPTIONS={"max_pending": 1}):
        got: list[Message] = []
        with get_backend().subscriber() as sub:
            sub.subscribe("a", got.append)
            publish("a", "0")
            wait_until(lambda: sub.stats["received"] == 1)
            before = time.time()
            publish("a", "1")
            wait_until(lambda: sub.stats["dropped"] == 1)
            sub.dispatch()
        [resync] = [m for m in got if m.resync]
        assert resync.since is not None and before <= resync.since <= resync.received_at


def test_subscribing_while_the_server_is_down_resyncs_when_it_returns(backend):
    memory.set_server_down(True)
    try:
        got: list[Message] = []
        with backend.subscriber() as sub:
            sub.subscribe("a", got.append)  # returns: nothing to confirm with
            assert not sub.connected
            assert "down" in (sub.last_error or "")
            memory.set_server_down(False)
            assert sub.wait_connected(10)
            sub.dispatch(timeout=5)
            assert [(m.channel, m.resync) for m in got] == [("a", True)]
    finally:
        memory.set_server_down(False)


def test_the_liveness_probe_comes_back_on_a_healthy_connection(backend):
    with override_settings(**MEMORY, PUBSUB_OPTIONS={"probe_interval": 0.05}):
        with get_backend().subscriber() as sub:
            sub.subscribe("a", lambda m: None)
            wait_until(lambda: sub.probe_rtt is not None, what="a probe round trip")
            assert sub.stats["probe_failures"] == 0


def test_a_silent_connection_fails_its_probe_and_reconnects(backend, monkeypatch):
    with override_settings(
        **MEMORY, PUBSUB_OPTIONS={"probe_interval": 0.05, "probe_timeout": 0.05}
    ):
        got: list[Message] = []
        with get_backend().subscriber() as sub:
            # A black hole: the probe is sent but never comes back, like a half-open socket.
            monkeypatch.setattr(memory.MemoryTransport, "probe", lambda self, c, p: None)
            sub.subscribe("a", got.append)
            sub.dispatch(timeout=10)
            assert got and got[0].resync
            assert sub.stats["probe_failures"] >= 1


def test_close_stops_the_threads_and_releases_descriptors(backend):
    gc.collect()  # what earlier tests left for the collector is not this test's to count
    before_threads = threading.active_count()
    before_fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        sub = backend.subscriber()
        sub.subscribe("a", lambda m: None)
        sub.start()
        sub.close()
    # At most the baseline: an earlier test's leftovers may still close meanwhile.
    assert threading.active_count() <= before_threads
    assert len(os.listdir("/proc/self/fd")) <= before_fds
    with pytest.raises(SubscriberClosed):
        sub.subscribe("a", lambda m: None)
    with pytest.raises(SubscriberClosed):
        sub.dispatch()


@pytest.mark.parametrize("name", ["pubsub_control", "pubsub_probe_abc", "pubsub_reply_0123abcd"])
def test_the_layers_private_channels_cannot_be_subscribed(sub, name):
    with pytest.raises(InvalidChannel, match="reserved"):
        sub.subscribe(name, lambda m: None)
    assert sub.channels == []


def test_callback_must_be_callable(sub):
    with pytest.raises(TypeError, match="callable"):
        sub.subscribe("a", "not a function")
    assert sub.channels == []


def test_a_forked_child_gets_a_fresh_backend_and_cannot_use_the_parents_subscriber(sub):
    parent_backend = get_backend()
    sub.subscribe("a", lambda m: None)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            fresh = get_backend() is not parent_backend
            try:
                sub.dispatch()
                refused = False
            except SubscriberClosed:
                refused = True
            sub.close()  # must not touch the parent's connection
            os.write(write_fd, b"%d%d" % (fresh, refused))
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    assert os.read(read_fd, 10) == b"11"
    os.close(read_fd)
    assert status == 0
    got: list[str] = []
    sub.subscribe("b", lambda m: got.append(m.payload))
    publish("b", "parent still works")
    sub.dispatch(timeout=5)
    assert got == ["parent still works"]


def _record_readers(monkeypatch) -> list[tuple[threading.Thread, list]]:
    """Which thread each read of a memory connection that brought something ran on."""
    readers: list[tuple[threading.Thread, list]] = []
    original = memory.MemoryTransport.read

    def read(self):
        items = original(self)
        if items:
            readers.append((threading.current_thread(), items))
        return items

    monkeypatch.setattr(memory.MemoryTransport, "read", read)
    return readers


def _one_message_read_by(sub, readers: list[tuple[threading.Thread, list]]) -> threading.Thread:
    """Deliver one message the way Pulp's worker waits for it; the thread that read it."""
    got: list[Message] = []
    sub.subscribe("a", got.append)
    fd = sub.fileno()
    publish("a", "one")
    assert readable(fd, timeout=5)
    assert sub.dispatch() == 1
    assert [m.payload for m in got] == ["one"]
    assert not readable(fd)
    [thread] = [thread for thread, items in readers if ("a", "one") in items]
    return thread


def test_an_owner_waiting_on_fileno_reads_the_message_in_its_own_thread(sub, monkeypatch):
    readers = _record_readers(monkeypatch)
    assert _one_message_read_by(sub, readers) is threading.current_thread()
    assert sub.stats["owner_reads"] == 1


def test_without_owner_reads_the_listener_thread_reads(backend, monkeypatch):
    readers = _record_readers(monkeypatch)
    with override_settings(**MEMORY, PUBSUB_OPTIONS={"owner_reads": False}):
        with get_backend().subscriber() as sub:
            thread = _one_message_read_by(sub, readers)
    assert thread.name.startswith("pubsub-listener")
    assert sub.stats["owner_reads"] == 0


def test_a_read_failing_in_the_owners_thread_reconnects_on_the_listeners(sub):
    got: list[Message] = []
    sub.subscribe("a", got.append)
    fd = sub.fileno()
    memory.drop_connections()
    # The owner meets the dead connection first (its descriptor turns readable); the error
    # is not raised into dispatch(): the listener reconnects and resyncs.
    while not got:
        assert readable(fd, timeout=10)
        sub.dispatch()
    assert [(m.channel, m.resync) for m in got] == [("a", True)]
    assert sub.stats["owner_read_failures"] == 1
    assert sub.stats["reconnects"] == 1
    publish("a", "after")
    while len(got) < 2:
        assert readable(fd, timeout=10)
        sub.dispatch()
    assert got[-1].payload == "after"


def test_a_busy_owner_leaves_reading_to_the_listener_until_it_dispatches_again(backend):
    with override_settings(**MEMORY, PUBSUB_OPTIONS={"probe_interval": 0.05}):
        with get_backend().subscriber() as sub:
            got: list[Message] = []
            sub.subscribe("a", got.append)
            sub.fileno()
            publish("a", "while busy")
            # The owner never looks; at its next timer turn the listener reads what waited.
            wait_until(lambda: sub.stats["received"] == 1, what="the listener's read")
            assert sub.stats["owner_reads"] == 0
            assert sub.stats["probe_failures"] == 0
            sub.dispatch()
            assert [m.payload for m in got] == ["while busy"]
