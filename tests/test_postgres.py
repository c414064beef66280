"""The PostgreSQL backend against real servers.

Native NOTIFY on Django's connection (at commit, dropped on rollback) runs on
the Django alias "postgres" (its test database) with real commits. Everything
that needs a server of its own (payloads, names, interop, processes, faults)
runs on throwaway servers from tests/servers.py.

"Not delivered yet" is never proven by waiting: PostgreSQL delivers
notifications in commit order, so a marker sent by another session after the
message in question arrives after it; seeing the marker without the message
proves the message was not sent.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.test import override_settings

from demo.models import Event
from pulp_pubsub import Message, get_backend, publish
from pulp_pubsub.backends.listener import Subscriber
from pulp_pubsub.backends.postgres.backend import PostgresBackend
from pulp_pubsub.exceptions import InvalidChannel, InvalidPayload, PublishError
from pulp_pubsub_tools.testing import PostgresServer, TcpProxy

from .harness_postgres import PostgresHarness
from .util import wait_until

pytestmark = pytest.mark.backend

#: Short probe and backoff, so that fault tests recover in seconds.
FAST = {
    "probe_interval": 1.0,
    "probe_timeout": 1.0,
    "reconnect_min": 0.05,
    "reconnect_max": 0.5,
    "connect_timeout": 2.0,
    "publish_timeout": 3.0,
}
PATIENCE = 30.0


# -- helpers -------------------------------------------------------------------


class Inbox:
    """A subscriber's received messages, dispatched in the test's own thread."""

    def __init__(self, sub: Subscriber) -> None:
        self.sub = sub
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def payloads(self) -> list[str]:
        return [m.payload for m in self.messages if not m.resync]

    def wait_for(self, predicate: Any, what: str, timeout: float = PATIENCE) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.messages}")
            self.sub.dispatch(timeout=min(left, 1.0))

    def wait_payload(self, payload: str, timeout: float = PATIENCE) -> None:
        self.wait_for(
            lambda ms: any(not m.resync and m.payload == payload for m in ms), payload, timeout
        )

    def wait_resync(self, timeout: float = PATIENCE) -> None:
        self.wait_for(lambda ms: any(m.resync for m in ms), "a resync", timeout)


def listen(sub: Subscriber, channel: str) -> Inbox:
    inbox = Inbox(sub)
    sub.subscribe(channel, inbox)
    return inbox


def unique(name: str = "ch") -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


def bare_notifies(conn: psycopg.Connection[Any], count: int) -> list[tuple[str, str]]:
    got = [(n.channel, n.payload) for n in conn.notifies(timeout=PATIENCE, stop_after=count)]
    assert len(got) >= count, f"a plain LISTEN received only {got}"
    return got


@pytest.fixture(scope="module")
def pg(tmp_path_factory: Any) -> Iterator[PostgresHarness]:
    """A throwaway server shared by this module's tests that do not break it."""
    with PostgresServer() as server:
        yield PostgresHarness(server)


@pytest.fixture
def broken() -> Iterator[PostgresHarness]:
    """A throwaway server of the test's own, to restart, freeze or cut."""
    with PostgresServer() as server:
        yield PostgresHarness(server)


@contextlib.contextmanager
def django_alias(server: PostgresServer) -> Iterator[str]:
    """A Django database alias for a throwaway server, for the native path's faults."""
    alias = unique("fault")
    connections.settings[alias] = {**connections.settings["postgres"], **server.django_database()}
    try:
        yield alias
    finally:
        if hasattr(connections._connections, alias):
            connections[alias].close()
            delattr(connections._connections, alias)
        del connections.settings[alias]


# -- configuration -------------------------------------------------------------


def test_sqlite_default_database_is_refused_with_the_fix():
    settings = {"PUBSUB_BACKEND": "postgres", "PUBSUB_URL": None, "PUBSUB_OPTIONS": {}}
    refused = pytest.raises(ImproperlyConfigured, match=r"'default', which is sqlite.*PUBSUB_URL")
    with override_settings(**settings), refused:
        get_backend()


def test_unknown_database_alias_is_refused():
    with pytest.raises(ImproperlyConfigured, match="must name an alias of DATABASES"):
        PostgresBackend(options={"database": "nope"})


def test_bad_url_is_refused_without_showing_its_password():
    url = "postgresql://pulp:Sup3r-secret@db:5432/pulp?bogus_option=1"
    with pytest.raises(ImproperlyConfigured) as info:
        PostgresBackend(url=url)
    assert "Sup3r-secret" not in str(info.value)
    assert "pulp:***@db" in str(info.value)


