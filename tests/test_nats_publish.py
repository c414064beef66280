"""A JetStream publish through a silence (a leader election): sent again, and stored once.

On a real single-node server frozen with SIGSTOP while a publish waits: its tries pile up,
and when the server wakes it stores the first and acknowledges the rest as duplicates of
the same ``Nats-Msg-Id``. The 3-node election itself is in test_nats_cluster.py (long tier).

Meanwhile the publisher sends its message, with that ``Nats-Msg-Id``, as a plain NATS notice
to the channel's live subject. The subscriber's side is taken here path by path, with notices
and stored copies made by hand: the stored copy arriving live, and arriving through the
replay after a reconnect. The publisher's side, on a 3-node cluster whose stream lost its
quorum, is in test_nats_cluster.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import nats
import nats.errors
import nats.js.api
import pytest
from django.test import override_settings

from pulp_pubsub import get_backend
from pulp_pubsub.backends.nats.jsapi import patiently
from pulp_pubsub.backends.nats.names import MSG_ID, UNSTORED_HEADER
from pulp_pubsub.exceptions import ConnectionLost, PublishError
from pulp_pubsub_tools.testing import NatsServer, TcpProxy

from .reliability_util import FAST, Inbox
from .util import wait_until

pytestmark = [pytest.mark.backend, pytest.mark.servers]


@pytest.fixture(scope="module")
def js_server():
    with NatsServer(jetstream=True) as running:
        yield running


def js_settings(url: str, prefix: str, **options: Any) -> dict[str, Any]:
    return {
        "PUBSUB_BACKEND": "nats",
        "PUBSUB_URL": url,
        "PUBSUB_OPTIONS": {**FAST, "jetstream": True, "stream_max_age": 600.0, **options},
        "PUBSUB_CHANNEL_PREFIX": prefix,
    }


def stream_state(url: str, stream: str) -> Any:
    async def ask() -> Any:
        nc = await nats.connect(url)
        try:
            return (await nc.jsm().stream_info(stream)).state
        finally:
            await nc.close()

    return asyncio.run(ask())


class Publishing:
    """One publish on a thread of its own; what it raised, once it is over."""

    def __init__(self, backend: Any, channel: str, payload: str) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(backend, channel, payload))
        self.thread.start()

    def _run(self, backend: Any, channel: str, payload: str) -> None:
        try:
            backend.publish(channel, payload)
        except BaseException as exc:
            self.error = exc

    def join(self) -> BaseException | None:
        self.thread.join(30)
        assert not self.thread.is_alive(), "the publish never returned"
        return self.error


def tries_of(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith("JetStream publish to "))


def test_a_publish_sent_again_while_the_server_was_silent_is_stored_once(js_server, caplog):
    caplog.set_level(logging.DEBUG, logger="pulp_pubsub.backends.nats")
    with override_settings(**js_settings(js_server.url, "retried", publish_timeout=10.0)):
        backend = get_backend()
        backend.publish("ch", "first")  # makes the stream
        before = stream_state(js_server.url, backend.stream_name).messages
        caplog.clear()
        js_server.freeze()
        try:
            publishing = Publishing(backend, "ch", "once")
            # Three tries sent: the first two are surely in the server's socket.
            wait_until(lambda: tries_of(caplog) >= 3, 10, "the publish to be sent again")
        finally:
            js_server.thaw()
        assert publishing.join() is None
        state = stream_state(js_server.url, backend.stream_name)
        assert state.messages == before + 1
    said = [r.getMessage() for r in caplog.records]
    ids = {re.search(r"Nats-Msg-Id (\w+)", line)[1] for line in said if "try " in line}
    assert len(ids) == 1, said  # every try is the same message
    assert any("did not answer the publish of a message to 'retried.ch'" in s for s in said)
    assert any(
        re.search(r"answered the publish .* after [0-9.]+ s and [0-9]+ tries", s) for s in said
    )


def test_a_publish_whose_connection_dies_under_it_is_sent_again_on_a_new_one(js_server, caplog):
    caplog.set_level(logging.DEBUG, logger="pulp_pubsub.backends.nats")
    with TcpProxy(js_server.host, js_server.port) as proxy:
        url = proxy.url_for(js_server.url)
        with override_settings(**js_settings(url, "moved", publish_timeout=10.0)):
            backend = get_backend()
            backend.publish("ch", "first")
            caplog.clear()
            proxy.stall()  # the server's side of the link goes silent, then is reset
            try:
                publishing = Publishing(backend, "ch", "once")
                wait_until(lambda: tries_of(caplog) >= 2, 10, "the publish to be sent again")
                proxy.cut()
            finally:
                proxy.resume()
            assert publishing.join() is None
            assert stream_state(js_server.url, backend.stream_name).messages == 2
    said = [r.getMessage() for r in caplog.records]
    assert any("connection was lost under a publish to 'moved.ch'" in line for line in said)
    ids = {re.search(r"Nats-Msg-Id (\w+)", line)[1] for line in said if "try " in line}
    assert len(ids) == 1, said  # the same message on the new connection


def test_a_publish_into_a_stream_deleted_since_makes_it_again(js_server):
    with override_settings(**js_settings(js_server.url, "remade")):
        backend = get_backend()
        backend.publish("ch", "first")

        async def delete() -> None:
            nc = await nats.connect(js_server.url)
            await nc.jsm().delete_stream(backend.stream_name)
            await nc.close()

        asyncio.run(delete())
        backend.publish("ch", "after")  # no responders: the stream is made again
        assert stream_state(js_server.url, backend.stream_name).messages == 1


def test_a_stream_with_a_short_duplicate_window_gets_one_try_and_a_warning(js_server, caplog):
    caplog.set_level(logging.DEBUG, logger="pulp_pubsub.backends.nats")

    async def make() -> None:
        nc = await nats.connect(js_server.url)
        config = nats.js.api.StreamConfig(
            name="SHORTDEDUP", subjects=["short.*"], duplicate_window=0.5
        )
        await nc.jsm().add_stream(config)
        await nc.close()

    asyncio.run(make())
    options = {"stream": "SHORTDEDUP", "publish_timeout": 1.5}
    with override_settings(**js_settings(js_server.url, "short", **options)):
        backend = get_backend()
        backend.publish("ch", "first")
        assert any(
            "deduplicates within 0.5 s, less than publish_timeout" in r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING
        )
        caplog.clear()
        js_server.freeze()
        try:
            with pytest.raises(PublishError):
                backend.publish("ch", "never answered")
        finally:
            js_server.thaw()
    assert tries_of(caplog) == 1


def test_patience_asks_once_per_interval_when_refused_at_once_while_a_try_waits():
    # A stream without a leader refuses a publish at once (no responders) while the try sent
    # before the election still waits: asking again must not turn into a busy loop.
    asked = 0

    async def ask(timeout: float) -> str:
        nonlocal asked
        asked += 1
        if asked == 1:
            await asyncio.sleep(timeout)
            raise TimeoutError
        raise nats.errors.NoRespondersError

    async def run() -> None:
        await patiently(ask, "a test", time.monotonic() + 1.0, 5.0, interval=0.2)

    with pytest.raises(ConnectionLost, match="did not answer a test"):
        asyncio.run(run())
    assert 2 <= asked <= 7


def notice(url: str, subject: str, payload: str, msg_id: str | None) -> None:
    """What a publisher waiting for the stream sends (without ``msg_id``: an old one's)."""
    headers = {UNSTORED_HEADER: "1"}
    if msg_id is not None:
        headers[MSG_ID] = msg_id

    async def send() -> None:
        nc = await nats.connect(url)
        try:
            await nc.publish(subject, payload.encode(), headers=headers)
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(send())


def store(url: str, subject: str, payload: str, msg_id: str) -> None:
    """The stream's copy of a told message, as the publisher's later try stores it."""

    async def send() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(subject, payload.encode(), headers={MSG_ID: msg_id})
        finally:
            await nc.close()

    asyncio.run(send())


@contextmanager
def listening(url: str, prefix: str) -> Iterator[tuple[Any, Any, Inbox]]:
    """(backend, subscriber, inbox) on channel "ch": subscribe() returns once it listens."""
    with override_settings(**js_settings(url, prefix)), get_backend().subscriber() as sub:
        inbox = Inbox(sub)
        sub.subscribe("ch", inbox)
        yield get_backend(), sub, inbox


def test_a_told_message_is_delivered_before_it_is_stored_and_once_after(js_server):
    with listening(js_server.url, "told") as (backend, sub, inbox):
        live = backend.live_subject("told.ch")
        # A publisher tells once a second while it waits: one delivery however many.
        for _ in range(3):
            notice(js_server.url, live, "waiting", "id-waiting")
        inbox.wait_payload("waiting")
        store(js_server.url, "told.ch", "waiting", "id-waiting")
        backend.publish("ch", "after")
        inbox.wait_payload("after")
        assert [m.payload for m in inbox.messages] == ["waiting", "after"]
        assert not any(m.resync for m in inbox.messages)
        # The stored copy moved the position on: "after" followed it without a gap.
        assert sub.stats["resyncs"] == 0
        assert backend.stats["unstored_deliveries"] == 1
        assert backend.stats["unstored_resyncs"] == 0


def test_a_told_message_replayed_after_a_reconnect_is_not_delivered_again(js_server):
    with TcpProxy(js_server.host, js_server.port) as proxy:
        url = proxy.url_for(js_server.url)
        with listening(url, "toldreplay") as (backend, sub, inbox):
            notice(js_server.url, backend.live_subject("toldreplay.ch"), "waiting", "id-r")
            inbox.wait_payload("waiting")
            # The stored copy never reaches this connection live: it is replayed, with its
            # Nats-Msg-Id, on the next one.
            proxy.stall()
            store(js_server.url, "toldreplay.ch", "waiting", "id-r")
            proxy.cut()
            proxy.resume()
            wait_until(lambda: sub.stats["replays"] >= 1, 15, "the subscriber to replay")
            backend.publish("ch", "after")
            inbox.wait_payload("after")
            assert [m.payload for m in inbox.messages] == ["waiting", "after"]
            assert not any(m.resync for m in inbox.messages)
            assert sub.stats["reconnects"] >= 1


def test_a_notice_without_the_message_still_resyncs_the_channel(js_server):
    # What a targeted publish, or a publisher of an earlier release, sends.
    with listening(js_server.url, "toldold") as (backend, _, inbox):
        notice(js_server.url, backend.live_subject("toldold.ch"), "", None)
        inbox.wait(lambda messages: any(m.resync for m in messages))
        assert [m.resync for m in inbox.messages] == [True]
        assert backend.stats["unstored_resyncs"] == 1
        assert backend.stats["unstored_deliveries"] == 0
