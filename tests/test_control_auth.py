"""The control channel answers only the fleet, once per query, at a bounded rate.

The attacker here is anyone who can publish on the server: it sends
unsigned queries, queries signed with another key or for another install,
replays a query it saw on the wire, floods, and forges answers. The tests
that involve the server run on every backend.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.test import override_settings

from pulp_pubsub import checks, control_auth, get_backend
from pulp_pubsub.backends.listener.responder import CONTROL_CHANNEL
from pulp_pubsub.backends.selfpipe import wait_readable
from pulp_pubsub.control_auth import WINDOW, control_key, query_body, sign, verify
from pulp_pubsub.management.inspect import ControlClient, gather

from .test_subscriber import MEMORY
from .util import wait_until

backend_test = pytest.mark.backend


def qid(n: int) -> str:
    return f"{n:016x}"


class Asker(ControlClient):
    """A querier that sends raw control messages and keeps every reply it reads."""

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        self.control = backend.wire_name(CONTROL_CHANNEL)
        self.replies: list[str] = []

    def signed(self, query_id: str, sent_at: float | None = None, key: bytes | None = None) -> str:
        body = query_body(query_id, self.reply, sent_at)
        return sign(key or control_key(), "query", self.control, body)

    def send(self, payload: str) -> None:
        self.backend.send(self.control, payload)

    def answered(self) -> list[str]:
        """The query ids of the correctly signed answers read so far."""
        key = control_key()
        ids = []
        for payload in self.replies:
            text = verify(key, "answer", self._reply_wire, payload)
            if text is not None:
                ids.append(json.loads(text)["query"])
        return ids

    def read_until(self, predicate: Callable[[], object], timeout: float = 15) -> None:
        self._read(time.monotonic() + timeout, self.replies.append, predicate)
        assert predicate(), f"no such answer within {timeout} s: {self.answered()}"


@contextmanager
def fleet_member(backend: Any) -> Iterator[Any]:
    with backend.subscriber() as sub:
        sub.subscribe("demo_events", lambda m: None)
        assert sub.wait_connected(10)
        yield sub


@backend_test
def test_unsigned_and_wrongly_signed_queries_get_no_answer(harness):
    with (
        harness.configured() as backend,
        fleet_member(backend) as sub,
        Asker(backend) as asker,
    ):
        now = time.time()
        body = query_body(qid(1), asker.reply, now)
        other_reply = query_body(qid(1), asker.reply.replace("_reply_", "_reply_0"), now)
        forged = [
            body,  # no signature at all (what every query was before)
            sign(b"k" * 32, "query", asker.control, body),  # another key
            sign(control_key(), "query", "other." + asker.control, body),  # another install
            sign(control_key(), "answer", asker.control, body),  # an answer passed off as a query
            asker.signed(qid(1), now).replace(body, other_reply),  # a signed query, altered
            "v1 " + "0" * 64 + " " + body,
        ]
        for _ in range(20):
            for payload in forged:
                asker.send(payload)
        asker.send(asker.signed(qid(2)))
        # Delivered in order: once the good query's answer is back, the rest were read.
        asker.read_until(lambda: qid(2) in asker.answered())
        assert asker.answered() == [qid(2)]
        assert len(asker.replies) == 1
        assert sub.control_gate.refused == Counter(unauthenticated=20 * len(forged))


@backend_test
def test_a_replayed_or_stale_query_gets_no_answer(harness):
    with (
        harness.configured() as backend,
        fleet_member(backend) as sub,
        Asker(backend) as asker,
    ):
        seen_on_the_wire = asker.signed(qid(1))
        asker.send(seen_on_the_wire)
        asker.read_until(lambda: qid(1) in asker.answered())
        for _ in range(3):
            asker.send(seen_on_the_wire)
        asker.send(asker.signed(qid(3), sent_at=time.time() - WINDOW - 5))
        asker.send(asker.signed(qid(4), sent_at=time.time() + WINDOW + 5))
        asker.send(asker.signed(qid(5)))
        asker.read_until(lambda: qid(5) in asker.answered())
        assert asker.answered() == [qid(1), qid(5)]
        assert sub.control_gate.refused == Counter(replayed=3, stale=2)


@backend_test
def test_a_flood_of_valid_queries_costs_a_bounded_number_of_answers(harness):
    flood, rate = 100, 5
    with (
        harness.configured() as backend,
        override_settings(PUBSUB_INTROSPECTION_RATE=rate),
        fleet_member(backend) as one,
        fleet_member(backend) as two,
        Asker(backend) as asker,
    ):
        started = time.monotonic()
        for n in range(flood):
            asker.send(asker.signed(qid(n)))
        gates = [one.control_gate, two.control_gate]
        wait_until(
            lambda: all(g.admitted + g.refused["rate"] == flood for g in gates),
            timeout=30,
            what="every query of the flood read",
        )
        elapsed = time.monotonic() - started
        # The bucket holds `rate` answers and refills at `rate` a minute.
        bound = rate + int(elapsed * rate / 60)
        admitted = [g.admitted for g in gates]
        assert all(rate <= n <= bound for n in admitted), (admitted, bound)
        asker.read_until(lambda: len(asker.answered()) == sum(admitted))
        assert len(asker.replies) == sum(admitted)


@backend_test
def test_forged_answers_are_not_counted(harness):
    """A party that reads a query off the wire cannot fake a healthy fleet."""
    with harness.configured() as backend, fleet_member(backend) as sub:
        control = backend.wire_name(CONTROL_CHANNEL)
        transport = backend.open_transport()
        transport.listen([control])
        forged, stop = threading.Event(), threading.Event()

        def forge() -> None:
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                wait_readable([transport.fileno()], 0.5)
                for wire, payload in transport.read():
                    if wire != control or payload is None:
                        continue
                    query = json.loads(payload.split(" ", 2)[2])
                    reply = backend.wire_name(query["reply"])
                    for n in range(3):
                        fake = {"query": query["query"], "id": f"fake-{n}", "host": "h", "pid": n}
                        text = json.dumps(fake)
                        backend.send(reply, text)  # unsigned
                        backend.send(reply, sign(b"k" * 32, "answer", reply, text))
                    forged.set()

        forger = threading.Thread(target=forge)
        forger.start()
        try:
            answers = gather(backend, timeout=3, expect=2)
        finally:
            stop.set()
            forger.join()
            transport.close()
        assert forged.is_set(), "the forger never saw the query"
        assert [a.id for a in answers] == [f"{os.getpid()}-{id(sub):x}"]


@backend_test
def test_with_introspection_off_a_subscriber_does_not_even_hear_the_control_channel(harness):
    with harness.configured() as backend, Asker(backend) as asker:
        with override_settings(PUBSUB_INTROSPECTION=False):
            off = backend.subscriber()
        with off:
            inbox: list[Any] = []
            off.subscribe("demo_events", inbox.append)
            assert off.wait_connected(10)
            asker.send(asker.signed(qid(1)))
            backend.publish("demo_events", "after the query")
            deadline = time.monotonic() + 15
            while not inbox and time.monotonic() < deadline:
                off.dispatch(timeout=deadline - time.monotonic())
            assert [m.payload for m in inbox] == ["after the query"]
            # Read in order: the query came first, and never reached the subscriber.
            assert off.control_gate.refused == Counter()
            counts = backend.subscriber_counts([CONTROL_CHANNEL])
            if counts is not None:  # PostgreSQL cannot tell
                assert counts == {CONTROL_CHANNEL: 0}


# -- settings --------------------------------------------------------------------------


@pytest.fixture
def memory_backend() -> Iterator[Any]:
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}):
        yield get_backend()


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_with_introspection_off_nothing_answers_and_the_commands_say_so(memory_backend):
    with override_settings(PUBSUB_INTROSPECTION=False):
        off = memory_backend.subscriber()
    with off, fleet_member(memory_backend) as on:
        off.subscribe("demo_events", lambda m: None)
        assert off.wait_connected(10)
        # Only the subscriber that answers does: the other does not even listen.
        answers = gather(memory_backend, timeout=2, expect=2)
        assert [a.id.split("-")[1] for a in answers] == [f"{id(on):x}"]
        assert off.control_gate.refused == Counter()
        with override_settings(PUBSUB_INTROSPECTION=False):
            for args in [("pubsub_channels", "--live"), ("pubsub_ping", "--expect-subscribers=1")]:
                with pytest.raises(CommandError, match=r"switched off.*PUBSUB_INTROSPECTION"):
                    run(*args)
            # The round trip, which asks no subscriber, still works.
            assert "round trip" in run("pubsub_ping")


def test_a_querier_with_another_key_hears_nothing_and_is_told_why(memory_backend):
    with fleet_member(memory_backend):
        assert len(gather(memory_backend, timeout=10, expect=1)) == 1
        with override_settings(PUBSUB_CONTROL_KEY="x" * 40):
            assert gather(memory_backend, timeout=0.5) == []
            with pytest.raises(CommandError, match=r"Only 0 .*signed with the fleet's key"):
                run("pubsub_ping", "--expect-subscribers=1", "--timeout=0.5")
            assert "signed with the fleet's key" in run(
                "pubsub_channels", "--live", "--timeout=0.5"
            )
    # The same explicit key on both sides works.
    with override_settings(PUBSUB_CONTROL_KEY="y" * 40), fleet_member(memory_backend):
        assert len(gather(memory_backend, timeout=10, expect=1)) == 1


@pytest.mark.parametrize(
    "overrides, shown",
    [
        ({}, True),
        ({"PUBSUB_METRICS_CHANNEL_ATTRIBUTES": False}, False),
        ({"PUBSUB_METRICS_CHANNEL_ATTRIBUTES": False, "PUBSUB_INTROSPECTION_CHANNELS": True}, True),
        ({"PUBSUB_INTROSPECTION_CHANNELS": False}, False),
    ],
)
def test_answers_leave_out_channel_names_when_told(memory_backend, overrides, shown):
    with override_settings(**overrides), fleet_member(memory_backend) as sub:
        sub.subscribe("secret.project", lambda m: None)
        [answer] = gather(memory_backend, timeout=10, expect=1)
        text = run("pubsub_channels", "--live", "--timeout=0.5")
        listing = json.loads(run("pubsub_channels", "--live", "--json", "--timeout=0.5"))
    assert answer.channels_total == 2
    if shown:
        assert answer.channels == ("demo_events", "secret.project")
    else:
        assert (answer.channels, answer.channels_hidden) == ((), True)
        assert "secret.project" not in text and "secret.project" not in json.dumps(listing)
        assert "(2 hidden)" in text
        rows = {row["channel"]: row for row in listing["channels"]}
        assert rows["demo_events"]["live_subscribers"] is None  # unknown, not 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"PUBSUB_CONTROL_KEY": "short"}, "at least 32 characters"),
        ({"PUBSUB_CONTROL_KEY": 12345}, "at least 32 characters"),
        ({"PUBSUB_INTROSPECTION": "yes"}, "PUBSUB_INTROSPECTION must be True or False"),
        ({"PUBSUB_INTROSPECTION_RATE": 0}, "must be a positive number"),
        ({"PUBSUB_INTROSPECTION_RATE": "10"}, "must be a positive number"),
        ({"PUBSUB_INTROSPECTION_CHANNELS": 1}, "INTROSPECTION_CHANNELS must be True or False"),
    ],
)
def test_bad_introspection_settings_are_a_system_check_error(overrides, message):
    with override_settings(**overrides):
        [error] = checks.check_control_key()
    assert error.id == "pulp_pubsub.E006" and message in error.msg and error.hint


def test_a_bad_setting_stops_a_subscriber_before_it_opens_anything(memory_backend):
    before = sorted(os.listdir("/proc/self/fd"))
    with override_settings(PUBSUB_INTROSPECTION_RATE=-1):
        with pytest.raises(ImproperlyConfigured, match="must be a positive number"):
            memory_backend.subscriber()
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_good_introspection_settings_pass_the_checks():
    assert checks.check_control_key() == []
    with override_settings(PUBSUB_CONTROL_KEY="k" * 32, SECRET_KEY="s"):
        assert checks.check_control_key() == []
        assert checks.check_control_key_strength() == []
    with override_settings(PUBSUB_INTROSPECTION=False, PUBSUB_CONTROL_KEY="short"):
        assert checks.check_control_key() == []


@pytest.mark.parametrize("secret", ["short", "django-insecure-" + "x" * 50])
def test_a_key_derived_from_a_weak_secret_key_is_a_deploy_warning(secret):
    with override_settings(SECRET_KEY=secret):
        [warning] = checks.check_control_key_strength()
    assert warning.id == "pulp_pubsub.W002" and warning.hint


def test_the_key_is_derived_not_the_secret_key_itself():
    with override_settings(SECRET_KEY="s" * 50):
        derived = control_key()
        assert b"s" * 50 not in derived and len(derived) == 32
        with override_settings(PUBSUB_CONTROL_KEY="s" * 50):
            assert control_key() == derived  # same material, same label: same key
    assert control_key() != derived


def test_the_key_never_shows_in_a_repr(memory_backend):
    from .test_reprs import renderings

    policy = control_auth.policy()
    assert policy.key is not None
    spellings = [policy.key.hex(), bytes(policy.key).__repr__()[2:-1]]
    with memory_backend.subscriber() as sub, ControlClient(memory_backend) as client:
        texts = [text for obj in (policy, sub, client) for _, text in renderings(obj)]
    assert any("b'***'" in text for text in texts)  # the key was reached, and hidden
    assert [t for t in texts if any(s in t for s in spellings)] == []
