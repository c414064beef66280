"""The relay: what the contract tests cannot show.

PostgreSQL restarting under a relay, failover between relays, the token, the
client cap, a too-slow client, a relay whose LISTEN goes through a
transaction pooler, and 40 subscriber processes behind PgBouncer. Real
relays and real servers throughout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import connections, transaction
from django.test import override_settings

from pulp_pubsub import get_backend, publish
from pulp_pubsub.backends.aftercommit import Deferred
from pulp_pubsub.backends.relay.backend import RelayBackend
from pulp_pubsub.backends.relay.protocol import RelayConnection
from pulp_pubsub.exceptions import ConnectionLost
from pulp_pubsub_tools.testing import PgBouncerServer, PostgresServer, RedisServer, RelayServer

from .harness_relay import RelayHarness, relays_over
from .reliability_util import Inbox
from .util import wait_until

pytestmark = [pytest.mark.backend, pytest.mark.servers]

FAST = {"probe_interval": 0.5, "probe_timeout": 1.0, "reconnect_max": 0.3}
TOKEN = "relay-test-token-4f9c2a"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: Any) -> Iterator[RelayHarness]:
    """PostgreSQL and two relays of this module's own, free to restart and kill."""
    with PostgresServer() as server, relays_over(server.url, TOKEN) as relays:
        yield RelayHarness(server, relays, TOKEN)


def health(relay: RelayServer, token: str | None = TOKEN) -> dict[str, Any]:
    [answer] = RelayBackend(relay.url, {"publish": "direct", "token": token}).relay_health(5)
    assert "error" not in answer, answer
    return answer


def test_a_postgres_restart_under_the_relay_resyncs_its_clients_without_a_reconnect(rig):
    with rig.configured(**FAST) as backend, backend.subscriber() as sub:
        inbox = Inbox(sub)
        sub.subscribe("relay.pgrestart", inbox)
        publish("relay.pgrestart", "before")
        inbox.wait_payload("before")
        rig.postgres.restart("immediate")
        inbox.wait(lambda messages: any(m.resync for m in messages), timeout=30)
        wait_until(lambda: health(rig.relays[0])["postgres"] == "listening", 30, "relay back")
        wait_until(lambda: health(rig.relays[1])["postgres"] == "listening", 30, "relay back")
        publish("relay.pgrestart", "after")
        inbox.wait_payload("after")
        assert sub.stats["reconnects"] == 0  # the relay held on; PostgreSQL came back under it


def test_a_killed_relay_sends_its_subscribers_to_the_other_one_with_a_resync(rig):
    settings = rig.settings(**FAST)
    settings["PUBSUB_OPTIONS"]["publish"] = "direct"
    del settings["PUBSUB_OPTIONS"]["notify_url"]
    with override_settings(**settings):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("relay.failover", inbox)
            publish("relay.failover", "before")
            inbox.wait_payload("before")
            [attached] = [r for r in rig.relays if health(r)["clients"] > 2]
            other = next(r for r in rig.relays if r is not attached)
            attached.stop("kill")
            try:
                inbox.wait(lambda messages: any(m.resync for m in messages), timeout=30)
                wait_until(lambda: sub.connected, 30, "failover")
                # The dead relay is skipped; the publish reaches the live one.
                publish("relay.failover", "after")
                inbox.wait_payload("after")
                assert health(other)["clients"] >= 2
                assert sub.stats["reconnects"] == 1
            finally:
                attached.start()
        backend.close()


def test_the_token_comes_from_settings_and_a_wrong_one_is_refused_without_being_shown(rig):
    settings = rig.settings(**FAST)
    options = {k: v for k, v in settings["PUBSUB_OPTIONS"].items() if k != "token"}
    with override_settings(**{**settings, "PUBSUB_OPTIONS": options, "PUBSUB_RELAY_TOKEN": TOKEN}):
        backend = get_backend()
        assert backend.describe()["token"] == "set"
        assert TOKEN not in repr(backend) + json.dumps(backend.describe())
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("relay.token", inbox)
            publish("relay.token", "ok")
            inbox.wait_payload("ok")
    wrong = "wrong-secret-value-0001"
    with override_settings(**{**settings, "PUBSUB_OPTIONS": options, "PUBSUB_RELAY_TOKEN": wrong}):
        backend = get_backend()
        with backend.subscriber() as sub:
            sub.subscribe("relay.token", lambda m: None)
            wait_until(lambda: sub.last_error is not None, 10, "the refusal")
            assert "HTTP 401" in sub.last_error and "PUBSUB_RELAY_TOKEN" in sub.last_error
            assert wrong not in sub.last_error and TOKEN not in sub.last_error
        backend.close()
    for relay in rig.relays:
        assert TOKEN not in relay.log_tail(200) and wrong not in relay.log_tail(200)


