"""Targeted (work-queue) delivery, written once and run against every backend.

A backend that targets hands each message to a bounded number of a group's
members and hands it again when a member does not acknowledge it; a backend
that cannot (``targets = False``) sends it as a broadcast, and these tests
hold it to exactly that.
"""

from __future__ import annotations

import uuid

import pytest
from django.db import transaction

from pulp_pubsub import WAKEUP, Message, publish
from pulp_pubsub.exceptions import InvalidChannel, InvalidPayload

from .util import dispatch_until

pytestmark = pytest.mark.backend

GROUP = "runners"
CHANNEL = ""


@pytest.fixture(autouse=True)
def _fresh_channel(monkeypatch):
    """A channel of each test's own: queues outlive subscribers on the server."""
    monkeypatch.setitem(globals(), "CHANNEL", f"work.{uuid.uuid4().hex}")


def member(sub, got: list[Message], group: str = GROUP) -> None:
    sub.subscribe(CHANNEL, got.append, group=group)


def work(messages: list[Message]) -> list[str]:
    return [m.payload for m in messages if not m.resync and m.payload != "marker"]


def settle(subs, gots) -> None:
    """Broadcast a marker and dispatch every subscriber until it has it."""
    publish(CHANNEL, "marker")
    for sub, got in zip(subs, gots, strict=True):
        dispatch_until(sub, lambda got=got: any(m.payload == "marker" for m in got))


def broadcast_fallback(backend, manual_ack: bool = False) -> None:
    """Where the backend cannot target: every subscriber gets it, as a broadcast."""
    assert backend.delivery(GROUP) == "broadcast"
    with backend.subscriber(manual_ack=manual_ack) as one, backend.subscriber() as two:
        got_one: list[Message] = []
        got_two: list[Message] = []
        member(one, got_one)
        two.subscribe(CHANNEL, got_two.append)
        publish(CHANNEL, "job", group=GROUP)
        publish(CHANNEL, "job2", group=GROUP)
        dispatch_until(one, lambda: len(work(got_one)) == 2)
        dispatch_until(two, lambda: len(work(got_two)) == 2)
        assert [(m.payload, m.group) for m in got_one + got_two] == [
            ("job", None),
            ("job2", None),
        ] * 2
        assert one.holding == 0


def test_a_targeted_message_reaches_one_member_and_no_outsider(harness):
    with harness.configured() as backend:
        subs = [backend.subscriber() for _ in range(4)]
        gots: list[list[Message]] = [[] for _ in subs]
        try:
            for sub, got in zip(subs[:3], gots[:3], strict=True):
                member(sub, got)
            subs[3].subscribe(CHANNEL, gots[3].append)  # broadcast only
            publish(CHANNEL, "job", group=GROUP)
            if backend.targets:
                for sub in subs[:3]:
                    sub.dispatch(timeout=0)
                # One of the three has it: dispatch each until it is found.
                while sum(len(work(g)) for g in gots) < 1:
                    for sub in subs[:3]:
                        sub.dispatch(timeout=0.05)
                settle(subs, gots)
                assert sorted(len(work(g)) for g in gots[:3]) == [0, 0, 1]
                assert work(gots[3]) == []
                [got] = [g for g in gots if work(g)]
                assert got[0].group == GROUP
            else:
                settle(subs, gots)
                assert [work(g) for g in gots] == [["job"]] * 4
            assert backend.delivery(GROUP) == ("targeted" if backend.targets else "broadcast")
        finally:
            for sub in subs:
                sub.close()


def test_receivers_bounds_the_members_that_get_a_message(harness):
    with harness.configured() as backend:
        # Manual ack: a member holding a message takes no other, so two copies
        # must reach two different members.
        subs = [backend.subscriber(manual_ack=True) for _ in range(4)]
        gots: list[list[Message]] = [[] for _ in subs]
        try:
            for sub, got in zip(subs, gots, strict=True):
                member(sub, got)
            publish(CHANNEL, "job", group=GROUP, receivers=2)
            if not backend.targets:
                settle(subs, gots)
                assert [work(g) for g in gots] == [["job"]] * 4
                return
            while sum(len(work(g)) for g in gots) < 2:
                for sub in subs:
                    sub.dispatch(timeout=0.05)
            settle(subs, gots)
            assert sorted(len(work(g)) for g in gots) == [0, 0, 1, 1]
            assert sum(sub.holding for sub in subs) == 2
        finally:
            for sub in subs:
                sub.close()