def test_listener_connections_carry_keepalives_and_their_name():
    backend = PostgresBackend(
        url="postgresql://u@h/db", options={"tcp_user_timeout": 7.5, "application_name": "w1"}
    )
    params = backend.connection_params(backend.listener_name)
    assert params["application_name"] == "w1"
    assert (params["keepalives"], params["tcp_user_timeout"]) == (1, 7500)
    assert params["client_encoding"] == "UTF8"
    off = PostgresBackend(url="postgresql://u@h/db", options={"keepalives": False})
    assert off.connection_params("x")["keepalives"] == 0


def test_queue_over_half_full_is_warned_once(caplog):
    backend = PostgresBackend(url="postgresql://u@h/db")
    with caplog.at_level(logging.WARNING, logger="pulp_pubsub.backends.postgres.backend"):
        for usage in (0.1, 0.6, 0.7, 0.2, 0.9):
            backend.observe_queue_usage(usage)
    warnings = [r for r in caplog.records if "notification queue" in r.getMessage()]
    assert [r.getMessage().split("%")[0][-2:] for r in warnings] == ["60", "90"]


@pytest.mark.parametrize("value", [0, -5, "300", True])
def test_a_bad_queue_check_interval_is_refused(value):
    with pytest.raises(ImproperlyConfigured, match="queue_check_interval"):
        PostgresBackend(url="postgresql://u@h/db", options={"queue_check_interval": value})


def test_subscribers_read_the_queue_usage_only_when_asked_to(pg):
    with pg.configured(probe_interval=0.05) as quiet, quiet.subscriber() as sub:
        sub.subscribe("queue.quiet", lambda m: None)
        wait_until(lambda: sub.probe_rtt is not None, what="a probe round trip")
        assert quiet.queue_usage is None
    with pg.configured(probe_interval=0.05, queue_check_interval=0.05) as checking:
        with checking.subscriber() as sub:
            sub.subscribe("queue.checked", lambda m: None)
            wait_until(lambda: checking.queue_usage is not None, what="a queue usage read")
            assert 0 <= checking.queue_usage < 0.5


# -- native NOTIFY on Django's connection ----------------------------------------

# "default" too: Django makes every other alias depend on it unless TEST["DEPENDENCIES"] says not.
NATIVE = pytest.mark.django_db(transaction=True, databases=["default", "postgres"])


@contextlib.contextmanager
def native(url: str | None = None, **options: Any) -> Iterator[PostgresBackend]:
    name = f"pulp-pubsub test {uuid.uuid4().hex[:8]}"
    opts = {"database": "postgres", "application_name": name, **options}
    with override_settings(PUBSUB_BACKEND="postgres", PUBSUB_URL=url, PUBSUB_OPTIONS=opts):
        backend = get_backend()
        assert isinstance(backend, PostgresBackend)
        try:
            yield backend
        finally:
            backend.close()


def other_session() -> psycopg.Connection[Any]:
    """A plain session on the test database, as another process would have."""
    params = connections["postgres"].get_connection_params()
    keep = {k: v for k, v in params.items() if k in {"dbname", "user", "password", "host", "port"}}
    return psycopg.connect(autocommit=True, **keep)


@NATIVE
def test_publish_inside_atomic_arrives_at_commit():
    channel = unique()
    with native() as backend, backend.subscriber() as sub, other_session() as other:
        assert backend.defers_natively
        inbox = listen(sub, channel)
        with transaction.atomic(using="postgres"):
            Event.objects.using("postgres").create(note="with a publish")
            publish(channel, "in the transaction")
            other.execute("SELECT pg_notify(%s, 'marker')", [channel])
            inbox.wait_payload("marker")
            assert inbox.payloads == ["marker"]
        inbox.wait_payload("in the transaction")
        assert inbox.payloads == ["marker", "in the transaction"]


@NATIVE
def test_rollback_drops_publish():
    channel = unique()
    with native() as backend, backend.subscriber() as sub, other_session() as other:
        inbox = listen(sub, channel)
        with pytest.raises(RuntimeError), transaction.atomic(using="postgres"):
            Event.objects.using("postgres").create(note="rolled back")
            publish(channel, "rolled back")
            raise RuntimeError("roll back")
        other.execute("SELECT pg_notify(%s, 'marker')", [channel])
        inbox.wait_payload("marker")
        assert inbox.payloads == ["marker"]
        assert not Event.objects.using("postgres").filter(note="rolled back").exists()


