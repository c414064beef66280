"""A 3-node NATS cluster on loopback loses the node a subscriber is connected to (kill -9).

Messages flow throughout. Core NATS: every message lost in the failover is covered by a
resync. JetStream with a replicated (R3) stream: no resync and no acknowledged message lost.
Each run prints its figures: published, delivered, resynced, failover time.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from typing import Any

import nats
import pytest
from django.test import override_settings
from nats.js.api import StreamConfig

from pulp_pubsub import get_backend
from pulp_pubsub.exceptions import PublishError
from pulp_pubsub_tools.chaos import natsfailover
from pulp_pubsub_tools.testing import NatsCluster

from .reliability_util import FAST, Inbox
from .util import wait_until

pytestmark = [pytest.mark.backend, pytest.mark.servers, pytest.mark.long]

CHANNEL = "failover"


class Flow:
    """Publishes numbered messages every few milliseconds on a thread of its own."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.acked: list[str] = []
        self.failed = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(0.005):
            payload = f"m{i:06d}"
            i += 1
            try:
                self.backend.publish(CHANNEL, payload)
            except PublishError:
                self.failed += 1
            else:
                self.acked.append(payload)

    def __enter__(self) -> Flow:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def fail_over(cluster: NatsCluster, **options: Any) -> dict[str, Any]:
    settings = {
        "PUBSUB_BACKEND": "nats",
        "PUBSUB_URL": cluster.url,
        "PUBSUB_OPTIONS": {**FAST, "publish_timeout": 2.0, **options},
    }
    with override_settings(**settings):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub, started=True)
            sub.subscribe(CHANNEL, inbox)
            sub.start()
            with Flow(backend) as flow:
                wait_until(lambda: len(inbox.payloads()) >= 50, 15, "messages to flow")
                node = cluster.node_serving("subscriber")
                assert node is not None, "no node holds the subscriber's connection"
                node.stop("kill")
                killed_at = time.time()
                wait_until(lambda: sub.stats["reconnects"] >= 1, 15, "the loss to be noticed")
                # JetStream waits for a new stream leader when the killed node led the
                # stream: up to ~17 s measured here, so a generous bound.
                wait_until(lambda: sub.connected, 60, "the subscriber to reconnect")
                reconnected = (sub.connected_since or 0) - killed_at
                count = len(inbox.payloads())
                wait_until(lambda: len(inbox.payloads()) > count + 100, 30, "messages to flow")
            last = flow.acked[-1]
            inbox.wait(lambda messages: last in {m.payload for m in messages}, timeout=30)
            delivered = set(inbox.payloads())
            lost = [p for p in flow.acked if p not in delivered]
            resyncs = [m for m in inbox.messages if m.resync]
            # Failover: from the kill to the first message delivered on the new connection.
            flowing_again = min(
                m.received_at
                for m in inbox.messages
                if not m.resync and m.received_at >= killed_at + reconnected
            )
            figures = {
                "published": len(flow.acked),
                "publish_failures": flow.failed,
                "delivered": len(delivered),
                "lost": len(lost),
                "resynced": len(resyncs),
                # Told while the stream could not store a publish (it had no leader).
                "unstored_resyncs": backend.stats["unstored_resyncs"],
                "reconnected_s": round(reconnected, 3),
                "failover_s": round(flowing_again - killed_at, 3),
                "reconnects": sub.stats["reconnects"],
                "replays": sub.stats["replays"],
            }
            print(f"\nNATS cluster failover ({'JetStream R3' if options else 'core'}): {figures}")
            figures["lost_list"] = lost
            return figures


def stored(backend: Any, channel: str, payload: str, group: str | None = None) -> bool:
    try:
        backend.publish(channel, payload, group=group)
    except PublishError:
        return False
    return True


def test_core_nats_covers_every_loss_in_a_failover_with_a_resync():
    with NatsCluster(3) as cluster:
        figures = fail_over(cluster)
        assert figures["reconnects"] >= 1
        # Core NATS is at most once: what the failover lost is covered by a resync.
        assert figures["resynced"] >= 1
        assert figures["delivered"] >= figures["published"] - figures["lost"]


def test_jetstream_r3_loses_nothing_in_a_failover_and_needs_no_resync():
    with NatsCluster(3, jetstream=True) as cluster:
        # The gap comes back as one burst on reconnect. A failover on a loaded machine has
        # taken 23 s, about 2,000 messages at this flow: past the default max_pending (1000)
        # the subscriber's own queue would drop them for a resync, as documented, which is
        # not what this test is about. Room for the whole gap keeps it on JetStream's replay.
        figures = fail_over(cluster, jetstream=True, stream_replicas=3, max_pending=100_000)
        assert figures["reconnects"] >= 1 and figures["replays"] >= 1
        assert figures["lost_list"] == []
        # No resync for a gap (some, when the killed node led the stream, for publishes
        # it could not store yet: see test_..._when_its_node_led_the_stream).
        assert figures["resynced"] == figures["unstored_resyncs"]