def test_a_full_relay_refuses_with_503_and_a_slow_client_is_disconnected():
    with RelayServer(None, TOKEN, extra_args=["--max-clients", "2", "--send-queue", "50"]) as relay:
        slow = RelayConnection(relay.url, TOKEN, 5)
        publisher = RelayConnection(relay.url, TOKEN, 5)
        try:
            with pytest.raises(ConnectionLost, match="HTTP 503"):
                RelayConnection(relay.url, TOKEN, 5)
            deadline = time.monotonic() + 5
            slow.send(deadline, type="subscribe", id=1, channels=["relay.slow"])
            while not any(f["type"] == "subscribed" for f in slow.read()):
                assert slow.wait(deadline)
            # The slow client never reads again: its socket buffers fill, then its queue.
            payload = "x" * 7000
            too_slow = 0
            for i in range(1, 20000):
                deadline = time.monotonic() + 5
                publisher.send(
                    deadline, type="publish", id=i, channel="relay.slow", payload=payload
                )
                if i % 20 == 0:
                    publisher.send(deadline, type="ping", id=-i)
                    pong = None
                    while pong is None:
                        pong = next((f for f in publisher.read() if f.get("id") == -i), None)
                        assert pong is not None or publisher.wait(deadline)
                    too_slow = pong["too_slow"]
                    if too_slow:
                        break
            assert too_slow == 1, "the relay kept a client that read nothing"
            with pytest.raises(ConnectionLost, match="close code 1013"):
                deadline = time.monotonic() + 10
                while slow.wait(deadline):
                    slow.read()
        finally:
            slow.close()
            publisher.close()
        assert "fell 50 messages behind" in relay.log_tail()


def _answers(conn: RelayConnection, ids: set[int]) -> dict[int, dict[str, Any]]:
    deadline = time.monotonic() + 10
    got: dict[int, dict[str, Any]] = {}
    while not ids <= set(got):
        got.update({f["id"]: f for f in conn.read() if f.get("id") in ids})
        assert ids <= set(got) or conn.wait(deadline), f"no answer to {ids - set(got)}"
    return got


def test_publish_many_delivers_in_order_and_a_refused_frame_delivers_nothing():
    with RelayServer(None, TOKEN) as relay:
        sub = RelayConnection(relay.url, TOKEN, 5)
        publisher = RelayConnection(relay.url, TOKEN, 5)
        try:
            sub.send(time.monotonic() + 5, type="subscribe", id=1, channels=["relay.many"])
            _answers(sub, {1})
            deadline = time.monotonic() + 5
            messages = [["relay.many", str(n)] for n in range(100)]
            publisher.send(deadline, type="publish_many", id=2, messages=messages)
            # A bad channel among good ones: refused whole, nothing of it delivered.
            bad = [["relay.many", "not sent"], ["has space", "x"]]
            publisher.send(deadline, type="publish_many", id=3, messages=bad)
            # A channel that is not even a string (nor hashable) is refused the same way.
            odd = [["relay.many", "not sent either"], [["relay.many"], "x"]]
            publisher.send(deadline, type="publish_many", id=5, messages=odd)
            publisher.send(deadline, type="publish", id=4, channel="relay.many", payload="end")
            answers = _answers(publisher, {2, 3, 4, 5})
            assert answers[2]["type"] == "published" and answers[2]["count"] == 100
            assert answers[3]["type"] == "error" and "has space" in answers[3]["error"]
            assert answers[5]["type"] == "error" and "must be a str" in answers[5]["error"]
            heard: list[str] = []
            while "end" not in heard:
                heard += [f["payload"] for f in sub.read() if f["type"] == "message"]
                assert "end" in heard or sub.wait(deadline)
            assert heard == [str(n) for n in range(100)] + ["end"]
        finally:
            sub.close()
            publisher.close()