@NATIVE
def test_publish_outside_a_transaction_is_sent_at_once():
    channel = unique()
    with native() as backend, backend.subscriber() as sub:
        inbox = listen(sub, channel)
        publish(channel, "now")
        inbox.wait_payload("now")


@NATIVE
def test_publish_on_commit_off_sends_inside_atomic_at_once():
    channel = unique()
    with (
        override_settings(PUBSUB_PUBLISH_ON_COMMIT=False),
        native() as backend,
        backend.subscriber() as sub,
    ):
        inbox = listen(sub, channel)
        with transaction.atomic(using="postgres"):
            publish(channel, "before commit")
            inbox.wait_payload("before commit")


@NATIVE
def test_listener_has_its_own_session_so_orm_queries_cannot_swallow_messages():
    channel = unique()
    with native() as backend, backend.subscriber() as sub:
        inbox = listen(sub, channel)
        django = connections["postgres"]
        with django.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            [(django_pid,)] = cursor.fetchall()
            cursor.execute(
                "SELECT pid, datname FROM pg_stat_activity WHERE application_name = %s",
                [backend.listener_name],
            )
            [(listener_pid, datname)] = cursor.fetchall()
        assert listener_pid != django_pid
        assert datname == django.settings_dict["NAME"]
        for number in range(20):
            publish(channel, str(number))
            Event.objects.using("postgres").create(note=str(number))
            assert Event.objects.using("postgres").count() == number + 1
        inbox.wait_for(lambda ms: len(ms) == 20, "20 messages")
        assert inbox.payloads == [str(n) for n in range(20)]


@NATIVE
def test_url_mode_defers_to_commit_of_the_configured_alias():
    """With PUBSUB_URL the layer publishes on its own connection, after commit."""
    channel = unique()
    params = connections["postgres"].get_connection_params()
    url = psycopg.conninfo.make_conninfo(
        **{k: v for k, v in params.items() if k in {"dbname", "user", "password", "host", "port"}}
    )
    with native(url) as backend, backend.subscriber() as sub:
        assert not backend.defers_natively
        inbox = listen(sub, channel)
        with pytest.raises(RuntimeError), transaction.atomic(using="postgres"):
            publish(channel, "rolled back")
            raise RuntimeError("roll back")
        with transaction.atomic(using="postgres"):
            publish(channel, "committed")
            assert backend.stats["published"] == 0
        inbox.wait_payload("committed")
        assert inbox.payloads == ["committed"]


# -- payloads and names ------------------------------------------------------------

PAYLOADS = [
    "",
    "unblock",
    "héllo wörld ☃ 日本語 🐘",
    "quotes ' \" and backslashes \\ \\\\ and $1 %s %(x)s {}",
    "line one\nline two\r\n\ttabbed",
    "x" * 7999,
    "é" * 3999 + "a",  # 7,999 bytes of two-byte characters
    "🐘" * 1999 + "abc",  # 7,999 bytes of four-byte characters
]


def test_payloads_arrive_byte_exact_at_the_layer_and_at_a_plain_listen(pg):
    channel = unique("Payloads")
    with pg.configured() as backend, backend.subscriber() as sub, pg.connect() as plain:
        inbox = listen(sub, channel)
        plain.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel)))
        for payload in PAYLOADS:
            assert len(payload.encode()) <= 7999
            backend.publish(channel, payload)
        inbox.wait_for(lambda ms: len(ms) == len(PAYLOADS), "every payload")
        assert inbox.payloads == PAYLOADS
        assert bare_notifies(plain, len(PAYLOADS)) == [(channel, p) for p in PAYLOADS]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ("x" * 8000, "8000 bytes.*limit is 7999"),
        ("é" * 4000, "8000 bytes.*limit is 7999"),
        ("nul \x00 inside", "NUL"),
    ],
    ids=["8000-ascii", "8000-two-byte", "nul"],
)
def test_payload_the_server_cannot_carry_is_refused_before_sending(pg, payload, match):
    channel = unique()
    with pg.configured() as backend, backend.subscriber() as sub:
        inbox = listen(sub, channel)
        with pytest.raises(InvalidPayload, match=match):
            backend.publish(channel, payload)
        backend.publish(channel, "marker")
        inbox.wait_payload("marker")
        assert inbox.payloads == ["marker"]
        assert backend.stats["publish_errors"] == 0


NAMES = ["UPPER", "Mixed.Case-Name", "dots.and.dashes-1", "ünïcödé", "a" * 63, "select", "1st"]


