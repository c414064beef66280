"""What only the nats backend has: subject mapping, NATS credentials, JetStream replay.

The contract tests (harness_nats, harness_natsjs) cover everything every backend shares; the
cluster failover tests are in test_nats_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any

import nats
import nats.js.api
import nkeys
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.test import override_settings

from pulp_pubsub import get_backend
from pulp_pubsub.backends.nats.loop import loop_runner
from pulp_pubsub.exceptions import ConnectionLost, PublishError
from pulp_pubsub_tools.testing import NatsServer

from .harness_nats import NatsHarness, publish_plain
from .reliability_util import FAST, PATIENCE, Inbox, dead_url
from .util import wait_until

pytestmark = [pytest.mark.backend, pytest.mark.servers]

SECRET = "Qx7rVb/Zt9Hd@Wm4Jc:Kp2Lf"
PIECES = ["Qx7rVb", "Zt9Hd", "Wm4Jc", "Kp2Lf"]
#: Names that would be a wildcard, an empty token or an extra token if used verbatim.
AWKWARD = ["a..b", ".lead", "trail.", "%2E", "$SYS", "pulp.worker", "ü.ß", "%", "a$b"]


@pytest.fixture(scope="module")
def server():
    with NatsServer() as running:
        yield running


@pytest.fixture(scope="module")
def js_server():
    with NatsServer(jetstream=True) as running:
        yield running


def nats_settings(url: str, prefix: str = "", **options: Any) -> dict[str, Any]:
    return {
        "PUBSUB_BACKEND": "nats",
        "PUBSUB_URL": url,
        "PUBSUB_OPTIONS": {**FAST, **options},
        "PUBSUB_CHANNEL_PREFIX": prefix,
    }


# -- subjects ------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "pulp", "a.b"])
def test_every_name_is_one_subject_token_under_the_prefix_and_maps_back(prefix):
    with override_settings(**nats_settings("nats://127.0.0.1:1", prefix)):
        backend = get_backend()
        root = backend.wire_name("x")[:-1]
        for name in AWKWARD:
            wire = backend.wire_name(name)
            assert wire.startswith(root)
            assert wire.count(".") == root.count(".")  # no token added or emptied
            assert not wire[len(root) :].startswith("$")
            assert backend.channel_name(wire) == name
        assert len({backend.wire_name(name) for name in AWKWARD}) == len(AWKWARD)
        assert backend.channel_name(root + "a.b") is None  # not a subject this layer makes


def test_a_plain_nats_client_interoperates_byte_for_byte(server):
    payload = "wake ü \x00 \r\n end"

    async def plain_subscriber(subject: str, ready: asyncio.Event, got: list[bytes]) -> None:
        nc = await nats.connect(server.url)
        sub = await nc.subscribe(subject)
        await nc.flush()
        ready.set()
        msg = await sub.next_msg(timeout=10)
        got.append(msg.data)
        await nc.close()

    with override_settings(**nats_settings(server.url, "pulp")):
        backend = get_backend()
        for name in AWKWARD:
            subject = backend.wire_name(name)
            got: list[bytes] = []

            async def run(subject: str = subject, name: str = name, got: list = got) -> None:
                ready = asyncio.Event()
                task = asyncio.create_task(plain_subscriber(subject, ready, got))
                await ready.wait()
                await asyncio.to_thread(backend.publish, name, payload)
                await task

            asyncio.run(run())
            assert got == [payload.encode("utf-8")]
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe(name, inbox)
                publish_plain(server.url, subject, payload.encode("utf-8"))
                assert inbox.wait_payload(payload).channel == name


# -- configuration and credentials -------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options", "says"),
    [
        ("redis://127.0.0.1:4222", {}, "expected nats://"),
        ("nats://127.0.0.1:4222/db", {}, "has a path or query"),
        ("nats://127.0.0.1:4222,", {}, "empty server"),
        ("nats://127.0.0.1:99999", {}, "not valid"),
        ("nats://a:b@h1:1,nats://c:d@h2:1", {}, "different credentials"),
        ("nats://h:1", {"jetstreem": True}, "Invalid option 'jetstreem'"),
        ("nats://h:1", {"jetstream": "yes"}, "True or False"),
        ("nats://h:1", {"token": "t", "creds": __file__}, "one of the options"),
        ("nats://h:1", {"creds": "/no/such.creds"}, "not a readable file"),
        ("nats://h:1", {"tls_cert": __file__}, "both 'tls_cert' and 'tls_key'"),
        ("nats://h:1", {"monitor_url": "127.0.0.1:8222"}, "http://"),
        ("nats://h:1", {"stream_storage": "disk"}, "'file' or 'memory'"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_error(url, options, says):
    with override_settings(**nats_settings(url, **options)):
        with pytest.raises(ImproperlyConfigured, match=says):
            get_backend()


def test_an_unreachable_server_fails_publish_in_time_and_names_it(server):
    url = dead_url(server.url)
    with override_settings(**nats_settings(url)):
        started = time.monotonic()
        with pytest.raises(PublishError, match=r"127\.0\.0\.1"):
            get_backend().publish("nowhere", "x")
        assert time.monotonic() - started < FAST["publish_timeout"] + 0.5


@pytest.fixture(scope="module")
def token_server():
    with NatsServer(token=SECRET) as running:
        yield running


def test_a_wrong_token_is_explained_and_never_shown(token_server):
    url = token_server.url.replace("Qx7rVb", "Wrong1")
    with override_settings(**nats_settings(url)):
        backend = get_backend()
        with pytest.raises(PublishError) as refused:
            backend.publish("x", "y")
        text = str(refused.value) + repr(backend) + repr(backend.describe())
        assert "credentials" in str(refused.value)
        assert not [piece for piece in [*PIECES, "Wrong1"] if piece in text]


def test_a_token_in_the_url_or_the_options_works_and_is_never_shown(token_server, capsys):
    bare = token_server.address
    for settings in (
        nats_settings(token_server.url),
        nats_settings(bare, token=SECRET),
    ):
        with override_settings(**settings):
            backend = get_backend()
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("auth", inbox)
                backend.publish("auth", "in")
                inbox.wait_payload("in")
            call_command("pubsub_channels")
            shown = repr(backend) + repr(backend.describe()) + capsys.readouterr().out
            assert not [piece for piece in PIECES if piece in shown]


def test_an_nkey_seed_file_authenticates(tmp_path):
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    config = f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}'
    with NatsServer(extra_config=config) as running:
        with override_settings(**nats_settings(running.address)):
            with pytest.raises(PublishError, match="credentials"):
                get_backend().publish("x", "y")
        with override_settings(**nats_settings(running.address, nkey_seed=str(seed_file))):
            backend = get_backend()
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("nkey", inbox)
                backend.publish("nkey", "signed")
                inbox.wait_payload("signed")
            assert backend.describe()["auth"] == "nkey_seed"


def test_tls_with_a_ca_file():
    with NatsServer(tls=True) as running:
        with override_settings(**nats_settings(running.url)):
            with pytest.raises(PublishError):  # the throwaway CA is not trusted by default
                get_backend().publish("x", "y")
        with override_settings(**nats_settings(running.url, tls_ca=running.ca_file)):
            backend = get_backend()
            assert backend.describe()["tls"] is True
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("tls", inbox)
                backend.publish("tls", "private")
                inbox.wait_payload("private")


def test_subscriber_counts_come_from_the_monitoring_endpoint(server, capsys):
    with override_settings(**nats_settings(server.url)):
        assert get_backend().subscriber_counts(["pulp_worker_wakeup"]) is None
        call_command("pubsub_channels")
        assert "No monitor_url" in capsys.readouterr().out
    with override_settings(**nats_settings(server.url, monitor_url=server.monitor_url)):
        backend = get_backend()
        with backend.subscriber() as one, backend.subscriber() as two:
            one.subscribe("pulp_worker_wakeup", lambda message: None)
            two.subscribe("pulp_worker_wakeup", lambda message: None)
            counts = backend.subscriber_counts(["pulp_worker_wakeup", "pulp_worker_cancel"])
            assert counts == {"pulp_worker_wakeup": 2, "pulp_worker_cancel": 0}


def test_jetstream_subscriber_counts_come_from_the_monitoring_endpoint(js_server):
    options = {"jetstream": True, "monitor_url": js_server.monitor_url}
    with override_settings(**nats_settings(js_server.url, "counted", **options)):
        backend = get_backend()
        with backend.subscriber() as one, backend.subscriber() as two:
            one.subscribe("pulp_worker_wakeup", lambda message: None)
            two.subscribe("pulp_worker_wakeup", lambda message: None)
            one.subscribe("pulp_worker_cancel", lambda message: None)
            counts = backend.subscriber_counts(["pulp_worker_wakeup", "pulp_worker_cancel"])
            assert counts == {"pulp_worker_wakeup": 2, "pulp_worker_cancel": 1}


# -- JetStream replay ---------------------------------------------------------------------

#: The subscriber stays away for 1.5 to 3 s after a loss, long enough to publish in the gap.
AWAY = {"reconnect_min": 3.0, "reconnect_max": 3.0}


def away_then_back(harness: NatsHarness, sub: Any, during: Any) -> None:
    """Restart the server; run ``during()`` while the subscriber is still away."""
    before = sub.stats["reconnects"]
    harness.restart("fast")
    wait_until(lambda: sub.stats["reconnects"] > before, 15, "the subscriber to notice")
    during()
    assert not sub.connected, "the subscriber came back before the gap was published"


def test_a_jetstream_subscriber_gets_what_was_published_while_it_was_away(js_server):
    harness = NatsHarness(js_server, jetstream=True)
    with override_settings(**nats_settings(js_server.url, jetstream=True, **AWAY)):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("replay", inbox)
            backend.publish("replay", "before")
            inbox.wait_payload("before")
            gap = [f"gap {i}" for i in range(20)]

            def publish_gap() -> None:
                for payload in gap:
                    backend.publish("replay", payload)

            away_then_back(harness, sub, publish_gap)
            backend.publish("replay", "after")
            inbox.wait_payload("after")
            assert inbox.payloads() == ["before", *gap, "after"]
            assert not any(m.resync for m in inbox.messages)
            assert sub.stats["replays"] >= 1


def test_a_jetstream_subscriber_resyncs_when_the_stream_no_longer_holds_its_gap(js_server):
    harness = NatsHarness(js_server, jetstream=True)
    with override_settings(**nats_settings(js_server.url, jetstream=True, **AWAY)):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("purged", inbox)
            backend.publish("purged", "before")
            inbox.wait_payload("before")

            def publish_and_purge() -> None:
                backend.publish("purged", "lost")

                async def purge() -> None:
                    nc = await nats.connect(js_server.url)
                    await nc.jsm().purge_stream(backend.stream_name)
                    await nc.close()

                asyncio.run(purge())

            away_then_back(harness, sub, publish_and_purge)
            inbox.wait(lambda messages: any(m.resync for m in messages))
            backend.publish("purged", "after")
            inbox.wait_payload("after")
            assert "lost" not in inbox.payloads()


def test_a_slow_consumer_disconnect_is_a_reconnect_with_a_resync():
    """The server drops a subscriber that does not read: the listener reconnects and resyncs."""
    config = 'max_pending: 1048576\nwrite_deadline: "1s"'
    with NatsServer(extra_config=config) as running:
        with override_settings(**nats_settings(running.url)):
            backend = get_backend()
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("flood", inbox)
                backend.publish("flood", "first")
                inbox.wait_payload("first")
                release = threading.Event()

                async def hold() -> None:
                    release.wait(20)  # blocks this process's NATS loop: no socket is read

                loop_runner().submit(hold())
                try:

                    async def flood() -> None:
                        nc = await nats.connect(running.url)
                        chunk = b"x" * 65536
                        while running.monitor("varz").get("slow_consumers", 0) == 0:
                            for _ in range(64):
                                await nc.publish(backend.wire_name("flood"), chunk)
                            await nc.flush(5)
                        await nc.close()

                    asyncio.run(asyncio.wait_for(flood(), 30))
                finally:
                    release.set()
                inbox.wait(lambda messages: any(m.resync for m in messages))
                assert sub.stats["reconnects"] >= 1
                backend.publish("flood", "after")
                inbox.wait_payload("after")


def test_a_jetstream_subscriber_on_the_layers_stream_makes_no_consumer(js_server, caplog):
    """The layer's stream republishes what it stores: a subscriber reads it without consumers.

    So after a node's loss it needs no meta leader to make any (docs/reliability.md).
    """
    caplog.set_level(logging.INFO, logger="pulp_pubsub")
    with override_settings(**nats_settings(js_server.url, "live", jetstream=True)):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("direct", inbox)
            for n in range(3):
                backend.publish("direct", f"m{n}")
            inbox.wait(lambda messages: len(messages) == 3)
            assert inbox.payloads() == ["m0", "m1", "m2"]

            async def consumers() -> int:
                nc = await nats.connect(js_server.url)
                try:
                    return len(await nc.jsm().consumers_info(backend.stream_name))
                finally:
                    await nc.close()

            assert backend.live
            assert asyncio.run(consumers()) == 0
    assert "does not republish" not in caplog.text


async def _own_stream(url: str, name: str, subjects: str) -> None:
    """An operator's stream, made without republish or direct gets (as older releases did)."""
    nc = await nats.connect(url)
    try:
        await nc.jsm().add_stream(nats.js.api.StreamConfig(name=name, subjects=[subjects]))
    finally:
        await nc.close()