def _heard_until(conn: RelayConnection, request_id: int) -> list[tuple[str, Any]]:
    """Every frame up to the answer to ``request_id``: (type, id or payload), in order."""
    deadline = time.monotonic() + 10
    frames: list[dict[str, Any]] = []
    while not any(f.get("id") == request_id for f in frames):
        frames += conn.read()
        assert any(f.get("id") == request_id for f in frames) or conn.wait(deadline)
    return [(f["type"], f.get("id") or f.get("payload")) for f in frames]


def test_frames_answered_at_once_never_overtake_one_the_handler_still_holds(rig):
    """Publishes are answered inside the read callback, except behind a frame that waits.

    ``subscribe`` waits for PostgreSQL's LISTEN, and a message sent in fragments is put
    together by the handler: a publish written right behind either is answered after it,
    and the client's own messages come before the answer to the publish that sent them.
    """
    relay = rig.relays[0]
    conn = RelayConnection(relay.url, TOKEN, 5)
    try:
        deadline = time.monotonic() + 5
        conn.send_many(
            deadline,
            [
                {"type": "subscribe", "id": 1, "channels": ["relay.order"]},
                {"type": "publish", "id": 2, "channel": "relay.order", "payload": "a"},
                {"type": "publish_many", "id": 3, "messages": [["relay.order", "b"]]},
            ],
        )
        got = _heard_until(conn, 3)
        assert got == [
            ("subscribed", 1),
            ("message", "a"),
            ("published", 2),
            ("message", "b"),
            ("published", 3),
        ]
        # One publish in two fragments, then a whole one, in one write.
        protocol = conn._protocol
        protocol.send_text(b'{"type":"publish","id":4,', fin=False)
        protocol.send_continuation(b'"channel":"relay.order","payload":"c"}', fin=True)
        protocol.send_text(b'{"type":"ping","id":5}')
        conn._flush(deadline)
        got = _heard_until(conn, 5)
        assert got == [("message", "c"), ("published", 4), ("pong", 5)]
        # Nothing ahead of it: answered at once, still behind the message it sent itself.
        conn.send(time.monotonic() + 5, type="publish", id=6, channel="relay.order", payload="d")
        got = _heard_until(conn, 6)
        assert got == [("message", "d"), ("published", 6)]
    finally:
        conn.close()


@pytest.mark.django_db(transaction=True)
def test_a_batch_after_commit_with_a_refused_message_sends_the_others_one_by_one(caplog):
    """A publish_many refused for one message: the rest go as single frames, in order."""
    with (
        RelayServer(None, TOKEN) as relay,
        override_settings(
            PUBSUB_BACKEND="relay",
            PUBSUB_URL=relay.url,
            PUBSUB_OPTIONS={"publish": "direct", "token": TOKEN},
            PUBSUB_CHANNEL_PREFIX="",
        ),
    ):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("relay.batch", inbox)
            # publish() checks names first, so only send_batch() can carry one the relay
            # refuses: it stands in for any message a relay refuses.
            batch = [Deferred("relay.batch", str(n), None, 1) for n in range(5)]
            batch.insert(2, Deferred("no such;channel", "refused", None, 1))
            with caplog.at_level(logging.ERROR, logger="pulp_pubsub"):
                backend.send_batch(batch)
            inbox.wait(lambda messages: len(inbox.payloads()) == 5)
            assert inbox.payloads() == [str(n) for n in range(5)]
        assert backend.stats["published"] == 5
        assert backend.stats["deferred_failures"] == 1
        assert "after commit failed" in caplog.text


