"""The pulpcore integration's parts, on the memory backend, without pulpcore.

pulpcore's own classes are exercised by tests/test_pulpcore_e2e.py (in a
virtualenv with pulpcore); here a small stand-in with the attributes
pulpcore's worker has checks the translation, the select() seam and the
resync rules, and the checks and version gate are called directly.
"""

from __future__ import annotations

import os
import select
import types
import uuid
from datetime import datetime
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from pulp_pubsub import CANCEL, METRICS_HEARTBEAT, WAKEUP, Message, get_backend, registry
from pulp_pubsub.contrib import pulpcore as integration
from pulp_pubsub.contrib.pulpcore import checks, compat, publishers
from pulp_pubsub.contrib.pulpcore import worker as worker_seam
from pulp_pubsub.contrib.pulpcore.sql import Statement, UntranslatableStatement, parse

from .util import dispatch_until

STAMP = "2026-11-26 22:02:04.317465+00:00"
MEMORY = {"PUBSUB_BACKEND": "memory", "PUBSUB_URL": None, "PUBSUB_CHANNEL_PREFIX": ""}


@pytest.fixture
def backend():
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}):
        yield get_backend()


@pytest.fixture
def heard(backend):
    """Every message published on pulpcore's channels, as (channel, payload)."""
    got: list[tuple[str, str]] = []
    with backend.subscriber() as sub:
        for channel in (WAKEUP, CANCEL, METRICS_HEARTBEAT):
            sub.subscribe(channel, lambda m: got.append((m.channel, m.payload)))

        def take(expect: int = 1, wait: float = 2.0) -> list[tuple[str, str]]:
            # Messages published one after another may reach the listener in
            # separate reads: dispatch until as many as expected have arrived.
            if expect:
                dispatch_until(sub, lambda: len(got) >= expect)
            else:
                sub.dispatch(timeout=wait)
            out = list(got)
            got.clear()
            return out

        yield take


# -- the SQL pulpcore sends -----------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "params", "expected"),
    [
        ("LISTEN pulp_worker_cancel", None, Statement("listen", "pulp_worker_cancel")),
        ("UNLISTEN pulp_worker_wakeup", None, Statement("unlisten", "pulp_worker_wakeup")),
        ('LISTEN "Mixed_Case"', None, Statement("listen", "Mixed_Case")),
        ("listen Folded", None, Statement("listen", "folded")),
        (
            "SELECT pg_notify('pulp_worker_wakeup', %s)",
            ("unblock",),
            Statement("notify", "pulp_worker_wakeup", "unblock"),
        ),
        (
            "SELECT pg_notify(%s, %s)",
            ("pulp_worker_cancel", "abc"),
            Statement("notify", "pulp_worker_cancel", "abc"),
        ),
        (
            "NOTIFY pulp_worker_metrics_heartbeat, '2026-11-26 22:02:04.317465+00:00'",
            None,
            Statement(
                "notify", "pulp_worker_metrics_heartbeat", "2026-11-26 22:02:04.317465+00:00"
            ),
        ),
        ("NOTIFY ch, 'it''s'", None, Statement("notify", "ch", "it's")),
        ("NOTIFY ch", None, Statement("notify", "ch", "")),
        ("SELECT 1", None, None),
        ("UPDATE core_task SET state = %s", ("waiting",), None),
    ],
)
def test_pulpcores_statements_are_read_exactly(sql, params, expected):
    assert parse(sql, params) == expected


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("SELECT pg_notify('pulp_worker_wakeup', %s)", ()),
        ("SELECT pg_notify('pulp_worker_wakeup', %s), now()", ("unblock",)),
        ("LISTEN a; LISTEN b", None),
        ("NOTIFY ch, %s", ("payload",)),
    ],
)
def test_pub_sub_sql_that_cannot_be_translated_raises(sql, params):
    with pytest.raises(UntranslatableStatement):
        parse(sql, params)


def test_the_heartbeat_payload_pulpcore_sends_passes_the_channel_check():
    now = timezone.now()
    payload = str(now)  # what pulpcore sends: a space, not a "T"
    assert " " in payload
    registry.check_payload(METRICS_HEARTBEAT, payload)
    assert datetime.fromisoformat(payload) == now


# -- the publishing side --------------------------------------------------------------