def test_the_layers_stream_made_by_an_older_release_is_made_to_republish(js_server, caplog):
    caplog.set_level(logging.INFO, logger="pulp_pubsub")
    with override_settings(**nats_settings(js_server.url, "older", jetstream=True)):
        backend = get_backend()
        asyncio.run(_own_stream(js_server.url, backend.stream_name, backend.stream_subjects))
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("upgraded", inbox)
            backend.publish("upgraded", "live")
            inbox.wait_payload("live")
            # nats-server 2.9 refuses the change (2.10 and later make it): said, and the
            # subscriber goes on with consumers.
            assert backend.live or "could not be made to republish" in caplog.text


def test_a_jetstream_consumer_lost_on_the_server_is_noticed_and_its_messages_replayed(js_server):
    """A consumer can vanish while the connection lives (its node died): silence is a loss.

    Consumers are what a subscriber makes on a stream that does not republish (an operator's).
    """
    asyncio.run(_own_stream(js_server.url, "OWN_PLAIN", "own.*"))
    options = {"jetstream": True, "stream": "OWN_PLAIN"}
    with override_settings(**nats_settings(js_server.url, "own", **options)):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("vanish", inbox)
            backend.publish("vanish", "before")
            inbox.wait_payload("before")
            assert not backend.live

            async def delete_consumers() -> None:
                nc = await nats.connect(js_server.url)
                jsm = nc.jsm()
                for consumer in await jsm.consumers_info(backend.stream_name):
                    if consumer.config.filter_subject == backend.wire_name("vanish"):
                        await jsm.delete_consumer(backend.stream_name, consumer.name)
                await nc.close()

            asyncio.run(delete_consumers())
            backend.publish("vanish", "while deaf")
            inbox.wait_payload("while deaf")
            assert sub.stats["reconnects"] >= 1 and sub.stats["replays"] >= 1
            assert not any(m.resync for m in inbox.messages)