def test_a_publisher_connection_caught_closing_is_replaced_not_kept():
    """A cached connection whose close handshake has begun (the relay went away while it
    sat idle) refused every later send; each publish failed on it, and it was never dropped."""
    with RelayServer(None, TOKEN) as relay:
        backend = RelayBackend(url=relay.url, options={"publish": "direct", "token": TOKEN})
        try:
            backend.publish("relay.closing", "first")
            [conn] = backend._direct().conns.values()
            conn._protocol.send_close()  # the state a close frame from the relay leaves it in
            with pytest.raises(ConnectionLost, match="is closing"):
                conn.send(time.monotonic() + 1, type="ping", id=1)
            backend.publish("relay.closing", "second")  # on a fresh connection
            assert backend._direct().conns[relay.url] is not conn
            assert backend.stats["published"] == 2
        finally:
            backend.close()


def test_a_relay_behind_a_transaction_pooler_says_it_is_deaf():
    with (
        PostgresServer() as server,
        # DISCARD ALL after every transaction, as many poolers are set up: it also
        # ends the LISTEN, deterministically.
        PgBouncerServer(server, extra_conf={"server_reset_query_always": 1}) as bouncer,
        RelayServer(bouncer.url, TOKEN, probe_timeout=1.0, require_listening=False) as relay,
    ):
        wait_until(lambda: health(relay)["postgres_error"], 15, "the cause")
        state = health(relay)
        assert state["postgres"] != "listening"
        assert "transaction pooler" in state["postgres_error"]
        assert "transaction pooler" in relay.log_tail()


def test_configuration_errors_are_clear():
    cases = [
        ({"PUBSUB_URL": None}, "needs PUBSUB_URL"),
        ({"PUBSUB_URL": "http://a:1"}, "not a ws:// or wss:// URL"),
        ({"PUBSUB_URL": "ws://a:1,nonsense"}, "'nonsense' is not a ws://"),
        ({"PUBSUB_OPTIONS": {"publish": "smoke"}}, "must be one of pg_notify, direct"),
        ({"PUBSUB_OPTIONS": {"colour": 1}}, "Invalid option 'colour' for RelayBackend"),
        ({"PUBSUB_OPTIONS": {"publish": "direct", "notify_url": "postgresql://x"}}, "needs"),
    ]
    for extra, message in cases:
        settings = {"PUBSUB_BACKEND": "relay", "PUBSUB_URL": "ws://127.0.0.1:9", **extra}
        settings.setdefault("PUBSUB_OPTIONS", {"publish": "direct"})
        with override_settings(**settings), pytest.raises(ImproperlyConfigured, match=message):
            get_backend()
    for args, message in [
        (["--bind", "nowhere"], "HOST:PORT"),
        (["--keyfile", "/nonexistent"], "--keyfile needs --certfile"),
        (["--certfile", "/nonexistent"], "Cannot load the TLS certificate"),
        (["--database", "default"], "sqlite"),
    ]:
        with pytest.raises(CommandError, match=message):
            call_command("pubsub_relay", *args)


def test_pg_notify_on_djangos_connection_is_sent_by_postgresql_at_commit(rig, django_db_blocker):
    """NOTIFY in the caller's transaction, on a Django alias of its own for the rig's server."""
    alias = "relay_native"
    connections.settings[alias] = {
        **connections.settings["postgres"],
        **rig.postgres.django_database(),
    }
    try:
        options = {"publish": "pg_notify", "database": alias, "token": TOKEN, **FAST}
        with (
            django_db_blocker.unblock(),
            override_settings(PUBSUB_BACKEND="relay", PUBSUB_URL=rig.url, PUBSUB_OPTIONS=options),
        ):
            backend = get_backend()
            assert backend.defers_natively
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("relay.native", inbox)
                with transaction.atomic(using=alias):
                    publish("relay.native", "at commit")
                    sub.dispatch(timeout=0.3)
                    # Nothing before the commit (a resync from the rig's earlier faults may be).
                    assert [m.payload for m in inbox.messages if not m.resync] == []
                inbox.wait_payload("at commit")
            backend.close()
    finally:
        if hasattr(connections._connections, alias):
            connections[alias].close()
            delattr(connections._connections, alias)
        del connections.settings[alias]


