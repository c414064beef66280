"""Targeted delivery on Redis: which idle member a wake-up goes to, and members gone.

A ghost is a member as a process killed while idle leaves it: its turn ran (it is
recorded idle, its marks set) and nothing waits on its inbox. It is made with a bare
client running the member's own script.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import redis

from pulp_pubsub.backends.listener import Subscriber
from pulp_pubsub.backends.redis.groups import CONSUMER_GROUP, member_base, stream_key
from pulp_pubsub.backends.redis.scripts import MEMBER
from pulp_pubsub_tools.testing import RedisServer

from .test_redis import Inbox, redis_backend
from .util import dispatch_until, wait_until

pytestmark = pytest.mark.backend
GROUP = "workers"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    yield client
    client.close()


def new_channel() -> tuple[str, str]:
    channel = f"idle.{os.urandom(4).hex()}"
    return channel, stream_key(channel, GROUP)


def idle(admin: redis.Redis, key: str) -> list[str]:
    """The members recorded idle on a stream, the one idle since the latest time last."""
    return admin.zrange(f"{key}>idle", 0, -1)


def ghost(admin: redis.Redis, key: str, name: str, marks_ms: int) -> None:
    if not admin.exists(key):
        admin.xgroup_create(key, CONSUMER_GROUP, "$", mkstream=True)
    args = (CONSUMER_GROUP, name, member_base(""), str(marks_ms), "turn", "1000")
    assert admin.eval(MEMBER, 1, key, *args) == []


def consumer(sub: Subscriber) -> str:
    """The name the subscriber's targeted deliveries go by on the server."""
    return sub._targeted.consumer


def join(sub: Subscriber, channel: str) -> Inbox:
    box = Inbox(sub)
    sub.subscribe(channel, box, group=GROUP)
    assert sub.wait_connected(10), sub.last_error
    return box


def test_a_wake_up_goes_to_the_member_idle_since_the_latest_time(server, admin):
    """Three wake-ups in a row all go to the member that finished last, none to the
    one idle longer (Redis's own blocked-reader order would give it the first)."""
    channel, key = new_channel()
    with redis_backend(server.url) as backend:
        with backend.subscriber() as cold, backend.subscriber() as warm:
            join(cold, channel)
            wait_until(lambda: idle(admin, key) == [consumer(cold)], what="cold to be idle")
            box = join(warm, channel)
            for n in range(3):
                wait_until(
                    lambda: idle(admin, key) == [consumer(cold), consumer(warm)],
                    what="warm to be idle again, after cold",
                )
                backend.publish(channel, str(n), group=GROUP)
                box.wait_for_payload(str(n))
            # A targeted message reaches one member: warm had all three.
            assert box.payloads() == ["0", "1", "2"]


def test_a_wake_up_handed_to_a_member_killed_while_idle_reaches_another(server, admin):
    channel, key = new_channel()
    with redis_backend(server.url, claim_timeout=0.5) as backend, backend.subscriber() as live:
        box = join(live, channel)
        wait_until(lambda: idle(admin, key) == [consumer(live)], what="the member to be idle")
        ghost(admin, key, "ghost", marks_ms=60_000)
        assert idle(admin, key) == [consumer(live), "ghost"]
        backend.publish(channel, "for the ghost", group=GROUP)
        # Handed to the ghost (pending for it), then claimed by the live member's sweep.
        box.wait_for_payload("for the ghost")
        assert "ghost" not in idle(admin, key)
        wait_until(lambda: admin.xpending(key, CONSUMER_GROUP)["pending"] == 0, what="the ack")


def test_members_whose_marks_lapsed_are_passed_over_and_pruned(server, admin):
    channel, key = new_channel()
    # Below the live member in the stack, and above it: both killed long ago.
    ghost(admin, key, "deep-ghost", marks_ms=1)
    with redis_backend(server.url, claim_timeout=60) as backend, backend.subscriber() as live:
        box = join(live, channel)
        # The member's first sweep tidies: the deep ghost, never picked, is removed.
        wait_until(lambda: idle(admin, key) == [consumer(live)], what="the prune")
        ghost(admin, key, "top-ghost", marks_ms=1)
        wait_until(lambda: not admin.exists(f"{member_base('')}top-ghost>alive"), what="lapse")
        assert idle(admin, key) == [consumer(live), "top-ghost"]
        backend.publish(channel, "passed over", group=GROUP)
        # Straight to the live member: a claim would take 60 s.
        box.wait_for_payload("passed over")
        assert "top-ghost" not in idle(admin, key)
        holders = admin.xpending(key, CONSUMER_GROUP)["consumers"]
        assert "top-ghost" not in [holder["name"] for holder in holders]


def contains(read: Callable[[], list[str]], item: str) -> bool:
    return item in read()


def test_joining_groups_on_streams_that_do_not_exist_yet_costs_no_reconnect(server):
    # subscribe(group=...) records the group before the listener creates its stream: a
    # turn on it in between got NOGROUP and cost the connection (4 of 10 before the fix).
    for _ in range(10):
        channel, _key = new_channel()
        with redis_backend(server.url, prefix=f"{os.urandom(4).hex()}.") as backend:
            with backend.subscriber(manual_ack=True) as sub:
                inbox = Inbox(sub)
                sub.subscribe(channel, inbox)
                for group in ("unblock", "handle"):
                    sub.subscribe(channel, inbox, group=group)
                backend.publish(channel, "work", group="handle")
                dispatch_until(sub, partial(contains, inbox.payloads, "work"))
                assert backend.stats["reconnects"] == 0, sub.last_error
                assert inbox.resyncs() == []