def test_names_that_need_quoting_work_and_are_case_sensitive(pg):
    with pg.configured() as backend, backend.subscriber() as sub, pg.connect() as plain:
        inboxes = {name: listen(sub, name) for name in NAMES}
        lower = listen(sub, "mixed.case-name")
        for name in NAMES:
            plain.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(name)))
        for name in NAMES:
            backend.publish(name, f"to {name}")
        for name, inbox in inboxes.items():
            inbox.wait_payload(f"to {name}")
            assert inbox.payloads == [f"to {name}"]
        assert bare_notifies(plain, len(NAMES)) == [(n, f"to {n}") for n in NAMES]
        backend.publish("mixed.case-name", "lower")
        lower.wait_payload("lower")
        assert lower.payloads == ["lower"]
        assert inboxes["Mixed.Case-Name"].payloads == ["to Mixed.Case-Name"]


INJECTIONS = [
    'x"; DROP TABLE victim; --',
    "x'); DROP TABLE victim; --",
    "x; DROP TABLE victim",
    'x" , "y',
]


def test_sql_injection_through_names_is_refused_and_through_payloads_is_data(pg):
    with pg.connect() as plain:
        plain.execute("CREATE TABLE IF NOT EXISTS victim (x int)")
    channel = unique()
    with pg.configured() as backend, backend.subscriber() as sub:
        inbox = listen(sub, channel)
        for name in INJECTIONS:
            with pytest.raises(InvalidChannel, match="contains"):
                backend.publish(name, "x")
            with pytest.raises(InvalidChannel, match="contains"):
                sub.subscribe(name, inbox)
        # What validation lets through is still only ever a quoted identifier.
        sneaky = "victim)--x(DROP.TABLE"
        sneaky_inbox = listen(sub, sneaky)
        payloads = [name + " ${x} $$ E'\\x00'" for name in INJECTIONS]
        for payload in payloads:
            backend.publish(channel, payload)
        backend.publish(sneaky, "sneaky")
        inbox.wait_for(lambda ms: len(ms) == len(payloads), "the payloads")
        sneaky_inbox.wait_payload("sneaky")
        assert inbox.payloads == payloads
    with pg.connect() as plain:
        assert plain.execute("SELECT to_regclass('victim') IS NOT NULL").fetchone() == (True,)


# -- interoperability with plain clients ---------------------------------------------


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_notify_from_psql_reaches_subscribers_unchanged(pg):
    with pg.configured() as backend, backend.subscriber() as sub:
        wakeup = listen(sub, "pulp_worker_wakeup")
        cancel = listen(sub, "pulp_worker_cancel")
        task = str(uuid.uuid4())
        for command in (
            """NOTIFY "pulp_worker_wakeup", 'unblock'""",
            "NOTIFY pulp_worker_wakeup, 'handle'",  # unquoted, as stock Pulp writes it
            f"SELECT pg_notify('pulp_worker_cancel', '{task}')",
        ):
            subprocess.run(["psql", pg.url, "-X", "-q", "-c", command], check=True, timeout=60)
        wakeup.wait_for(lambda ms: len(ms) == 2, "two wakeups")
        cancel.wait_payload(task)
        assert wakeup.payloads == ["unblock", "handle"]
        assert [(m.channel, m.resync) for m in wakeup.messages] == [
            ("pulp_worker_wakeup", False)
        ] * 2


def test_publish_reaches_a_plain_psycopg_listen_unchanged(pg):
    with pg.configured(), pg.connect() as plain:
        plain.execute("LISTEN pulp_worker_wakeup")  # as stock Pulp's worker does
        plain.execute("LISTEN pulp_worker_cancel")
        task = str(uuid.uuid4())
        publish("pulp_worker_wakeup", "unblock")
        publish("pulp_worker_cancel", task)
        assert bare_notifies(plain, 2) == [
            ("pulp_worker_wakeup", "unblock"),
            ("pulp_worker_cancel", task),
        ]


# -- processes -------------------------------------------------------------------------


def _child(channel: str, expected: int, ready: Any, report: Any) -> None:
    got: list[str] = []
    try:
        backend = get_backend()  # a new pid: the child builds its own
        with backend.subscriber() as sub:
            sub.subscribe(channel, lambda m: got.append(m.payload))
            ready.send(sub.connected)
            deadline = time.monotonic() + PATIENCE
            while len(got) < expected and time.monotonic() < deadline:
                sub.dispatch(timeout=1)
    finally:
        report.send(got)