@pytest.mark.long
@pytest.mark.parametrize("mode", ["pg_notify", "direct", "redis"])
def test_forty_subscribers_behind_pgbouncer_hear_every_wakeup(mode):
    """Workers whose database goes through PgBouncer (transaction pooling, a pool of 4).

    Stock Pulp's LISTEN goes nowhere there; through the relay (either publish
    mode) or Redis every wake-up arrives, and PostgreSQL holds no more than
    the pool and the relay's one session.
    """
    subscribers, wakeups, pool = 40, 20, 4
    with (
        PostgresServer() as server,
        PgBouncerServer(server, default_pool_size=pool, max_client_conn=200) as bouncer,
        RelayServer(server.url, TOKEN) if mode != "redis" else RedisServer() as relay,
    ):
        peak = [0]
        stop = threading.Event()

        def sample() -> None:
            with psycopg.connect(server.url, autocommit=True) as conn:
                while not stop.is_set():
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type ="
                        " 'client backend' AND pid <> pg_backend_pid()"
                    ).fetchone()
                    peak[0] = max(peak[0], int(row[0]) if row else 0)
                    stop.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        env = {
            **os.environ,
            "DATABASE_URL": bouncer.url,
            "PUBSUB_BACKEND": "redis" if mode == "redis" else "relay",
            "PUBSUB_URL": relay.url,
            "PUBSUB_OPTIONS": json.dumps(
                {} if mode == "redis" else {"publish": mode, "token": TOKEN}
            ),
        }
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pulp_pubsub_tools.testing.fleet",
                    str(subscribers),
                    str(wakeups),
                    "150",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        finally:
            stop.set()
            sampler.join(5)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["ready"] == subscribers, summary
        assert summary["heard_all"] == subscribers, summary
        assert summary["failed"] == 0, summary
        relays = 0 if mode == "redis" else 1
        assert 0 < peak[0] <= pool + relays, f"PostgreSQL saw {peak[0]} sessions"


def test_ping_reports_every_relays_health_and_fails_when_one_is_down(rig):
    from io import StringIO

    settings = rig.settings()
    with override_settings(**settings):
        out = StringIO()
        call_command("pubsub_ping", stdout=out)
        for relay in rig.relays:
            assert f"relay {relay.url}: PostgreSQL listening" in out.getvalue()
    settings["PUBSUB_URL"] = rig.relays[0].url + ",ws://127.0.0.1:9"
    with override_settings(**settings), pytest.raises(CommandError, match=r"ws://127\.0\.0\.1:9"):
        call_command("pubsub_ping", stdout=StringIO())


def test_wss_with_a_private_ca_delivers_and_an_unknown_ca_is_refused():
    with RelayServer(None, TOKEN, tls=True) as relay:
        assert relay.url.startswith("wss://")
        options = {"publish": "direct", "token": TOKEN, "ssl_ca_certs": relay.ca_file, **FAST}
        with override_settings(
            PUBSUB_BACKEND="relay", PUBSUB_URL=relay.url, PUBSUB_OPTIONS=options
        ):
            backend = get_backend()
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("relay.tls", inbox)
                for i in range(50):  # several TLS records per read, none left behind
                    publish("relay.tls", f"secure {i}")
                inbox.wait(lambda messages: len(messages) >= 50)
                assert [m.payload for m in inbox.messages] == [f"secure {i}" for i in range(50)]
            backend.close()
        del options["ssl_ca_certs"]
        with override_settings(
            PUBSUB_BACKEND="relay", PUBSUB_URL=relay.url, PUBSUB_OPTIONS=options
        ):
            backend = get_backend()
            with backend.subscriber() as sub:
                sub.subscribe("relay.tls", lambda m: None)
                wait_until(lambda: sub.last_error is not None, 10, "the refusal")
                assert "CERTIFICATE_VERIFY_FAILED" in sub.last_error
            backend.close()


