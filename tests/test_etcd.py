"""The etcd backend beyond the shared contract: URLs, auth, leases, replay, compaction, a cluster.

Every test runs real etcd processes started here (``apt-get install etcd-server``).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from django.core.exceptions import ImproperlyConfigured

from pulp_pubsub.backends.etcd.backend import EtcdBackend, parse_url
from pulp_pubsub.exceptions import PublishError
from pulp_pubsub_tools.testing import EtcdCluster, EtcdServer, TcpProxy, free_port

from .util import dispatch_until, inbox, plain, wait_until

pytestmark = pytest.mark.backend

FAST = {"probe_interval": 0.5, "probe_timeout": 1.0, "reconnect_max": 0.3, "connect_timeout": 1.0}


@pytest.fixture(scope="module")
def server():
    with EtcdServer() as running:
        yield running


@pytest.fixture
def proxy(server):
    with TcpProxy(server.host, server.port) as running:
        yield running


# -- configuration -------------------------------------------------------------------


def test_url_lists_members_with_default_ports_and_credentials():
    hosts, tls, user, password = parse_url("etcd://pulp:s%40cret@a,b:2380,[::1]:2381")
    assert hosts == [("a", 2379), ("b", 2380), ("::1", 2381)]
    assert (tls, user, password) == (False, "pulp", "s@cret")
    assert parse_url("https://h")[1] is True


@pytest.mark.parametrize(
    "url, message",
    [
        ("redis://h:6379", "not an etcd URL"),
        ("etcd://h:2379/prefix", "no path"),
        ("etcd://h:notaport", "not host"),
        ("etcd://h:0", "not host"),
        ("etcd://user@h", "both a user name and a password"),
    ],
)
def test_bad_urls_are_refused_clearly(url, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        EtcdBackend(url=url)


def test_unknown_and_misplaced_options_are_refused():
    with pytest.raises(ImproperlyConfigured, match="Invalid option 'ttl' for EtcdBackend"):
        EtcdBackend(url="etcd://h", options={"ttl": 5})
    with pytest.raises(ImproperlyConfigured, match="need an etcds:// or https:// URL"):
        EtcdBackend(url="etcd://h", options={"ca_file": "/etc/ca.pem"})
    with pytest.raises(ImproperlyConfigured, match="could not be loaded"):
        EtcdBackend(url="etcds://h", options={"ca_file": "/nonexistent/ca.pem"})


def test_credentials_never_appear_in_repr_or_describe():
    backend = EtcdBackend(url="etcd://pulp:hunter2@a:2379,b:2379")
    shown = repr(backend) + repr(backend.describe()) + repr(backend.endpoints)
    assert "hunter2" not in shown
    assert backend.describe()["endpoints"] == ["http://a:2379", "http://b:2379"]


# -- publishing -----------------------------------------------------------------------


def test_unreachable_members_fail_within_publish_timeout():
    backend = EtcdBackend(url=f"etcd://127.0.0.1:{free_port()}", options={"publish_timeout": 1})
    started = time.monotonic()
    with pytest.raises(PublishError, match="no etcd member answered"):
        backend.publish("etcd.down", "x")
    assert time.monotonic() - started < 1.9  # the timeout, and slack for a loaded CI machine


def test_a_silent_member_does_not_hold_a_publish_past_its_timeout(server, proxy):
    backend = EtcdBackend(url=f"etcd://{proxy.host}:{proxy.port}", options={"publish_timeout": 1})
    proxy.stall()
    try:
        started = time.monotonic()
        with pytest.raises(PublishError, match="TimeoutError"):
            backend.publish("etcd.stalled", "x")
        assert 0.9 < time.monotonic() - started < 1.9
    finally:
        proxy.resume()


def test_publish_fails_over_to_a_member_that_answers(server):
    dead = f"127.0.0.1:{free_port()}"
    backend = EtcdBackend(url=f"etcd://{dead},{server.host}:{server.port}")
    with backend.subscriber() as sub:
        got = inbox(sub, "etcd.failover")
        backend.publish("etcd.failover", "through the second member")
        dispatch_until(sub, lambda: got)
    assert plain(got) == ["through the second member"]


def test_one_lease_carries_many_publishes_and_keys_expire_with_it(server):
    backend = EtcdBackend(url=server.url, options={"lease_ttl": 30})
    before = len(server.call("/v3/lease/leases", {}).get("leases", []))
    for i in range(20):
        backend.publish(f"etcd.lease.{i % 3}", str(i))
    leases = server.call("/v3/lease/leases", {}).get("leases", [])
    assert len(leases) == before + 1
    lease = backend.client._lease
    assert lease in {entry["ID"] for entry in leases}
    ttl = server.call("/v3/lease/timetolive", {"ID": lease, "keys": True})
    assert len(ttl["keys"]) == 3 and 0 < int(ttl["TTL"]) <= 30


# -- replay ---------------------------------------------------------------------------


def _gap(server, proxy, channel, publish_during):
    """A subscriber (through ``proxy``) loses its connection while others publish."""
    publisher = EtcdBackend(url=server.url)
    sub_backend = EtcdBackend(url=f"etcd://{proxy.host}:{proxy.port}", options=FAST)
    sub = sub_backend.subscriber()
    got = inbox(sub, channel)
    publisher.publish(channel, "before")
    dispatch_until(sub, lambda: got)
    proxy.stall()
    wait_until(lambda: not sub.connected, timeout=10, what="the probe to notice")
    publish_during(publisher)
    proxy.cut()
    proxy.resume()
    wait_until(lambda: sub.connected, timeout=10, what="reconnect")
    publisher.publish(channel, "after")
    dispatch_until(sub, lambda: "after" in plain(got))
    return sub, got


def test_messages_published_during_a_gap_are_replayed_in_order(server, proxy):
    def publish_during(publisher):
        for i in range(50):
            publisher.publish("etcd.gap", f"gap {i}")

    sub, got = _gap(server, proxy, "etcd.gap", publish_during)
    with sub:
        assert plain(got) == ["before", *(f"gap {i}" for i in range(50)), "after"]
        assert not any(m.resync for m in got)
        assert sub.stats["replays"] >= 1 and sub.stats["reconnects"] >= 1


def test_a_compacted_gap_gets_a_resync_never_a_silent_hole(server, proxy):
    def publish_during(publisher):
        for i in range(5):
            publisher.publish("etcd.compact", f"lost {i}")
        publisher.publish("etcd.other", "moves the revision on")
        server.compact()

    sub, got = _gap(server, proxy, "etcd.compact", publish_during)
    with sub:
        resyncs = [i for i, m in enumerate(got) if m.resync]
        assert resyncs, "the compacted gap was not reported"
        # The missed messages are gone; the resync stands for them, before "after".
        assert resyncs[0] < [m.payload for m in got].index("after")
        assert not any(p.startswith("lost") for p in plain(got))


def test_tls_with_a_private_ca_and_a_client_certificate():
    with EtcdServer(tls=True) as server:
        files = {"ca_file": server.ca_file, "cert_file": server.cert_file}
        backend = EtcdBackend(url=server.url, options={**files, "key_file": server.key_file})
        with backend.subscriber() as sub:
            got = inbox(sub, "etcd.tls")
            backend.publish("etcd.tls", "over TLS")
            dispatch_until(sub, lambda: got)
        assert plain(got) == ["over TLS"]
        # Without the client certificate the server refuses the connection.
        refused = EtcdBackend(
            url=server.url, options={"ca_file": server.ca_file, "publish_timeout": 1}
        )
        with pytest.raises(PublishError):
            refused.publish("etcd.tls", "no client certificate")


def test_a_store_rebuilt_from_scratch_gets_a_resync_not_a_silent_wait():
    """Revisions start again in a new store: resuming "after the last one seen" would wait
    silently past every new message, so the subscriber resyncs and watches from now."""
    import shutil

    with EtcdServer() as fresh:
        backend = EtcdBackend(url=fresh.url, options=FAST)
        with backend.subscriber() as sub:
            got = inbox(sub, "etcd.rebuilt")
            for i in range(20):  # the old store's revision runs ahead of the new one's
                backend.publish("etcd.rebuilt", f"old {i}")
            dispatch_until(sub, lambda: "old 19" in plain(got))
            fresh.stop("kill")
            shutil.rmtree(os.path.join(fresh.dir, "data"))
            fresh.start()
            dispatch_until(sub, lambda: any(m.resync for m in got), timeout=20)
            backend.publish("etcd.rebuilt", "in the new store")
            dispatch_until(sub, lambda: "in the new store" in plain(got))


# -- authentication -----------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server():
    with EtcdServer() as running:
        running.enable_auth("root", "right-pass")
        yield running


def test_wrong_password_is_a_clear_error_that_hides_the_password(auth_server):
    url = f"etcd://root:wrong-pass@{auth_server.host}:{auth_server.port}"
    with pytest.raises(PublishError, match="refused the login of user 'root'") as err:
        EtcdBackend(url=url).publish("etcd.auth", "x")
    assert "wrong-pass" not in str(err.value)


def test_user_and_password_log_in_for_publish_and_watch(auth_server):
    backend = EtcdBackend(url=f"etcd://root:right-pass@{auth_server.host}:{auth_server.port}")
    with backend.subscriber() as sub:
        got = inbox(sub, "etcd.auth")
        backend.publish("etcd.auth", "with a token")
        dispatch_until(sub, lambda: got)
    assert plain(got) == ["with a token"]


# -- a cluster -----------------------------------------------------------------------


def test_killing_the_leader_loses_nothing(capsys):
    """kill -9 the leader of a 3-member cluster while messages flow.

    Every subscriber carries on by itself; the messages published during the
    failover arrive, in order, without a resync.
    """
    with EtcdCluster(3) as cluster:
        backend = EtcdBackend(url=cluster.url, options={**FAST, "publish_timeout": 10})
        subs = [backend.subscriber() for _ in range(3)]
        inboxes = [inbox(sub, "etcd.cluster") for sub in subs]
        published: list[str] = []
        stop = threading.Event()
        killed_at: list[float] = []
        recovered_at: list[float] = []

        def flow() -> None:
            i = 0
            while not stop.is_set():
                started = time.monotonic()
                backend.publish("etcd.cluster", f"m{i:05d}")
                published.append(f"m{i:05d}")
                if killed_at and not recovered_at and started > killed_at[0]:
                    recovered_at.append(time.monotonic())
                i += 1
                stop.wait(0.005)

        publisher = threading.Thread(target=flow)
        publisher.start()
        try:
            wait_until(lambda: len(published) >= 100, timeout=30, what="traffic")
            leader = cluster.leader()
            assert leader is not None and leader.pid is not None
            killed_at.append(time.monotonic())
            os.kill(leader.pid, signal.SIGKILL)
            wait_until(lambda: recovered_at, timeout=30, what="a publish after the kill")
            count_at_recovery = len(published)
            wait_until(lambda: len(published) >= count_at_recovery + 100, timeout=30)
        finally:
            stop.set()
            publisher.join(30)
        for sub, got in zip(subs, inboxes, strict=True):
            dispatch_until(sub, lambda got=got: plain(got)[-1:] == published[-1:], timeout=30)
        resynced = sum(1 for got in inboxes for m in got if m.resync)
        delivered = [plain(got) for got in inboxes]
        with capsys.disabled():
            print(
                f"\netcd cluster failover: published {len(published)}, "
                f"delivered {[len(d) for d in delivered]}, resynced {resynced}, "
                f"failover {recovered_at[0] - killed_at[0]:.3f} s "
                f"(kill -9 to the first publish that went through); subscribers reconnected "
                f"{sum(s.stats['reconnects'] for s in subs)} times, replayed "
                f"{sum(s.stats['replays'] for s in subs)}"
            )
        for got in delivered:
            # A put retried after an ambiguous failure may land twice; none is lost or reordered.
            firsts = list(dict.fromkeys(got))
            assert firsts == published
        assert resynced == 0
        # Three subscribers go to the three members in turn: the one on the killed
        # leader came back through a replay.
        assert sum(sub.stats["replays"] for sub in subs) >= 1
        for sub in subs:
            sub.close()


def test_pubsub_channels_says_what_etcd_can_tell_and_hides_the_password(auth_server):
    from io import StringIO

    from django.core.management import call_command
    from django.test import override_settings

    url = f"etcd://root:right-pass@{auth_server.host}:{auth_server.port}"
    out = StringIO()
    with override_settings(PUBSUB_BACKEND="etcd", PUBSUB_URL=url, PUBSUB_OPTIONS={}):
        call_command("pubsub_channels", "--live", "--timeout=0.5", stdout=out)
    text = out.getvalue()
    assert "etcd does not list watchers" in text and "subscribers: ?" in text
    assert f"http://{auth_server.host}:{auth_server.port}" in text
    assert "right-pass" not in text


def test_an_empty_key_prefix_is_refused():
    with pytest.raises(ImproperlyConfigured, match="'key_prefix' must not be empty"):
        EtcdBackend(url="etcd://h", options={"key_prefix": ""})


def test_a_fleet_on_one_watch_range_probes_about_once_per_interval_not_once_each(server):
    """Every watch covers every channel, so each probe reaches every subscriber: a fleet
    of N that probed once each per interval would make each read N probes per interval.
    Others' traffic proves a watch alive, so between them they probe about once."""
    interval, window, fleet = 0.5, 3.0, 10
    backend = EtcdBackend(url=server.url, options={**FAST, "probe_interval": interval})
    subs = [backend.subscriber() for _ in range(fleet)]
    try:
        for sub in subs:
            sub.subscribe("fleet_probes", lambda message: None)
        assert all(sub.wait_connected(10) for sub in subs)
        before = sum(sub.stats["probes"] for sub in subs)
        time.sleep(window)  # the rate over a window is what is measured
        sent = sum(sub.stats["probes"] for sub in subs) - before
        # Once each per interval would be fleet * window / interval = 60.
        assert 0 < sent <= 2 * window / interval
        assert all(sub.connected for sub in subs)
        assert sum(sub.stats["probe_failures"] + sub.stats["reconnects"] for sub in subs) == 0
    finally:
        for sub in subs:
            sub.close()
        backend.close()