class Untouchable:
    """A database connection that fails any use."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the database connection was used ({name})")


def test_wakeup_worker_statement_publishes_without_touching_the_database(heard):
    stand_in = publishers.NotifyingConnection(Untouchable())
    with stand_in.connection.cursor() as cursor:  # exactly pulpcore's wakeup_worker()
        cursor.execute("SELECT pg_notify('pulp_worker_wakeup', %s)", ("unblock",))
    assert heard() == [(WAKEUP, "unblock")]


@pytest.mark.django_db(transaction=True)
def test_cancel_statement_inside_atomic_publishes_at_commit(heard):
    stand_in = publishers.NotifyingConnection(connection)
    task_id = str(uuid.uuid4())
    with transaction.atomic():
        with stand_in.cursor() as cursor:  # exactly pulpcore's cancel_task()
            cursor.execute("SELECT pg_notify('pulp_worker_cancel', %s)", (task_id,))
        assert heard(expect=0, wait=0) == []
    assert heard() == [(CANCEL, task_id)]


@pytest.mark.django_db(transaction=True)
def test_rolled_back_wakeup_is_never_published(heard):
    stand_in = publishers.NotifyingConnection(connection)
    with pytest.raises(RuntimeError), transaction.atomic():
        with stand_in.connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify('pulp_worker_wakeup', %s)", ("unblock",))
        raise RuntimeError("rollback")
    with stand_in.connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify('pulp_worker_wakeup', %s)", ("handle",))
    assert heard() == [(WAKEUP, "handle")]


@pytest.mark.django_db
def test_other_sql_on_the_stand_in_reaches_the_database(backend):
    stand_in = publishers.NotifyingConnection(connection)
    with stand_in.cursor() as cursor:
        cursor.execute("SELECT 40 + 2")
        assert cursor.fetchone() == (42,)
    assert stand_in.vendor == connection.vendor


def test_listen_outside_the_worker_is_refused(backend):
    with pytest.raises(UntranslatableStatement):
        publishers.NotifyingConnection(connection).cursor().execute("LISTEN x")


def test_installing_the_publishers_twice_wraps_once():
    module = types.SimpleNamespace(__name__="fake.tasks", connection=connection)
    assert publishers.install(module) is True
    assert publishers.install(module) is False
    assert module.connection.wrapped is connection
    publishers.uninstall(module)
    assert module.connection is connection


# -- the worker side ------------------------------------------------------------------


class StandInWorker:
    """The attributes and calls of pulpcore's PulpcoreWorker the seam relies on."""

    def __init__(self, auxiliary: bool = False) -> None:
        self.auxiliary = auxiliary
        self.task: Any = None
        self.wakeup_unblock = self.wakeup_handle = self.cancel_task = False
        self.cursor: Any = types.SimpleNamespace(close=lambda: None)  # pulpcore's LISTEN cursor
        self.handled: list[Message] = []

    def _pg_notify_handler(self, notification: Any) -> None:
        self.handled.append(notification)
        if notification.channel == WAKEUP and notification.payload == "handle":
            self.wakeup_handle = True

    def run(self, burst: bool = False) -> None:
        self.cursor.execute("LISTEN pulp_worker_cancel")
        if not burst:
            self.cursor.execute("LISTEN pulp_worker_wakeup")
        self.subscribed = self.pubsub.channels
        self.cursor.execute("UNLISTEN pulp_worker_wakeup")
        self.cursor.execute("UNLISTEN pulp_worker_cancel")


@pytest.fixture
def worker_class():
    return worker_seam.make_worker_class(StandInWorker)


@pytest.fixture
def new_worker(backend, worker_class):
    made = []

    def make(**kwargs: Any) -> Any:
        worker = worker_class(**kwargs)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker_seam.select_shim.detach(worker.pubsub)
        worker.pubsub.close()


def test_select_shim_dispatches_before_returning_and_hides_its_fd(new_worker):
    worker = new_worker()
    worker.cursor.execute("LISTEN pulp_worker_wakeup")
    sentinel_r, _ = os.pipe()
    worker.cursor.execute("SELECT pg_notify('pulp_worker_wakeup', %s)", ("handle",))
    readable, _, _ = worker_seam.select_shim.select([sentinel_r], [], [], 5)
    assert worker.wakeup_handle is True  # set by the handler, in this thread
    assert readable == []


def test_select_shim_is_plain_select_without_a_subscriber():
    shim = worker_seam.SelectShim()
    read_end, write_end = os.pipe()
    os.write(write_end, b"x")
    assert shim.select([read_end], [], [], 0) == ([read_end], [], [])
    assert shim.error is select.error