def test_tls_with_a_client_certificate():
    with NatsServer(tls=True, verify_clients=True) as running:
        files = running.tls_files
        with override_settings(**nats_settings(running.url, tls_ca=files["ca"])):
            with pytest.raises(PublishError):  # no client certificate: refused
                get_backend().publish("x", "y")
        options = {
            "tls_ca": files["ca"],
            "tls_cert": files["client_cert"],
            "tls_key": files["client_key"],
        }
        with override_settings(**nats_settings(running.url, **options)):
            backend = get_backend()
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("mtls", inbox)
                backend.publish("mtls", "both ways")
                inbox.wait_payload("both ways")


def test_a_subscriber_never_gives_up_reconnecting():
    """nats-py alone stops after 60 attempts; the layer's listener goes on as long as it lives."""
    with NatsServer() as running:
        options = {"reconnect_min": 0.005, "reconnect_max": 0.01, "connect_timeout": 0.5}
        with override_settings(**nats_settings(running.url, **options)):
            backend = get_backend()
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("patient", inbox)
                running.stop()
                wait_until(lambda: sub.stats["reconnects"] > 61, 30, "more than 60 failed attempts")
                running.start()
                inbox.wait(lambda messages: any(m.resync for m in messages))
                backend.publish("patient", "back")
                inbox.wait_payload("back")