def test_many_subscribers_in_separate_processes_each_get_every_message(pg):
    children, channel, expected = 8, unique(), [f"message {n}" for n in range(5)]
    context = multiprocessing.get_context("fork")
    with pg.configured() as backend:
        backend.publish(channel, "before the fork")  # the parent's publisher is open
        pipes, processes = [], []
        for _ in range(children):
            ready_r, ready_w = context.Pipe(duplex=False)
            report_r, report_w = context.Pipe(duplex=False)
            process = context.Process(
                target=_child, args=(channel, len(expected), ready_w, report_w)
            )
            process.start()
            pipes.append((ready_r, report_r))
            processes.append(process)
        try:
            for ready_r, _ in pipes:
                assert ready_r.poll(PATIENCE) and ready_r.recv() is True
            # Sessions of the module's earlier tests may take a moment to end.
            wait_until(lambda: backend.describe()["listeners"] == children, PATIENCE, "counts")
            for payload in expected:
                backend.publish(channel, payload)
            reports = [
                report_r.recv() if report_r.poll(PATIENCE * 2) else None for _, report_r in pipes
            ]
        finally:
            for process in processes:
                process.join(PATIENCE)
                if process.is_alive():
                    process.kill()
        assert reports == [expected] * children
        assert [p.exitcode for p in processes] == [0] * children
        # The parent's own connection survived its children.
        with backend.subscriber() as sub:
            inbox = listen(sub, channel)
            backend.publish(channel, "after")
            inbox.wait_payload("after")


def _publish_from_child(backend: PostgresBackend, channel: str, report: Any) -> None:
    try:
        backend.publish(channel, "from the child")  # the parent's backend object
        backend.close()  # closes what the child opened, nothing of the parent's
        report.send("ok")
    except BaseException as exc:
        report.send(repr(exc))


def test_a_forked_child_never_touches_the_parents_connections(pg):
    channel = unique()
    context = multiprocessing.get_context("fork")
    with pg.configured() as backend, backend.subscriber() as sub:
        inbox = listen(sub, channel)
        backend.publish(channel, "parent")
        parents = backend._publishing.get().session
        assert parents is not None
        report_r, report_w = context.Pipe(duplex=False)
        child = context.Process(target=_publish_from_child, args=(backend, channel, report_w))
        child.start()
        assert report_r.poll(PATIENCE) and report_r.recv() == "ok"
        child.join(PATIENCE)
        assert child.exitcode == 0
        backend.publish(channel, "parent again")
        assert backend._publishing.get().session is parents
        inbox.wait_payload("parent again")
        assert inbox.payloads == ["parent", "from the child", "parent again"]
        assert sub.connected and sub.stats["reconnects"] == 0


# -- faults -----------------------------------------------------------------------------


@contextlib.contextmanager
def three_subscribers(backend: PostgresBackend) -> Iterator[list[Inbox]]:
    subs = [backend.subscriber() for _ in range(3)]
    try:
        yield [listen(sub, f"fault_{n % 2}") for n, sub in enumerate(subs)]
    finally:
        for sub in subs:
            sub.close()


def assert_all_recover(backend: PostgresBackend, inboxes: list[Inbox], tag: str) -> None:
    for inbox in inboxes:
        inbox.wait_resync()
        assert inbox.sub.connected
    for channel in ("fault_0", "fault_1"):
        backend.publish(channel, f"after {tag}")
    for inbox in inboxes:
        inbox.wait_payload(f"after {tag}")


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_subscribers_recover_after_a_server_restart(broken, mode):
    with broken.configured(**FAST) as backend, three_subscribers(backend) as inboxes:
        backend.publish("fault_0", "before")
        broken.restart(mode)
        assert_all_recover(backend, inboxes, mode)
        assert all(inbox.sub.stats["reconnects"] >= 1 for inbox in inboxes)


def test_subscribers_recover_after_their_sessions_are_terminated(broken):
    with broken.configured(**FAST) as backend, three_subscribers(backend) as inboxes:
        assert broken.kill_subscriber_connections() == 3
        assert_all_recover(backend, inboxes, "terminate")


def test_subscribers_recover_from_a_frozen_server_through_the_probe(broken):
    with broken.configured(**FAST) as backend, three_subscribers(backend) as inboxes:
        subs = [inbox.sub for inbox in inboxes]
        broken.freeze()
        try:
            wait_until(lambda: all(not s.connected for s in subs), PATIENCE, "probes to fail")
            assert all(s.stats["probe_failures"] >= 1 for s in subs)
        finally:
            broken.thaw()
        assert_all_recover(backend, inboxes, "freeze")