def test_jetstream_subscriber_replays_in_order_when_its_node_led_the_stream():
    # The hardest node loss for a JetStream subscriber: its own node led the stream, so
    # nothing new is stored until the stream has elected another leader. The subscriber
    # itself needs no leader: it reads its gap with direct gets from a replica and listens
    # to what the stream republishes, so it makes no consumer. How long the election takes
    # is a figure (docs/reliability.md, made by the same run_once), not something a test on
    # a shared machine can hold a bound on.
    figures = natsfailover.run_once({}, rate=50.0, leader="killed", after=1.0)
    assert figures["killed_led_stream"]
    assert figures["reconnects"] >= 1 and figures["replays"] >= 1
    assert any("Replayed" in line for line in figures["log"]), figures["log"]
    assert not any("consumer" in line for line in figures["log"]), figures["log"]
    assert figures["delivered_again_s"] is not None, figures["log"]
    assert figures["missing_first"] == [] and figures["missing"] == 0
    assert figures["out_of_order"] == 0 and figures["duplicates"] == 0
    # No resync at all: while the stream had no leader, the publisher sent its unstored
    # message over plain NATS, and the subscriber delivered it before the stream could
    # store it (and not again once it did: no duplicate above).
    assert figures["unstored_deliveries"] >= 1, figures["log"]
    assert figures["resyncs"] == 0 and figures["unstored_resyncs"] == 0, figures["log"]
    assert figures["delivered_again_s"] < figures["stored_again_s"], figures
    told = [line for line in figures["log"] if "and sent it here: delivered now" in line]
    assert told, figures["log"]
    # The publisher sent its publish again through the election, and said what it waited
    # for (every try of a publish has one Nats-Msg-Id: "no duplicate" above is the stream's
    # deduplication at work).
    waited = [line for line in figures["log"] if "did not answer the publish of a message" in line]
    assert waited, figures["log"]


def test_jetstream_subscriber_delivers_a_message_its_stream_cannot_store_yet_once():
    # Two of three nodes frozen: the stream has no quorum, so nothing is stored and a
    # publish waits, sent again every half second. What it tells the channel carries the
    # message over plain NATS, which needs no leader: the subscriber delivers it while the
    # publish still waits, and not again when the stream has stored it.
    with NatsCluster(3, jetstream=True) as cluster:
        first, *others = cluster.nodes
        options = {"jetstream": True, "stream_replicas": 3, "publish_timeout": 60.0}
        settings = {
            "PUBSUB_BACKEND": "nats",
            "PUBSUB_URL": first.address,
            "PUBSUB_CHANNEL_PREFIX": "early",
            # Probes go through the stream too: none while it cannot store.
            "PUBSUB_OPTIONS": {**FAST, **options, "probe_interval": 60.0},
        }
        with override_settings(**settings):
            backend = get_backend()
            # A stream just made elects its first leader before it stores anything.
            wait_until(lambda: stored(backend, CHANNEL, "before"), 30, "the stream to store")
            with backend.subscriber() as sub:
                inbox = Inbox(sub, started=True)
                sub.subscribe(CHANNEL, inbox)
                sub.start()
                backend.publish(CHANNEL, "first")
                inbox.wait_payload("first")
                returned = threading.Event()
                failed: list[BaseException] = []

                def publish() -> None:
                    try:
                        backend.publish(CHANNEL, "waiting")
                    except PublishError as exc:
                        failed.append(exc)
                    finally:
                        returned.set()

                for node in others:
                    node.freeze()
                try:
                    thread = threading.Thread(target=publish, daemon=True)
                    thread.start()
                    inbox.wait_payload("waiting")
                    delivered_while_waiting = not returned.is_set()
                finally:
                    for node in others:
                        node.thaw()
                assert delivered_while_waiting
                assert returned.wait(70) and not failed, failed
                backend.publish(CHANNEL, "after")
                inbox.wait_payload("after")
                assert inbox.payloads() == ["first", "waiting", "after"]
                assert not any(m.resync for m in inbox.messages)
                assert backend.stats["unstored_deliveries"] >= 1