def test_the_first_message_after_subscribe_always_arrives(server):
    """subscribe() returns only once a publish reaches it (a PING alone lost ~1 in 500)."""
    with override_settings(**nats_settings(server.url)):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            for i in range(1500):
                sub.subscribe(f"first{i}", inbox)
                backend.publish(f"first{i}", f"m{i}")
                inbox.wait_payload(f"m{i}", channel=f"first{i}")
                sub.unsubscribe(f"first{i}")


def _publisher_connections(server: NatsServer) -> int:
    return sum("publisher" in (c.get("name") or "") for c in server.connections())


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_publish_after_the_server_closed_the_idle_connection_reconnects_and_sends_once(tls):
    """The publisher's own loop runs only inside a publish: the server's PINGs go unanswered
    between publishes and it closes the connection; the next publish finds that and sends
    on a new one, once, without an error."""
    config = 'ping_interval: "200ms"\nping_max: 1'
    with NatsServer(extra_config=config, tls=tls) as stale:
        options = {"tls_ca": stale.ca_file} if tls else {}
        with override_settings(**nats_settings(stale.url, **options)):
            _publish_across_the_servers_close(stale)


def _publish_across_the_servers_close(stale: NatsServer) -> None:
    backend = get_backend()
    with backend.subscriber() as sub:
        inbox = Inbox(sub, started=True)
        sub.subscribe("idle", inbox)
        sub.start()
        backend.publish("idle", "first")
        inbox.wait_payload("first")
        wait_until(lambda: _publisher_connections(stale) == 0, 10, "the server's close")
        backend.publish("idle", "second")
        inbox.wait_payload("second")
        backend.publish("idle", "third")
        inbox.wait_payload("third")
        sent = [m.payload for m in inbox.messages if not m.resync]
        assert sent == ["first", "second", "third"]
    backend.close()


