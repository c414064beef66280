"""The redis backend against real, throwaway redis-servers (and a Sentinel cluster).

The contract tests (tests/test_contract.py) cover what every backend shares;
these cover what is Redis's own: where the URL comes from, TLS, ACL users and
passwords, the prefix on the wire, the server's own ways of dropping a
subscriber, Sentinel failover, and plain redis-cli on the other end.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.test import override_settings

from pulp_pubsub import Message, get_backend, publish
from pulp_pubsub.backends.listener import Subscriber
from pulp_pubsub.backends.redis.backend import RedisBackend
from pulp_pubsub.backends.redis.groups import CONSUMER_GROUP, stream_key
from pulp_pubsub.exceptions import MissingDependency, PublishError
from pulp_pubsub_tools.testing import RedisServer, SentinelCluster, TcpProxy, free_port

from .util import senders_of, wait_until

REDIS_CLI = "/usr/bin/redis-cli"

#: Short enough that every fault is noticed and repaired within a few seconds.
FAST = {
    "probe_interval": 0.5,
    "probe_timeout": 0.5,
    "reconnect_min": 0.05,
    "reconnect_max": 0.5,
    "connect_timeout": 1.0,
    "publish_timeout": 1.0,
}

#: What an ACL user of the layer needs, on top of its channels.
LAYER_COMMANDS = "-@all +publish +subscribe +unsubscribe +pubsub|numsub"

backend_test = pytest.mark.backend


class Inbox:
    """Collects a subscriber's messages, dispatched in the test's own thread."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)

    def payloads(self) -> list[str]:
        return [m.payload for m in self.messages if not m.resync]

    def resyncs(self) -> list[str]:
        return [m.channel for m in self.messages if m.resync]

    def wait_for(self, predicate: Callable[[Inbox], object], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0:
                last = [(m.channel, m.payload[:40], m.resync) for m in self.messages[-5:]]
                raise AssertionError(
                    f"timed out after {timeout} s; got {len(self.messages)} messages, "
                    f"the last: {last}; subscriber error: {self.sub.last_error}"
                )
            self.sub.dispatch(timeout=min(left, 0.5))

    def wait_for_payload(self, payload: str, timeout: float = 15) -> None:
        self.wait_for(lambda inbox: payload in inbox.payloads(), timeout)

    def wait_for_resync(self, timeout: float = 30) -> None:
        self.wait_for(lambda inbox: inbox.resyncs(), timeout)


@contextlib.contextmanager
def redis_backend(url: str, prefix: str = "", **options: Any) -> Iterator[RedisBackend]:
    backend = RedisBackend(url=url, options=options, channel_prefix=prefix)
    try:
        yield backend
    finally:
        backend.close()


@contextlib.contextmanager
def subscribed(backend: RedisBackend, *channels: str) -> Iterator[Inbox]:
    with backend.subscriber() as sub:
        inbox = Inbox(sub)
        for channel in channels:
            sub.subscribe(channel, inbox)
        yield inbox


def plain_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5, decode_responses=True)