def test_jetstream_subscriber_says_what_it_waits_for_while_the_cluster_has_no_quorum(caplog):
    # Two of three nodes frozen: the cluster cannot make a consumer until they are back. The
    # subscriber asks again instead of giving up at its first unanswered request, and the
    # log names what it waited for and how long. Consumers are what it makes on a stream
    # that does not republish (an operator's); on the layer's own it makes none, and its
    # direct gets are answered by whichever replica is caught up (on nats-server 2.15 the
    # subscriber's own node, frozen peers or not).
    caplog.set_level(logging.INFO, logger="pulp_pubsub")
    with NatsCluster(3, jetstream=True) as cluster:
        first, *others = cluster.nodes

        async def own_stream() -> None:
            nc = await nats.connect(first.address)
            try:
                config = StreamConfig(name="OWN", subjects=["own.*"], num_replicas=3)
                await nc.jsm().add_stream(config)
            finally:
                await nc.close()

        asyncio.run(own_stream())
        settings = {
            "PUBSUB_BACKEND": "nats",
            "PUBSUB_URL": first.address,
            "PUBSUB_CHANNEL_PREFIX": "own",
            "PUBSUB_OPTIONS": {**FAST, "jetstream": True, "stream": "OWN"},
        }
        with override_settings(**settings):
            backend = get_backend()
            with backend.subscriber() as sub:
                inbox = Inbox(sub, started=True)
                sub.subscribe(CHANNEL, inbox)  # its consumer made while the cluster is whole
                sub.start()
                # A stream just made elects its first leader before it stores anything.
                wait_until(lambda: stored(backend, CHANNEL, "before"), 30, "the stream to store")
                inbox.wait(lambda messages: "before" in {m.payload for m in messages})
                for node in others:
                    node.freeze()
                try:
                    sub.subscribe("failover_late", inbox)
                    wait_until(
                        lambda: "JetStream did not answer" in caplog.text,
                        30,
                        "the subscriber to say it waits for JetStream",
                    )
                finally:
                    for node in others:
                        node.thaw()
                wait_until(
                    lambda: "JetStream answered" in caplog.text,
                    60,
                    "the subscriber to say JetStream answered",
                )
                # The thawed nodes may still be electing the stream's leader: publish until
                # the stream takes it.
                wait_until(
                    lambda: stored(backend, "failover_late", "after"), 30, "the stream to store"
                )
                inbox.wait(lambda messages: "after" in {m.payload for m in messages}, timeout=30)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("JetStream")]
    # What it asked for, and how long it waited.
    assert any(
        line.startswith("JetStream did not answer the ") and "asking again" in line for line in said
    ), said
    assert any(re.search(r"answered the .* after [0-9.]+ s and [0-9]+ tries", s) for s in said)


async def lead_from(urls: list[str], kind: str, name: str, wanted: set[str]) -> str:
    """Step a stream's or a consumer's leader down until one of ``wanted`` leads it.

    For a consumer, also until a pull request waits there (a member asks again half a
    second after a leader change).
    """
    nc = await nats.connect(urls)
    try:
        jsm = nc.jsm(timeout=1)
        subject = f"$JS.API.{kind.upper()}.LEADER.STEPDOWN.{name.replace('/', '.')}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if kind == "stream":
                    info: Any = await jsm.stream_info(name)
                else:
                    info = await jsm.consumer_info(*name.split("/"))
            except nats.errors.Error:  # no leader to answer yet
                continue
            leader = info.cluster.leader
            if leader in wanted and (kind == "stream" or info.num_waiting):
                return str(leader)
            if leader in wanted:
                await asyncio.sleep(0.05)
                continue
            if leader is not None:
                await nc.request(subject, b"", 5)
            await asyncio.sleep(0.2)
        raise AssertionError(f"no leader of {kind} {name} among {wanted} within 60 s")
    finally:
        await nc.close()


def test_a_targeted_member_pulls_from_its_consumers_new_leader():
    # A member's pull request waits at its consumer's leader, on another node than the
    # member's, and that node is killed. Once the consumer has a new leader, the member's
    # own node ends the request (409 Leadership Change, nats-server 2.9) and the member
    # pulls from the new leader: the next targeted message reaches it. (A request that
    # nobody ended would be given up half an expiry after it should have ended.)
    with NatsCluster(3, jetstream=True) as cluster:
        own, *others = cluster.nodes
        urls = cluster.url.split(",")
        options = {"jetstream": True, "stream_replicas": 3, "publish_timeout": 5.0}
        settings = {
            "PUBSUB_BACKEND": "nats",
            "PUBSUB_URL": own.address,
            "PUBSUB_CHANNEL_PREFIX": "lead",
            "PUBSUB_OPTIONS": {**FAST, **options},
        }
        with override_settings(**settings):
            backend = get_backend()
            # A stream just made elects its first leader before it stores anything.
            wait_until(lambda: stored(backend, CHANNEL, "up"), 30, "the stream to store")
            # The member's node leads the stream its probes go through, so losing the
            # other node costs the probes nothing: the loss is the consumer's alone.
            asyncio.run(lead_from(urls, "stream", backend.stream_name, {own.server_name}))
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe(CHANNEL, inbox, group="runners")
                wait_until(
                    lambda: stored(backend, CHANNEL, "before", group="runners"),
                    30,
                    "the work stream to store",
                )
                inbox.wait_payload("before")
                consumer = backend.work_consumer(backend.wire_name(CHANNEL), "runners")
                target = f"{backend.work_stream_name}/{consumer}"
                names = {node.server_name for node in others}
                leader = asyncio.run(lead_from(urls, "consumer", target, names))
                next(node for node in others if node.server_name == leader).stop("kill")
                wait_until(
                    lambda: stored(backend, CHANNEL, "after", group="runners"),
                    60,
                    "the work stream to store after the loss",
                )
                inbox.wait(lambda messages: "after" in {m.payload for m in messages}, 60)