def test_a_publish_from_a_thread_that_runs_an_event_loop_goes_through_the_loop_thread(server):
    """Such a thread cannot run the publisher's own loop (see .direct); it is not refused."""
    with override_settings(**nats_settings(server.url)):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("from-async", inbox)

            async def publish_inside_a_loop() -> None:
                backend.publish("from-async", "sent")

            asyncio.run(publish_inside_a_loop())
            inbox.wait_payload("sent")


# -- targeted delivery -----------------------------------------------------------------


def test_jetstream_targets_natively_and_core_nats_broadcasts(server, js_server, capsys):
    with override_settings(**nats_settings(server.url)):
        core = get_backend()
        assert not core.targets and core.delivery("runners") == "broadcast"
        assert core.describe()["targeted_delivery"] == "broadcast (core NATS)"
    with override_settings(**nats_settings(js_server.url, "pulp", jetstream=True)):
        backend = get_backend()
        assert backend.targets and backend.delivery("runners") == "targeted"
        assert backend.delivery(None) == "broadcast"
        assert backend.work_subject(backend.wire_name("a.b"), "x.y") == "pulp._work.a%2Eb.x%2Ey"
        info = backend.describe()
        assert info["work_stream"] == "PUBSUB_pulp_WORK"
        assert info["work_subjects"] == "pulp._work.*.*"
        call_command("pubsub_channels")
        out = capsys.readouterr().out
        assert "targeted (groups:" in out and "cannot target" not in out


def fork_member(channel: str, group: str) -> tuple[int, int]:
    """A member in a child process; it writes one byte when a targeted message reaches it.

    Returns (pid, read end). The child never acks (manual ack) and lives until killed.
    """
    from django.db import connections

    got_r, got_w = os.pipe()
    connections.close_all()  # no child may share the parent's database socket
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(got_r)
            backend = get_backend()
            sub = backend.subscriber(manual_ack=True)
            sub.subscribe(channel, lambda m: m.resync or os.write(got_w, b"m"), group=group)
            os.write(got_w, b"j")  # joined: its pull request goes out now
            while True:
                sub.dispatch(timeout=1.0)
        finally:
            os._exit(status)
    os.close(got_w)
    return pid, got_r