def test_run_subscribes_through_the_layer_and_closes(new_worker):
    worker = new_worker()
    worker.run(burst=True)
    assert worker.subscribed == [CANCEL]
    assert worker.pubsub.closed

    worker = new_worker()
    worker.run(burst=False)
    assert worker.subscribed == [CANCEL, WAKEUP]


def test_messages_go_to_pulpcores_own_handler(new_worker):
    worker = new_worker()
    message = Message(CANCEL, str(uuid.uuid4()))
    worker.on_pubsub_message(message)
    assert worker.handled == [message]


@pytest.mark.parametrize(("auxiliary", "unblock"), [(False, True), (True, False)])
def test_a_wakeup_resync_sets_both_flags_but_auxiliary_never_unblocks(
    new_worker, auxiliary, unblock
):
    worker = new_worker(auxiliary=auxiliary)
    worker.on_pubsub_message(Message(WAKEUP, "", resync=True))
    assert (worker.wakeup_unblock, worker.wakeup_handle) == (unblock, True)
    assert worker.handled == []


def test_cancel_and_heartbeat_resyncs_without_a_task_change_nothing(new_worker):
    worker = new_worker()
    worker.on_pubsub_message(Message(CANCEL, "", resync=True))
    worker.on_pubsub_message(Message(METRICS_HEARTBEAT, "", resync=True))
    assert (worker.wakeup_unblock, worker.wakeup_handle, worker.cancel_task) == (False,) * 3
    assert worker.handled == []


def test_a_cancel_resync_while_running_asks_whether_the_task_is_canceling(new_worker):
    worker = new_worker()
    worker.task = types.SimpleNamespace(pk=uuid.uuid4())
    worker._task_is_canceling = lambda: True
    worker.on_pubsub_message(Message(CANCEL, "", resync=True))
    assert worker.cancel_task is True


@pytest.mark.django_db(transaction=True)
def test_the_workers_heartbeat_goes_out_only_when_its_transaction_commits(new_worker, heard):
    worker = new_worker()
    lost = str(timezone.now())
    with pytest.raises(RuntimeError), transaction.atomic():
        worker.cursor.execute(f"NOTIFY pulp_worker_metrics_heartbeat, '{lost}'")
        raise RuntimeError("rollback")
    stamp = str(timezone.now())
    with transaction.atomic():
        worker.cursor.execute(f"NOTIFY pulp_worker_metrics_heartbeat, '{stamp}'")
        assert heard(expect=0, wait=0) == []
    assert heard() == [(METRICS_HEARTBEAT, stamp)]


def test_installing_the_worker_rebinds_class_and_select_once():
    module = types.SimpleNamespace(PulpcoreWorker=StandInWorker, select=select)
    assert worker_seam.install(module) is True
    assert worker_seam.install(module) is False
    assert issubclass(module.PulpcoreWorker, StandInWorker)
    assert module.select is worker_seam.select_shim
    worker_seam.uninstall(module)
    assert module.PulpcoreWorker is StandInWorker and module.select is select


# -- version gate, checks and set-up ------------------------------------------------


@pytest.mark.parametrize(
    ("found", "ok"),
    [
        ("3.123.0", True),
        ("3.123.1", True),
        ("3.123.10", True),
        ("3.124.0", False),
        ("3.122.9", False),
        ("4.0.0", False),
        ("banana", False),
        (None, False),
    ],
)
def test_only_the_tested_pulpcore_series_is_accepted(monkeypatch, found, ok):
    monkeypatch.setattr(compat, "pulpcore_version", lambda: found)
    assert (compat.version_problem() is None) is ok


def test_without_pulpcore_nothing_is_installed_and_no_check_speaks():
    state = integration.setup()
    assert state.installed is False
    assert checks.check_pulpcore_version() == []
    assert checks.check_pulpcore_seams() == []
    assert checks.check_pulpcore_mode() == []


@pytest.fixture
def pulp_installed(monkeypatch):
    real = checks.apps.is_installed
    monkeypatch.setattr(
        checks.apps, "is_installed", lambda name: name == integration.PULPCORE_APP or real(name)
    )