@pytest.mark.parametrize("fault", ["stall", "cut"])
def test_subscribers_recover_from_a_half_open_or_reset_link(broken, fault):
    """A black hole (nothing is forwarded, not even a FIN) and a reset, between us and it."""
    with TcpProxy(broken.server.host, broken.server.port) as proxy:
        settings = {**broken.settings(**FAST), "PUBSUB_URL": proxy.url_for(broken.url)}
        with override_settings(**settings):
            backend = get_backend()
            with three_subscribers(backend) as inboxes:
                subs = [inbox.sub for inbox in inboxes]
                if fault == "stall":
                    proxy.stall()
                    try:
                        wait_until(lambda: all(not s.connected for s in subs), PATIENCE, "probes")
                        assert all(s.stats["probe_failures"] >= 1 for s in subs)
                    finally:
                        proxy.resume()
                else:
                    proxy.cut()
                assert_all_recover(backend, inboxes, fault)
            backend.close()


def test_publish_to_a_frozen_server_gives_up_with_publish_error(broken):
    with broken.configured(**FAST) as backend:
        backend.publish("fault_0", "warm")  # the publisher's connection is open
        broken.freeze()
        outcome: dict[str, BaseException] = {}
        try:

            def attempt() -> None:
                try:
                    backend.publish("fault_0", "frozen")
                except BaseException as exc:
                    outcome["error"] = exc

            thread = threading.Thread(target=attempt, daemon=True)
            thread.start()
            thread.join(PATIENCE)
            assert not thread.is_alive(), "publish hung on a frozen server"
        finally:
            broken.thaw()
        assert isinstance(outcome.get("error"), PublishError)
        assert "did not answer in time" in str(outcome["error"])
        with backend.subscriber() as sub:
            inbox = listen(sub, "fault_0")
            backend.publish("fault_0", "thawed")
            inbox.wait_payload("thawed")


def test_native_publish_recovers_from_a_restart_outside_a_transaction(broken, django_db_blocker):
    with (
        django_db_blocker.unblock(),
        django_alias(broken.server) as alias,
        native(database=alias, **FAST) as backend,
        three_subscribers(backend) as inboxes,
    ):
        backend.publish("fault_0", "before")
        dead = connections[alias].connection
        broken.restart("fast")
        assert_all_recover(backend, inboxes, "restart")
        # Django's connection had died with the server: publish opened a new one.
        assert connections[alias].connection is not dead
        with pytest.raises(PublishError), transaction.atomic(using=alias):
            broken.restart("immediate")
            backend.publish("fault_0", "lost with its transaction")


def test_describe_warns_when_the_notification_queue_is_over_half_full(pg, monkeypatch):
    from pulp_pubsub.backends.postgres import backend as postgres

    # A queue cannot be filled in a test (it holds gigabytes), so the server is
    # asked a question with a known answer in place of the real one.
    monkeypatch.setattr(postgres, "COUNT", b"SELECT 2 + 0 * length($1), 0.75::float8")
    with pg.configured() as backend:
        info = backend.describe()
    assert (info["listeners"], info["notification_queue_usage"]) == (2, 0.75)
    assert len(info["warnings"]) == 1 and "75% full" in info["warnings"][0]


def test_errors_and_describe_never_show_the_password():
    secret = "Sup3r-secret-pw"
    with PostgresServer(password=secret) as server:
        harness = PostgresHarness(server)
        with harness.configured(**FAST) as backend, backend.subscriber() as sub:
            inbox = listen(sub, "secret")
            backend.publish("secret", "ok")
            inbox.wait_payload("ok")
            info = backend.describe()
            assert secret not in repr(info) and ":***@" in info["url"]
            assert info["listeners"] == 1 and info["warnings"] == []
        wrong = server.url.replace(secret, "Wr0ng-secret-pw")
        with override_settings(**{**harness.settings(**FAST), "PUBSUB_URL": wrong}):
            backend = get_backend()
            with backend.subscriber() as sub:
                sub.subscribe("secret", inbox)
                wait_until(lambda: sub.last_error is not None, PATIENCE, "a failed connect")
                assert "password authentication failed" in sub.last_error
                with pytest.raises(PublishError) as info:
                    backend.publish("secret", "x")
                text = f"{sub.last_error} {info.value} {backend.describe()}"
                assert "Wr0ng-secret-pw" not in text and secret not in text