def read_byte(fd: int, timeout: float = 15) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"the member process said nothing within {timeout} s"
    return os.read(fd, 1)


def test_a_member_killed_holding_a_message_loses_it_to_another_after_claim_timeout(js_server):
    import signal

    with override_settings(**nats_settings(js_server.url, jetstream=True, claim_timeout=1.0)):
        backend = get_backend()
        pid, got = fork_member("killed", "runners")
        try:
            assert read_byte(got) == b"j"
            backend.publish("killed", "job", group="runners")
            assert read_byte(got) == b"m"  # the only member has it, and never acks
            with backend.subscriber() as other:
                inbox = Inbox(other)
                other.subscribe("killed", inbox, group="runners")
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pid = 0
                killed_at = time.monotonic()
                inbox.wait_payload("job")
                print(f"redelivered {time.monotonic() - killed_at:.2f} s after the SIGKILL")
                assert [m.group for m in inbox.messages if not m.resync] == ["runners"]
        finally:
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(got)


def test_a_member_killed_while_idle_takes_nothing_with_it(js_server):
    """Its waiting pull request dies with its connection: the next message goes to a live one.

    The claim timeout is long, so only that (and no redelivery) can bring it over in time.
    """
    import signal

    with override_settings(**nats_settings(js_server.url, jetstream=True, claim_timeout=60)):
        backend = get_backend()
        pid, got = fork_member("idle", "runners")
        try:
            assert read_byte(got) == b"j"
            with backend.subscriber() as other:
                inbox = Inbox(other)
                other.subscribe("idle", inbox, group="runners")
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pid = 0
                backend.publish("idle", "job", group="runners")
                inbox.wait(lambda messages: "job" in [m.payload for m in messages], timeout=10)
        finally:
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            os.close(got)


def test_targeted_messages_published_while_the_members_were_away_arrive_after(js_server):
    harness = NatsHarness(js_server, jetstream=True)
    with override_settings(**nats_settings(js_server.url, jetstream=True, **AWAY)):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("away", inbox, group="runners")
            backend.publish("away", "before", group="runners")
            inbox.wait_payload("before")

            def publish_gap() -> None:
                backend.publish("away", "during", group="runners")

            away_then_back(harness, sub, publish_gap)
            inbox.wait_payload("during")
            assert [m.payload for m in inbox.messages if not m.resync] == ["before", "during"]


def test_a_targeted_consumer_deleted_on_the_server_is_made_again_by_its_members(js_server):
    """Its waiting pull requests end with "consumer deleted": a loss; the rejoin remakes it."""
    with override_settings(**nats_settings(js_server.url, jetstream=True)):
        backend = get_backend()
        with backend.subscriber() as sub:
            inbox = Inbox(sub)
            sub.subscribe("remade", inbox, group="runners")
            backend.publish("remade", "before", group="runners")
            inbox.wait_payload("before")
            name = backend.work_consumer(backend.wire_name("remade"), "runners")

            async def delete_consumer() -> None:
                nc = await nats.connect(js_server.url)
                await nc.jsm().delete_consumer(backend.work_stream_name, name)
                await nc.close()

            asyncio.run(delete_consumer())
            # What was published while it did not exist reached nobody: a resync says so.
            inbox.wait(lambda messages: any(m.resync for m in messages))
            assert sub.stats["reconnects"] >= 1
            backend.publish("remade", "after", group="runners")
            inbox.wait_payload("after")