@pytest.mark.parametrize("state", ["working", "wrong token", "down"])
def test_no_command_output_or_log_line_shows_the_token_or_the_database_password(
    state, caplog, capfd
):
    from .test_security import COMMANDS, PASSWORD, run_command, spellings

    token = "Tk9/Rv2@Lm5:Qw8Zx"
    with (
        PostgresServer(password=PASSWORD) as server,
        RelayServer(server.url, token, probe_interval=1.0, probe_timeout=1.0) as relay,
    ):
        url = relay.url if state != "down" else "ws://127.0.0.1:9"
        options = {
            "publish": "pg_notify",
            "notify_url": server.url,
            "token": token if state != "wrong token" else "Wr0ngT0ken/Zz8@Yy7",
            **FAST,
        }
        texts: list[str] = []
        with (
            override_settings(PUBSUB_BACKEND="relay", PUBSUB_URL=url, PUBSUB_OPTIONS=options),
            caplog.at_level(logging.DEBUG),
        ):
            for args in COMMANDS:
                texts += run_command(args)
            backend = get_backend()
            with backend.subscriber() as sub:
                sub.subscribe("demo_events", lambda message: None)
                sub.wait_connected(2)
                texts += [repr(sub.last_error), repr(sub), repr(backend)]
            texts.append(repr(backend.describe()))
            backend.close()
        texts.append(relay.log_tail(500))
    captured = capfd.readouterr()
    texts += [caplog.text, captured.out, captured.err]
    if state == "working":
        assert "round trip" in "".join(texts), "the commands did not reach the relay"
    else:
        assert any("Error" in text for text in texts), "the commands did not fail"
    secrets = spellings(token) + spellings(PASSWORD) + spellings("Wr0ngT0ken/Zz8@Yy7")
    leaks = [
        line for text in texts for line in text.splitlines() if any(s in line for s in secrets)
    ]
    assert leaks == []


def test_relay_objects_never_show_the_token_or_the_database_password():
    from .test_reprs import PASSWORD, SECRETS, everything, leaks

    token = "Tk4/Hv8@Qp2:Nm6Ww"
    with (
        PostgresServer(password=PASSWORD) as server,
        RelayServer(server.url, token, probe_interval=1.0, probe_timeout=1.0) as relay,
    ):
        options = {"publish": "pg_notify", "notify_url": server.url, "token": token, **FAST}
        with override_settings(
            PUBSUB_BACKEND="relay", PUBSUB_URL=relay.url, PUBSUB_OPTIONS=options
        ):
            backend = get_backend()
            with everything(backend, connect=True) as objects:
                assert leaks(objects, [*SECRETS, *spellings_of(token)]) == []
            backend.close()


def spellings_of(secret: str) -> list[str]:
    from .test_security import spellings

    return spellings(secret)


class _NoWalk(dict):
    """A channel map that refuses to be walked: what the relay LISTENs to must be kept."""

    def items(self):
        raise AssertionError("went through every channel to find what PostgreSQL LISTENs to")


def test_what_postgresql_listens_to_is_kept_as_clients_come_and_go_not_recomputed():
    """Each of a fleet's subscribers has a private probe channel on the relay: a subscribe
    that went through every channel to find what PostgreSQL must LISTEN to cost O(N),
    and growing a fleet O(N^2)."""
    from pulp_pubsub.relay.server import Client, Relay

    relay = Relay(host="127.0.0.1", port=0, token=None)
    fleet = [Client(None, 10) for _ in range(2000)]  # type: ignore[arg-type]

    async def subscribe(client, channels, local=False):
        frame = {"type": "subscribe", "channels": channels, "local": local}
        return await relay._on_frame(client, frame)

    async def grow():
        for n, client in enumerate(fleet):
            relay.clients.add(client)
            await subscribe(client, [f"pubsub_probe_{n}"], local=True)
            await subscribe(client, ["wake", "cancel"] if n % 2 else ["wake"])

    asyncio.run(grow())
    assert relay._wanted() == {"wake", "cancel"}
    relay.by_channel = _NoWalk(relay.by_channel)
    assert relay._wanted() == {"wake", "cancel"}
    for client in fleet[1::2]:  # every subscriber of "cancel" goes
        relay._forget(client)
    assert relay._wanted() == {"wake"}
    assert relay._leave(fleet[0], {"wake"}) is False  # others still LISTEN to it
    for client in fleet[0::2]:
        relay._forget(client)
    assert relay._wanted() == set()
    assert len(relay.by_channel) == 0