def cli(server: RedisServer, *args: str) -> str:
    done = subprocess.run(
        [REDIS_CLI, "-h", server.host, "-p", str(server.port), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """One server for the tests that do not break it."""
    with RedisServer() as running:
        yield running


@pytest.fixture
def fresh_server() -> Iterator[RedisServer]:
    """A server of the test's own, for the tests that break or reconfigure it."""
    with RedisServer() as running:
        yield running


# -- where the server is ---------------------------------------------------------------


REDIS_SETTINGS_UNSET = {
    "PUBSUB_BACKEND": "redis",
    "PUBSUB_URL": None,
    "PUBSUB_OPTIONS": {},
    "PUBSUB_CHANNEL_PREFIX": "",
    "REDIS_URL": None,
    "REDIS_HOST": None,
}


def test_pulps_redis_url_is_used_when_pubsub_url_is_unset():
    with override_settings(**{**REDIS_SETTINGS_UNSET, "REDIS_URL": "redis://:s3cret@cache:6380/3"}):
        backend = get_backend()
        info = backend.describe()
    assert backend.target.kwargs["host"] == "cache"
    assert backend.target.kwargs["password"] == "s3cret"
    assert info["url"] == "redis://:***@cache:6380/3"
    assert info["url_from"] == "REDIS_URL"
    assert "s3cret" not in repr(info)


def test_pulps_redis_host_settings_are_used_when_no_url_is_set():
    pulp = {
        "REDIS_HOST": "cache.example",
        "REDIS_PORT": 6390,
        "REDIS_DB": 2,
        "REDIS_PASSWORD": "p@ss/word",
        "REDIS_SSL": True,
        "REDIS_SSL_CA_CERTS": "/etc/pki/redis-ca.pem",
    }
    with override_settings(**{**REDIS_SETTINGS_UNSET, **pulp}):
        backend = get_backend()
        info = backend.describe()
    kwargs = backend.target.kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"]) == (
        "cache.example",
        6390,
        "p@ss/word",
    )
    assert kwargs["ssl_ca_certs"] == "/etc/pki/redis-ca.pem"
    assert info["tls"] is True
    assert info["url_from"] == "REDIS_HOST"
    assert info["url"] == "rediss://:***@cache.example:6390/2"


def test_pubsub_url_wins_over_pulps_redis_settings():
    with override_settings(
        **{**REDIS_SETTINGS_UNSET, "PUBSUB_URL": "redis://mine:1/0", "REDIS_URL": "redis://pulp/0"}
    ):
        assert get_backend().describe()["url_from"] == "PUBSUB_URL"


def test_with_nothing_configured_the_backend_uses_the_local_default():
    with override_settings(**REDIS_SETTINGS_UNSET):
        info = get_backend().describe()
    assert (info["url"], info["url_from"]) == ("redis://localhost:6379/0", "default")


def test_a_database_number_without_a_prefix_is_warned_about():
    url = "redis://cache:6379/4"
    assert "PUBSUB_CHANNEL_PREFIX" in RedisBackend(url=url).describe()["warnings"][0]
    assert RedisBackend(url=url, channel_prefix="site4.").describe()["warnings"] == []
    # Pub/sub ignores the database, so the layer never sends SELECT (an ACL
    # user needs no +select).
    assert "db" not in RedisBackend(url=url).target.kwargs


def test_a_sentinel_url_names_the_sentinels_and_the_service():
    backend = RedisBackend(
        url="redis+sentinel://:pw@10.0.0.1:26380,[::1]:26381,sentinel3/pulp-redis",
        options={"sentinel_password": "sentinel-secret"},
    )
    target = backend.target
    assert target.sentinels == [("10.0.0.1", 26380), ("::1", 26381), ("sentinel3", 26379)]
    assert target.service_name == "pulp-redis"
    assert target.kwargs["password"] == "pw"
    assert backend.sentinel_kwargs()["password"] == "sentinel-secret"
    info = backend.describe()
    assert info["service_name"] == "pulp-redis"
    assert "pw@" not in info["url"] and "sentinel-secret" not in repr(info)


def test_sentinels_that_cannot_be_reached_are_named_by_their_address():
    ports = [free_port(), free_port()]
    backend = RedisBackend(
        url=f"redis+sentinel://:hidden-pw@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/svc",
        options={"publish_timeout": 1.0, "connect_timeout": 1.0},
    )
    try:
        with pytest.raises(PublishError) as caught:
            backend.publish("nowhere", "x")
    finally:
        backend.close()
    text = str(caught.value)
    assert "No master found for 'svc'" in text
    assert "<redis." not in text and "hidden-pw" not in text
    if "No master found for 'svc' :" in text:  # redis-py 7 and later list each sentinel
        assert f"127.0.0.1:{ports[0]} - " in text and f"127.0.0.1:{ports[1]} - " in text


@pytest.mark.parametrize(
    "url",
    [
        "http://user:hidden-pw@cache:6379/0",
        "redis+sentinel://:hidden-pw@s1:26379/",
        "redis+sentinel://:hidden-pw@s1:port/svc",
        "redis://:hidden-pw@cache:6379/0?no_such_argument=1",
    ],
)
def test_a_bad_url_is_a_configuration_error_that_hides_the_password(url):
    with pytest.raises(ImproperlyConfigured) as caught:
        RedisBackend(url=url)
    assert "hidden-pw" not in str(caught.value)
    assert "***" in str(caught.value)


def test_tls_options_on_a_plain_url_are_refused():
    with pytest.raises(ImproperlyConfigured, match="rediss://"):
        RedisBackend(url="redis://cache:6379/0", options={"ssl_ca_certs": "/ca.pem"})


def test_options_override_the_credentials_of_the_url():
    backend = RedisBackend(
        url="redis://cache:6379/0", options={"username": "pulp", "password": "from-env"}
    )
    assert (backend.target.kwargs["username"], backend.target.kwargs["password"]) == (
        "pulp",
        "from-env",
    )


@pytest.mark.parametrize("missing", ["redis", "hiredis"])
def test_without_redis_py_the_error_names_the_pip_extra(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.delitem(sys.modules, "pulp_pubsub.backends.redis.backend")
    with pytest.raises(MissingDependency, match=r"pulp-pubsub\[redis\]"):
        importlib.import_module("pulp_pubsub.backends.redis.backend")


# -- delivery details that are Redis's own ----------------------------------------------


@backend_test
@pytest.mark.django_db(transaction=True)
def test_publish_inside_atomic_is_sent_at_commit_and_dropped_on_rollback(server):
    with override_settings(
        PUBSUB_BACKEND="redis", PUBSUB_URL=server.url, PUBSUB_OPTIONS={}, PUBSUB_CHANNEL_PREFIX=""
    ):
        backend = get_backend()
        with subscribed(backend, "jobs") as inbox:
            with transaction.atomic():
                publish("jobs", "committed")
                # Sent now, bypassing on_commit, on the same publish connection:
                # had "committed" gone out already, it would arrive first.
                backend.send("jobs", "marker-1")
                inbox.wait_for_payload("marker-1")
                assert inbox.payloads() == ["marker-1"]
            inbox.wait_for_payload("committed")

            with pytest.raises(RuntimeError), transaction.atomic():
                publish("jobs", "rolled back")
                raise RuntimeError("roll back")
            publish("jobs", "marker-2")
            inbox.wait_for_payload("marker-2")
    assert inbox.payloads() == ["marker-1", "committed", "marker-2"]


@backend_test
def test_a_publish_while_another_thread_holds_the_connection_takes_the_pool(server):
    with redis_backend(server.url) as backend, subscribed(backend, "jobs") as inbox:
        backend.publish("jobs", "direct")
        clients = backend.clients()
        direct = clients.direct
        assert direct is not None
        with clients.direct_lock:  # as a thread in the middle of its publish holds it
            backend.publish("jobs", "pooled")
        inbox.wait_for_payload("pooled")
        assert clients.direct is direct
        assert inbox.payloads() == ["direct", "pooled"]
        assert backend.stats["published"] == 2


@backend_test
def test_a_publish_connection_the_server_closed_while_idle_is_made_again(server):
    with (
        redis_backend(server.url) as backend,
        subscribed(backend, "jobs") as inbox,
        plain_client(server) as admin,
    ):
        backend.publish("jobs", "first")
        direct = backend.clients().direct
        assert direct is not None and direct._sock is not None
        host, port = direct._sock.getsockname()[:2]
        assert admin.client_kill(f"{host}:{port}")
        backend.publish("jobs", "second")
        inbox.wait_for_payload("second")
        assert inbox.payloads() == ["first", "second"]
        assert backend.stats["publish_errors"] == 0


@backend_test
def test_two_prefixes_on_one_server_never_cross(server):
    with (
        redis_backend(server.url, prefix="site1.") as site1,
        redis_backend(server.url, prefix="site2.") as site2,
        subscribed(site1, "jobs") as inbox1,
        subscribed(site2, "jobs") as inbox2,
    ):
        wires = set(plain_client(server).pubsub_channels("site*"))
        assert {"site1.jobs", "site2.jobs"} <= wires
        assert all(w.startswith(("site1.", "site2.")) for w in wires)
        # site2 goes first and is fully delivered; site1's marker comes after
        # it on the server, so a stray site2 message would reach inbox1 first.
        for n in range(5):
            site2.publish("jobs", f"site2-{n}")
        site2.publish("jobs", "site2-end")
        inbox2.wait_for_payload("site2-end")
        site1.publish("jobs", "site1-end")
        inbox1.wait_for_payload("site1-end")
        site1.publish("jobs", "site1-more")
        inbox1.wait_for_payload("site1-more")
        site2.publish("jobs", "site2-marker")
        inbox2.wait_for_payload("site2-marker")
    assert inbox1.payloads() == ["site1-end", "site1-more"]
    assert inbox2.payloads() == [*(f"site2-{n}" for n in range(5)), "site2-end", "site2-marker"]


@backend_test
def test_subscriber_counts_are_pubsub_numsub_with_the_prefix(server):
    with (
        redis_backend(server.url, prefix="counted.") as backend,
        subscribed(backend, "jobs", "cancel"),
        subscribed(backend, "jobs"),
    ):
        assert backend.subscriber_counts(["jobs", "cancel", "idle"]) == {
            "jobs": 2,
            "cancel": 1,
            "idle": 0,
        }
        assert plain_client(server).pubsub_numsub("counted.jobs") == [("counted.jobs", 2)]


@backend_test
def test_a_unix_socket_url_works(tmp_path):
    path = str(tmp_path / "redis.sock")
    with (
        RedisServer(extra_args=["--unixsocket", path]) as _,
        redis_backend(f"unix://{path}") as backend,
        subscribed(backend, "jobs") as inbox,
    ):
        backend.publish("jobs", "over a unix socket")
        inbox.wait_for_payload("over a unix socket")


@backend_test
def test_a_forked_child_publishes_on_its_own_connection_and_leaves_the_parents_alone(server):
    client = plain_client(server)
    with redis_backend(server.url) as backend, subscribed(backend, "jobs") as inbox:
        backend.publish("jobs", "parent-1")
        inbox.wait_for_payload("parent-1")
        before = client.info("stats")["total_connections_received"]
        pid = os.fork()
        if pid == 0:  # the child: publish, then drop everything it inherited
            code = 1
            try:
                backend.publish("jobs", "child")
                backend.close()
                import gc

                gc.collect()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        inbox.wait_for_payload("child")
        backend.publish("jobs", "parent-2")
        inbox.wait_for_payload("parent-2")
        # The child's one connection is the only new one: the parent's
        # publish connection and subscriber survived the child's exit.
        assert client.info("stats")["total_connections_received"] == before + 1
        assert inbox.sub.stats["reconnects"] == 0
        assert inbox.resyncs() == []


# -- TLS, passwords and ACL users ------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server() -> Iterator[RedisServer]:
    with RedisServer(tls=True) as running:
        yield running


@backend_test
def test_tls_with_the_test_ca_delivers(tls_server):
    assert tls_server.ca_file is not None
    with (
        redis_backend(tls_server.url, ssl_ca_certs=tls_server.ca_file) as backend,
        subscribed(backend, "jobs") as inbox,
    ):
        assert backend.describe()["tls"] is True
        backend.publish("jobs", "encrypted")
        inbox.wait_for_payload("encrypted")
    # The CA may also come in the URL, as redis-py reads it.
    with (
        redis_backend(f"{tls_server.url}?ssl_ca_certs={tls_server.ca_file}") as backend,
        subscribed(backend, "jobs") as inbox,
    ):
        backend.publish("jobs", "encrypted too")
        inbox.wait_for_payload("encrypted too")


@backend_test
def test_tls_without_the_ca_fails_with_a_certificate_error(tls_server):
    with redis_backend(tls_server.url, **FAST) as backend:
        with pytest.raises(PublishError, match="certificate verify failed"):
            backend.publish("jobs", "x")
        with backend.subscriber() as sub:
            sub.subscribe("jobs", lambda m: None)
            wait_until(lambda: sub.last_error, what="the subscriber's error")
            assert not sub.connected
            assert "certificate verify failed" in str(sub.last_error)


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    acl = [
        "user default on nopass ~* &* +@all",
        f"user pulp on >pulp-secret resetchannels &site1.* {LAYER_COMMANDS}",
    ]
    with RedisServer(acl_lines=acl) as running:
        yield running


def acl_url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@{server.host}:{server.port}/0"


@backend_test
def test_an_acl_user_limited_to_the_prefixs_channels_works(acl_server):
    url = acl_url(acl_server, "pulp", "pulp-secret")
    with (
        redis_backend(url, prefix="site1.", **FAST) as backend,
        subscribed(backend, "jobs") as inbox,
    ):
        backend.publish("jobs", "allowed")
        inbox.wait_for_payload("allowed")
        assert backend.subscriber_counts(["jobs"]) == {"jobs": 1}
        # Long enough for several liveness probes, on channels under the prefix.
        wait_until(lambda: inbox.sub.probe_rtt is not None, what="a liveness probe")
        assert inbox.sub.stats["reconnects"] == 0


@backend_test
def test_an_acl_user_without_the_channel_right_gets_a_clear_error(acl_server, caplog):
    url = acl_url(acl_server, "pulp", "pulp-secret")
    with redis_backend(url, prefix="site2.", **FAST) as backend:
        with pytest.raises(PublishError, match=r"NoPermissionError.*ACL user needs") as caught:
            backend.publish("jobs", "x")
        assert "&site2.*" in str(caught.value)
        with backend.subscriber() as sub:
            sub.subscribe("jobs", lambda m: None)
            wait_until(lambda: sub.last_error, what="the subscriber's error")
            assert not sub.connected
            assert "Redis refused SUBSCRIBE" in str(sub.last_error)
            assert "NoPermissionError" in str(sub.last_error)
    assert "pulp-secret" not in caplog.text


@backend_test
def test_a_wrong_password_gets_a_clear_error_without_the_password(acl_server, caplog):
    caplog.set_level(logging.DEBUG, logger="pulp_pubsub")
    url = acl_url(acl_server, "pulp", "wrong-secret")
    with redis_backend(url, prefix="site1.", **FAST) as backend:
        with pytest.raises(PublishError, match="invalid username-password") as caught:
            backend.publish("jobs", "x")
        assert "wrong-secret" not in str(caught.value)
        with backend.subscriber() as sub:
            sub.subscribe("jobs", lambda m: None)
            wait_until(lambda: sub.last_error, what="the subscriber's error")
            assert "AuthenticationError" in str(sub.last_error)
            assert "wrong-secret" not in str(sub.last_error)
    assert "wrong-secret" not in caplog.text
    assert "AuthenticationError" in caplog.text


# -- faults: every one ends in a reconnect, a resync, and delivery again --------------------


def assert_recovers(backend: RedisBackend, inbox: Inbox, tag: str) -> None:
    inbox.wait_for_resync()
    assert inbox.resyncs()[0] == "jobs"
    inbox.sub.wait_connected(15)
    backend.publish("jobs", f"after {tag}")
    inbox.wait_for_payload(f"after {tag}")
    assert inbox.sub.stats["reconnects"] >= 1


@backend_test
@pytest.mark.parametrize("mode", ["graceful", "kill"])
def test_subscriber_recovers_from_a_server_restart(fresh_server, mode):
    with redis_backend(fresh_server.url, **FAST) as backend, subscribed(backend, "jobs") as inbox:
        fresh_server.stop(mode)
        try:
            # Down long enough for several refused reconnects, with backoff.
            wait_until(lambda: inbox.sub.stats["reconnects"] >= 3, what="failed reconnects")
            with pytest.raises(PublishError, match="Connection refused"):
                backend.publish("jobs", "while down")
        finally:
            fresh_server.start()
        assert_recovers(backend, inbox, f"restart {mode}")


@backend_test
def test_subscriber_recovers_from_client_kill_type_pubsub(fresh_server):
    with redis_backend(fresh_server.url, **FAST) as backend, subscribed(backend, "jobs") as inbox:
        assert cli(fresh_server, "CLIENT", "KILL", "TYPE", "pubsub").strip() == "1"
        assert_recovers(backend, inbox, "client kill")


@backend_test
def test_subscriber_recovers_from_a_server_stopped_longer_than_the_probe_interval(fresh_server):
    with redis_backend(fresh_server.url, **FAST) as backend, subscribed(backend, "jobs") as inbox:
        fresh_server.freeze()
        try:
            # The socket stays open; only the probe can tell the server is gone.
            # Observers see the loss (connected cleared) before its counters move.
            wait_until(
                lambda: (
                    not inbox.sub.connected
                    and inbox.sub.stats["probe_failures"] + inbox.sub.stats["reconnects"] >= 1
                ),
                timeout=15,
                what="the probe to fail and be counted",
            )
            with pytest.raises(PublishError):
                backend.publish("jobs", "while stopped")
        finally:
            fresh_server.thaw()
        assert_recovers(backend, inbox, "SIGSTOP")


@backend_test
def test_subscriber_recovers_from_a_half_open_connection(fresh_server):
    with (
        TcpProxy(fresh_server.host, fresh_server.port) as proxy,
        redis_backend(proxy.url_for(fresh_server.url), **FAST) as backend,
        subscribed(backend, "jobs") as inbox,
    ):
        proxy.stall()
        try:
            wait_until(lambda: not inbox.sub.connected, timeout=15, what="the probe to fail")
        finally:
            proxy.resume()
        assert_recovers(backend, inbox, "stall")


@backend_test
def test_a_subscriber_too_slow_for_its_output_buffer_is_dropped_and_recovers(fresh_server):
    client = plain_client(fresh_server)
    client.config_set("client-output-buffer-limit", "pubsub 256kb 128kb 60")
    with (
        TcpProxy(fresh_server.host, fresh_server.port) as proxy,
        redis_backend(proxy.url_for(fresh_server.url), **FAST) as backend,
        subscribed(backend, "jobs") as inbox,
    ):
        # The proxy stops reading from Redis: a subscriber that does not keep
        # up. The socket buffers fill, then Redis's output buffer for it.
        proxy.stall()
        try:
            with client.pipeline(transaction=False) as pipe:
                for n in range(200):
                    pipe.publish("jobs", f"{n:03d}" + "x" * 65536)
                pipe.execute()
            wait_until(
                lambda: "output buffer limits" in fresh_server.log_tail(200),
                what="redis-server to drop the subscriber for its output buffer",
            )
        finally:
            proxy.resume()
        assert_recovers(backend, inbox, "output buffer")


@contextlib.contextmanager
def sentinel_backend(
    replicas: int = 1, sentinels: int = 3
) -> Iterator[tuple[SentinelCluster, RedisBackend, Inbox]]:
    """A sentinel-watched master, a backend that finds it through them, and a subscriber."""
    with (
        SentinelCluster(replicas=replicas, sentinels=sentinels) as cluster,
        redis_backend(cluster.url, prefix="ha.", **FAST) as backend,
        subscribed(backend, "jobs") as inbox,
    ):
        yield cluster, backend, inbox


@backend_test
@pytest.mark.long
def test_subscribers_and_publishers_follow_a_sentinel_failover():
    with sentinel_backend() as (cluster, backend, inbox):
        backend.publish("jobs", "before")
        inbox.wait_for_payload("before")
        old = cluster.master_address()
        cluster.kill_master()
        new = cluster.wait_for_failover(old)
        inbox.wait_for_resync(timeout=60)
        inbox.sub.wait_connected(15)
        backend.publish("jobs", "after failover")
        inbox.wait_for_payload("after failover")
        with redis.Redis(*new, decode_responses=True) as master:
            assert master.pubsub_numsub("ha.jobs") == [("ha.jobs", 1)]


@backend_test
@pytest.mark.long
@pytest.mark.django_db(transaction=True)
def test_publishes_now_and_at_commit_reach_the_master_the_sentinels_name():
    """Both publish connections made outside redis-py's client ask the sentinels first.

    redis-py 8 connects a sentinel-managed connection that a command is sent on unconnected
    to its default address (here another Redis, the machine's own), not to the master.
    """
    with sentinel_backend(replicas=0, sentinels=1) as (_, backend, inbox):
        backend.publish("jobs", "now")
        inbox.wait_for_payload("now")
        with transaction.atomic():
            backend.publish("jobs", "at commit")
        assert backend.flush(timeout=10)
        inbox.wait_for_payload("at commit")
        assert backend.stats["deferred_failures"] == 0


@backend_test
@pytest.mark.long
def test_a_planned_sentinel_failover_moves_subscribers_to_the_new_master():
    """SENTINEL FAILOVER keeps the old master alive: it serves on as a master
    until the sentinels demote it (and drop its clients), so the subscriber
    moves later than after a crash, but it does move, with a resync."""
    with sentinel_backend() as (cluster, backend, inbox):
        old = cluster.master_address()
        with cluster.sentinels[0].client() as sentinel:
            sentinel.execute_command("SENTINEL", "FAILOVER", cluster.service_name)
        new = cluster.wait_for_failover(old)
        inbox.wait_for_resync(timeout=60)
        inbox.sub.wait_connected(15)
        backend.publish("jobs", "after failover")
        inbox.wait_for_payload("after failover")
        with redis.Redis(*new, decode_responses=True) as master:
            assert master.pubsub_numsub("ha.jobs") == [("ha.jobs", 1)]


# -- interoperability with redis-cli -----------------------------------------------------


@backend_test
def test_redis_cli_publish_reaches_a_subscriber(server):
    payload = "hällo wörld 'quoted' \"double\""
    with (
        redis_backend(server.url, prefix="cli.") as backend,
        subscribed(backend, "jobs") as inbox,
    ):
        assert cli(server, "PUBLISH", "cli.jobs", payload).strip() == "1"
        inbox.wait_for_payload(payload)
    assert inbox.messages[0].channel == "jobs"


def read_lines(proc: subprocess.Popen[bytes], count: int, timeout: float = 10) -> list[str]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    deadline = time.monotonic() + timeout
    while buffer.count(b"\n") < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"redis-cli printed only {buffer!r}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError(f"redis-cli exited after {buffer!r}")
        buffer += chunk
    return buffer.decode().split("\n")[:count]


@backend_test
def test_a_layer_publish_reaches_redis_cli_subscribe(server):
    payload = "hällo wörld, exactly"
    proc = subprocess.Popen(
        [REDIS_CLI, "-h", server.host, "-p", str(server.port), "SUBSCRIBE", "cli.jobs"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert read_lines(proc, 3) == ["subscribe", "cli.jobs", "1"]
        with redis_backend(server.url, prefix="cli.") as backend:
            backend.publish("jobs", payload)
        assert read_lines(proc, 3) == ["message", "cli.jobs", payload]
    finally:
        proc.kill()
        proc.wait()


# -- publishes deferred to commit ---------------------------------------------------------


@backend_test
@pytest.mark.django_db(transaction=True)
def test_publishes_at_commit_leave_the_committing_thread_in_order(server):
    with override_settings(
        PUBSUB_BACKEND="redis", PUBSUB_URL=server.url, PUBSUB_OPTIONS={}, PUBSUB_CHANNEL_PREFIX=""
    ):
        backend = get_backend()
        sent_from = senders_of(backend)
        with subscribed(backend, "after") as inbox:
            for n in range(50):
                with transaction.atomic():
                    publish("after", str(n))
            assert backend.flush(timeout=10)
            inbox.wait_for(lambda box: len(box.payloads()) == 50)
        assert inbox.payloads() == [str(n) for n in range(50)]
        assert sent_from and threading.get_ident() not in sent_from
        assert backend.stats["published"] == 50


# -- targeted delivery: consumers of processes long gone ---------------------------------


def consumers(client: redis.Redis, key: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in client.xinfo_consumers(key, CONSUMER_GROUP)}


@backend_test
def test_a_member_removes_consumers_long_gone_but_none_holding_entries(server):
    """A SIGKILLed member never leaves its group; a live member's tidy removes it.

    Two ghosts, made with a bare client as a dead process leaves them: one holds
    nothing, one holds an entry nobody has claimed yet (claim_timeout is long).
    """
    channel = f"tidy.{os.urandom(4).hex()}"
    key = stream_key(channel, "workers")
    admin = redis.Redis.from_url(server.url, decode_responses=True)
    admin.xgroup_create(key, CONSUMER_GROUP, "$", mkstream=True)
    done = admin.xadd(key, {"p": "acked by a ghost"})
    admin.xreadgroup(CONSUMER_GROUP, "ghost-empty", {key: ">"}, count=1)
    admin.xack(key, CONSUMER_GROUP, done)
    admin.xadd(key, {"p": "held by a ghost"})
    admin.xreadgroup(CONSUMER_GROUP, "ghost-holding", {key: ">"}, count=1)
    assert {name: c["pending"] for name, c in consumers(admin, key).items()} == {
        "ghost-empty": 0,
        "ghost-holding": 1,
    }
    expiry = 0.5
    # The server's own idle clock, not ours: both ghosts are past the expiry.
    wait_until(
        lambda: all(c["idle"] >= expiry * 1000 for c in consumers(admin, key).values()),
        timeout=10,
        what="the ghosts to be idle",
    )
    with redis_backend(server.url, consumer_expiry=expiry, claim_timeout=60) as backend:
        with backend.subscriber() as sub:
            sub.subscribe(channel, lambda message: None, group="workers")
            assert sub.wait_connected(10), sub.last_error
            wait_until(lambda: backend.stats["consumers_removed"] >= 1, timeout=10, what="the tidy")
            left = consumers(admin, key)
            assert "ghost-empty" not in left
            assert left["ghost-holding"]["pending"] == 1
            assert backend.stats["consumers_removed"] == 1
            assert len(left) == 2  # the holding ghost and the live member


@backend_test
def test_one_member_of_a_fleet_tidies_a_group_per_interval_not_every_member(server, monkeypatch):
    """Each member tidies on its own clock, and a tidy reads the group's whole consumer
    list and idle set: N members doing so each would cost the server O(N^2)."""
    channel = f"tidyonce.{os.urandom(4).hex()}"
    key = stream_key(channel, "workers")
    listed: list[str] = []
    real = redis.Redis.xinfo_consumers

    def spy(self, name, groupname):
        listed.append(name)
        return real(self, name, groupname)

    monkeypatch.setattr(redis.Redis, "xinfo_consumers", spy)
    admin = redis.Redis.from_url(server.url, decode_responses=True)
    with redis_backend(server.url) as backend:
        subs = [backend.subscriber() for _ in range(5)]
        try:
            for sub in subs:
                sub.subscribe(channel, lambda message: None, group="workers")
            assert all(sub.wait_connected(10) for sub in subs)
            # A member records itself idle on the turn that tidies (its first sweep).
            wait_until(lambda: admin.zcard(f"{key}>idle") == 5, timeout=10, what="5 idle")
            assert listed == [key]
            assert backend.stats["tidies"] == 1
        finally:
            for sub in subs:
                sub.close()