class Watched:
    """What is published on ``subject``, seen from a connection of its own on a thread."""

    def __init__(self, url: str, subject: str) -> None:
        self.url, self.subject = url, subject
        self.bodies: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Watched:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._watch(), self.loop).result(10)
        return self

    async def _watch(self) -> None:
        async def seen(msg: Any) -> None:
            self.bodies.append(msg.data)

        self.nc = await nats.connect(self.url)
        await self.nc.subscribe(self.subject, cb=seen)
        await self.nc.flush()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.nc.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_an_idle_member_renews_its_pull_request_at_each_expiry_and_stays_connected(js_server):
    # No idle heartbeat (its cost at the server grows faster than the fleet): the request
    # expires after 2 probe intervals, the server says so (408) and the member asks again.
    # A member that took the expiry's silence for a lost consumer would reconnect.
    with override_settings(**nats_settings(js_server.url, "idle", jetstream=True)):
        backend = get_backend()
        with Watched(js_server.url, "$JS.API.CONSUMER.MSG.NEXT.>") as pulls:
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("waits", inbox, group="runners")
                wait_until(lambda: len(pulls.bodies) >= 3, PATIENCE, "two renewed pull requests")
                assert sub.stats["reconnects"] == 0
                expires = int(2 * FAST["probe_interval"] * 1e9)
                assert {json.loads(body)["expires"] for body in pulls.bodies} == {expires}
                assert not any("idle_heartbeat" in json.loads(body) for body in pulls.bodies)
                backend.publish("waits", "still here", group="runners")
                inbox.wait_payload("still here")


def test_a_pull_request_never_answered_is_asked_again_once_then_costs_the_connection(js_server):
    # Under heavy load the server's word on a request can come late: one silence is met
    # with a new request, not a reconnect (a fleet's reconnects add to the load). A second
    # silence in a row means the consumer is gone. Which request the server "forgot" is
    # set here by ageing the one it holds; the requests themselves are real.
    options = {**FAST, "jetstream": True, "probe_interval": 10.0}
    with override_settings(**nats_settings(js_server.url, "silent", **options)):
        backend = get_backend()
        pair = (backend.wire_name("silent"), "runners")
        transport = backend.open_transport()
        try:
            with Watched(js_server.url, "$JS.API.CONSUMER.MSG.NEXT.>") as pulls:
                transport.join([pair])

                def asked(times: int) -> None:
                    transport.want(frozenset([pair]), "me")
                    wait_until(lambda: len(pulls.bodies) >= times, PATIENCE, f"{times} pulls")

                def age_the_waiting_request() -> None:
                    request, (member, _sent) = next(iter(transport._pulls.items()))
                    transport._pulls[request] = (member, time.monotonic() - 3600)

                asked(1)
                age_the_waiting_request()
                asked(2)  # asked again, no ConnectionLost
                age_the_waiting_request()
                with pytest.raises(ConnectionLost, match="answered neither"):
                    transport.want(frozenset([pair]), "me")
        finally:
            transport.close()


#: The permissions docs/backends.md gives a JetStream user with targeted delivery (prefix pulp).
TARGETED_USER = """
authorization { users = [ { user: "pulp", password: "pulp-pw", permissions: {
  publish: ["pulp.*", "pulp._work.>", "_INBOX.>", "$JS.API.>", "$JS.ACK.>"],
  subscribe: ["pulp.*", "pulp._live.>", "_INBOX.>"]
} } ] }
"""


def test_the_documented_permissions_carry_targeted_delivery():
    with NatsServer(jetstream=True, extra_config=TARGETED_USER) as running:
        url = running.url.replace("nats://", "nats://pulp:pulp-pw@")
        with override_settings(**nats_settings(url, "pulp", jetstream=True)):
            backend = get_backend()
            with backend.subscriber() as sub:
                inbox = Inbox(sub)
                sub.subscribe("jobs", inbox, group="runners")
                for n in range(3):
                    backend.publish("jobs", f"job {n}", group="runners")
                backend.publish("jobs", "broadcast")
                inbox.wait(lambda messages: len(messages) == 4)
                assert sorted(inbox.payloads()) == ["broadcast", "job 0", "job 1", "job 2"]

                async def left_in_stream() -> int:
                    nc = await nats.connect(url)
                    try:
                        info = await nc.jsm().stream_info(backend.work_stream_name)
                        return int(info.state.messages)
                    finally:
                        await nc.close()

                # Acked (interest retention drops them), not waiting for a claim timeout.
                wait_until(lambda: asyncio.run(left_in_stream()) == 0, 10, "the acks")
                assert sub.stats["reconnects"] == 0 and not sub.last_error