def test_a_member_holding_a_message_gets_the_next_only_after_its_ack(harness):
    with harness.configured() as backend, backend.subscriber(manual_ack=True) as sub:
        if not backend.targets:
            return broadcast_fallback(backend, manual_ack=True)
        got: list[Message] = []
        member(sub, got)
        publish(CHANNEL, "one", group=GROUP)
        publish(CHANNEL, "two", group=GROUP)
        dispatch_until(sub, lambda: work(got))
        assert sub.dispatch(timeout=0.5) == 0  # "two" waits while "one" is held
        assert work(got) == ["one"]
        assert sub.ack() == 1
        dispatch_until(sub, lambda: len(work(got)) == 2)
        assert work(got) == ["one", "two"]


def test_a_message_its_member_never_acks_goes_to_another(harness):
    with harness.configured(claim_timeout=0.5) as backend:
        if not backend.targets:
            return broadcast_fallback(backend)
        with backend.subscriber(manual_ack=True) as hung, backend.subscriber() as other:
            hung_got: list[Message] = []
            other_got: list[Message] = []
            member(hung, hung_got)
            publish(CHANNEL, "job", group=GROUP)
            dispatch_until(hung, lambda: work(hung_got))
            # It never acks (hangs, or was killed after the hand-over).
            member(other, other_got)
            dispatch_until(other, lambda: work(other_got))
            assert work(other_got) == ["job"]


def test_a_busy_member_leaves_messages_to_the_others(harness):
    with harness.configured() as backend:
        if not backend.targets:
            return broadcast_fallback(backend)
        with backend.subscriber() as busy, backend.subscriber() as idle:
            busy_got: list[Message] = []
            idle_got: list[Message] = []
            member(busy, busy_got)
            busy.set_accepting(CHANNEL, GROUP, False)
            member(idle, idle_got)
            for n in range(3):
                publish(CHANNEL, f"job{n}", group=GROUP)
            dispatch_until(idle, lambda: len(work(idle_got)) == 3)
            settle([busy, idle], [busy_got, idle_got])
            assert work(busy_got) == []
            busy.set_accepting(CHANNEL, GROUP, True)
            publish(CHANNEL, "later", group=GROUP)
            while "later" not in work(busy_got) + work(idle_got):
                busy.dispatch(timeout=0.05)
                idle.dispatch(timeout=0.05)


def test_closing_gives_held_messages_back_at_once(harness):
    # A long claim timeout: only the give-back at close can bring it over in time.
    with harness.configured(claim_timeout=60) as backend:
        if not backend.targets:
            return broadcast_fallback(backend)
        with backend.subscriber() as other:
            leaving = backend.subscriber(manual_ack=True)
            leaving_got: list[Message] = []
            other_got: list[Message] = []
            member(leaving, leaving_got)
            publish(CHANNEL, "job", group=GROUP)
            dispatch_until(leaving, lambda: work(leaving_got))
            member(other, other_got)
            leaving.close()
            dispatch_until(other, lambda: work(other_got), timeout=10)
            assert work(other_got) == ["job"]


@pytest.mark.django_db(transaction=True, databases="__all__")
def test_a_targeted_publish_in_atomic_is_sent_at_commit_only(harness):
    with harness.configured() as backend, backend.subscriber() as sub:
        got: list[Message] = []
        member(sub, got)
        with pytest.raises(RuntimeError), transaction.atomic(using=harness.db_alias):
            publish(CHANNEL, "rolled back", group=GROUP)
            raise RuntimeError("abort")
        with transaction.atomic(using=harness.db_alias):
            publish(CHANNEL, "committed", group=GROUP)
            assert sub.dispatch(timeout=0.2) == 0
        dispatch_until(sub, lambda: work(got))
        settle([sub], [got])
        assert work(got) == ["committed"]


@pytest.mark.parametrize(
    ("group", "receivers", "error"),
    [
        ("has space", 1, InvalidChannel),
        ("", 1, InvalidChannel),
        ("x" * 64, 1, InvalidChannel),
        ("colon:no", 1, InvalidChannel),
        (GROUP, 0, InvalidPayload),
        (GROUP, 1001, InvalidPayload),
        (GROUP, True, InvalidPayload),
    ],
)
def test_bad_groups_and_receivers_are_refused_and_nothing_is_sent(harness, group, receivers, error):
    with harness.configured() as backend, backend.subscriber() as sub:
        got: list[Message] = []
        member(sub, got)
        with pytest.raises(error):
            publish(CHANNEL, "bad", group=group, receivers=receivers)
        with pytest.raises(InvalidChannel):
            sub.subscribe("contract.other", got.append, group="no good")
        assert sub.channels == [CHANNEL]
        settle([sub], [got])
        assert work(got) == []


def test_a_declared_channel_refuses_an_undeclared_group(harness):
    with harness.configured():
        with pytest.raises(InvalidChannel, match="declares no group 'nope'"):
            publish(WAKEUP, "handle", group="nope")