def test_an_untested_pulpcore_fails_the_check(pulp_installed, monkeypatch):
    monkeypatch.setattr(compat, "pulpcore_version", lambda: "3.124.0")
    monkeypatch.setattr(checks, "version_problem", compat.version_problem)
    errors = checks.check_pulpcore_version()
    assert [e.id for e in errors] == ["pulp_pubsub.E101"]
    assert "3.124.0" in errors[0].msg and "pulpcore>=3.123,<3.124" in errors[0].hint


def test_moved_seams_fail_the_check(pulp_installed, monkeypatch):
    monkeypatch.setattr(checks, "version_problem", lambda: None)
    monkeypatch.setattr(checks, "seam_problems", lambda: ["x no longer contains y"])
    assert [e.id for e in checks.check_pulpcore_seams()] == ["pulp_pubsub.E102"]


def test_polling_redis_workers_turn_the_integration_off(pulp_installed):
    with override_settings(WORKER_TYPE="redis"):
        assert [w.id for w in checks.check_pulpcore_mode()] == ["pulp_pubsub.W101"]
        assert checks.check_pulpcore_version() == []


def test_turning_the_integration_off_with_another_backend_warns(pulp_installed):
    with override_settings(PUBSUB_PULPCORE_INTEGRATION=False, PUBSUB_BACKEND="redis"):
        assert [w.id for w in checks.check_pulpcore_mode()] == ["pulp_pubsub.W102"]
    with override_settings(PUBSUB_PULPCORE_INTEGRATION=False, PUBSUB_BACKEND="postgres"):
        assert checks.check_pulpcore_mode() == []


# -- moving a fleet: also-NOTIFY and the bridge -------------------------------------


class RecordingCursor:
    def __init__(self) -> None:
        self.executed: list[tuple[str, Any]] = []

    def execute(self, sql: str, params: Any = None) -> None:
        self.executed.append((sql, params))

    def close(self) -> None:
        pass


@pytest.fixture
def also_notify(monkeypatch):
    """PUBSUB_PULPCORE_ALSO_NOTIFY, without override_settings (which rebuilds the backend)."""

    def set_to(value: bool) -> None:
        monkeypatch.setattr(publishers, "also_notify", lambda: value)
        monkeypatch.setattr(worker_seam, "also_notify", lambda: value)

    return set_to


def test_also_notify_reads_its_setting():
    assert publishers.also_notify() is False
    with override_settings(PUBSUB_PULPCORE_ALSO_NOTIFY=True):
        assert publishers.also_notify() is True


@pytest.mark.parametrize("also", [False, True])
def test_also_notify_sends_pulpcores_own_statement_as_well(heard, also_notify, also):
    real = RecordingCursor()
    sql, params = "SELECT pg_notify('pulp_worker_wakeup', %s)", ("unblock",)
    also_notify(also)
    publishers.TranslatingCursor(lambda: real).execute(sql, params)
    assert heard() == [(WAKEUP, "unblock")]
    assert real.executed == ([(sql, params)] if also else [])


def test_also_notify_on_the_worker_sends_the_heartbeat_to_postgresql_too(
    new_worker, heard, also_notify
):
    worker = new_worker()
    worker.cursor.real = RecordingCursor()
    sql = f"NOTIFY pulp_worker_metrics_heartbeat, '{STAMP}'"
    also_notify(True)
    worker.cursor.execute(sql)
    assert heard() == [(METRICS_HEARTBEAT, STAMP)]
    assert worker.cursor.real.executed == [(sql, None)]


def test_the_bridge_forwards_messages_and_turns_a_resync_into_a_wakeup(heard):
    from pulp_pubsub.contrib.pulpcore.bridge import Bridge

    bridge = Bridge("postgresql://nobody@127.0.0.1:1/none")  # never connected here
    task_id = str(uuid.uuid4())
    bridge.forward(Message(CANCEL, task_id))
    bridge.forward(Message(WAKEUP, "", resync=True))
    bridge.forward(Message(CANCEL, "", resync=True))  # no ids to forward
    assert heard(expect=2) == [(CANCEL, task_id), (WAKEUP, "")]
    assert bridge.forwarded == 1


def test_the_bridge_refuses_to_forward_postgresql_onto_itself():
    from pulp_pubsub.contrib.pulpcore.bridge import Bridge

    elsewhere = {"PUBSUB_BACKEND": "postgres", "PUBSUB_URL": "postgresql://nobody@127.0.0.1:1/none"}
    with override_settings(**elsewhere), pytest.raises(SystemExit):
        Bridge("postgresql://nobody@127.0.0.1:1/none")
