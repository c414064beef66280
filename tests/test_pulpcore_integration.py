"""The pulpcore integration's parts, on the memory backend, without pulpcore.

pulpcore's own classes are exercised by tests/test_pulpcore_e2e.py (in a
virtualenv with pulpcore); here a small stand-in with the attributes
pulpcore's worker has checks the translation, the select() seam and the
resync rules, and the checks and version gate are called directly.
"""

from __future__ import annotations

import math
import os
import select
import time
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
from pulp_pubsub.registry import RUNNERS, UNBLOCKERS

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

        def note(message: Message) -> None:
            got.append((message.channel, message.payload))

        for channel in (WAKEUP, CANCEL, METRICS_HEARTBEAT):
            sub.subscribe(channel, note)
        for group in (UNBLOCKERS, RUNNERS):  # a member of both: it hears targeted wake-ups too
            sub.subscribe(WAKEUP, note, group=group)

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
@pytest.mark.backend
def test_a_backend_outage_never_raises_into_pulpcore_and_is_logged_once(caplog):
    from pulp_pubsub_tools.testing import RedisServer

    stand_in = publishers.NotifyingConnection(Untouchable())

    def wakeup_worker() -> None:  # exactly pulpcore's wakeup_worker()
        with stand_in.connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify('pulp_worker_wakeup', %s)", ("unblock",))

    with RedisServer() as server:
        settings = {**MEMORY, "PUBSUB_BACKEND": "redis", "PUBSUB_URL": server.url}
        with override_settings(**settings, PUBSUB_OPTIONS={}):
            backend = get_backend()
            wakeup_worker()
            server.stop()
            for _ in range(3):
                wakeup_worker()
            assert backend.flush()  # sent without waiting: the outcomes come from the sender
            errors = [r for r in caplog.records if r.name == publishers.__name__]
            assert [r.levelname for r in errors] == ["ERROR"]
            assert "Pulp goes on" in errors[0].getMessage()
            assert backend.stats["pulpcore_messages_dropped"] == 3
            server.start()
            wakeup_worker()
            assert backend.flush()
            back = [r for r in caplog.records if r.name == publishers.__name__][1:]
            assert [r.getMessage() for r in back] == [
                "pulp-pubsub is sending pulpcore's messages again; 3 could not be sent."
            ]
            assert backend.stats["published"] == 2


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
        #: What unblock_tasks() returns, in turn: None when the lock was taken.
        self.unblock_results: list[bool | None] = []

    def unblock_tasks(self) -> bool | None:
        self.wakeup_unblock = False
        return self.unblock_results.pop(0) if self.unblock_results else False

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
        worker.runners_wanted = lambda: 1  # pulpcore's Task query, which needs pulpcore
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
    message = Message(WAKEUP, "handle")
    worker.on_pubsub_message(message)
    assert worker.handled == [message]


def test_a_cancel_the_database_confirms_goes_to_pulpcores_handler(new_worker):
    worker = new_worker()
    worker.task = types.SimpleNamespace(pk=uuid.uuid4())
    worker._task_is_canceling = lambda: True
    message = Message(CANCEL, str(worker.task.pk))
    worker.on_pubsub_message(message)
    assert worker.handled == [message]


def test_a_forged_cancel_of_the_running_task_is_ignored_and_counted(new_worker, caplog):
    worker = new_worker()
    worker.task = types.SimpleNamespace(pk=uuid.uuid4())
    worker._task_is_canceling = lambda: False  # the database: still running
    before = get_backend().stats["pulpcore_cancels_refused"]
    worker.on_pubsub_message(Message(CANCEL, str(worker.task.pk)))
    assert worker.handled == [] and worker.cancel_task is False
    assert get_backend().stats["pulpcore_cancels_refused"] == before + 1
    assert "does not show it as being canceled" in caplog.text


def test_a_cancel_for_another_task_never_asks_the_database(new_worker):
    worker = new_worker()
    worker.task = types.SimpleNamespace(pk=uuid.uuid4())
    worker._task_is_canceling = lambda: pytest.fail("asked the database")
    worker.on_pubsub_message(Message(CANCEL, str(uuid.uuid4())))
    worker.task = None
    worker.on_pubsub_message(Message(CANCEL, str(uuid.uuid4())))
    assert worker.handled == [] and worker.cancel_task is False


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
        ("3.105.0", True),
        ("3.105.25", True),
        ("3.114.2", True),
        ("3.123.1", True),
        ("3.123.10", True),
        ("3.124.0", False),
        ("3.104.2", False),
        ("4.0.0", False),
        ("banana", False),
        (None, False),
    ],
)
def test_the_supported_series_run_from_3_105_to_3_123(monkeypatch, found, ok):
    monkeypatch.setattr(compat, "pulpcore_version", lambda: found)
    assert (compat.version_problem() is None) is ok


def write_tasking(tmp_path, worker_source: str) -> Any:
    (tmp_path / "worker.py").write_text(worker_source)
    return compat.pubsub_sites(tmp_path)


def test_the_site_count_reads_statements_not_docstrings(tmp_path):
    found = write_tasking(
        tmp_path,
        '''
class PulpcoreWorker:
    """Signals the worker via Postgres LISTEN."""

    def run(self):
        self.cursor.execute("LISTEN pulp_worker_cancel")

    def record_unblocked_waiting_tasks_metric(self, now):
        self.cursor.execute(f"NOTIFY pulp_worker_metrics_heartbeat, '{str(now)}'")
''',
    )
    assert found == {
        ("worker", "PulpcoreWorker.run", "LISTEN pulp_worker_cancel"): 1,
        (
            "worker",
            "PulpcoreWorker.record_unblocked_waiting_tasks_metric",
            "NOTIFY pulp_worker_metrics_heartbeat, '{}'",
        ): 1,
    }


def test_a_new_listen_notify_site_is_a_seam_problem(tmp_path, monkeypatch):
    source = "\n".join(
        f"def {scope.split('.')[-1]}():\n    execute({text!r})\n"
        for (module, scope, text) in compat.EXPECTED_SITES
        if module == "tasks"
    )
    (tmp_path / "tasks.py").write_text(source)
    worker = ["class PulpcoreWorker:"]
    for (module, scope, text), n in compat.EXPECTED_SITES.items():
        if module == "worker":
            name = scope.split(".")[-1]
            worker.append(f"    def {name}(self):\n" + f"        execute({text!r})\n" * n)
    (tmp_path / "worker.py").write_text("\n".join(worker))
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name: spec)
    # Functions of the same name in one class collapse; count what the file says.
    assert compat.pubsub_sites(tmp_path) == compat.EXPECTED_SITES
    assert compat.site_problems() == []

    with open(tmp_path / "worker.py", "a") as f:
        f.write('\n    def dispatch_now(self):\n        execute("NOTIFY pulp_worker_wakeup")\n')
    problems = compat.site_problems()
    assert len(problems) == 1
    assert "PulpcoreWorker.dispatch_now sends 'NOTIFY pulp_worker_wakeup'" in problems[0]

    (tmp_path / "tasks.py").write_text("")
    assert any("wakeup_worker no longer sends" in p for p in compat.site_problems())


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


def test_a_pulpcore_outside_the_series_with_matching_seams_is_a_warning(
    pulp_installed, monkeypatch
):
    monkeypatch.setattr(compat, "pulpcore_version", lambda: "3.124.0")
    monkeypatch.setattr(checks, "version_problem", compat.version_problem)
    monkeypatch.setattr(checks, "seam_problems", lambda: [])
    found = checks.check_pulpcore_version()
    assert [w.id for w in found] == ["pulp_pubsub.W103"]
    assert "3.124.0" in found[0].msg and "pulpcore>=3.105,<3.124" in found[0].msg
    assert checks.check_pulpcore_seams() == []


@pytest.mark.parametrize("version", ["3.123.1", "3.130.0"])
def test_moved_seams_fail_the_check_whatever_the_version(pulp_installed, monkeypatch, version):
    monkeypatch.setattr(compat, "pulpcore_version", lambda: version)
    monkeypatch.setattr(checks, "seam_problems", lambda: ["x no longer contains y"])
    errors = checks.check_pulpcore_seams()
    assert [e.id for e in errors] == ["pulp_pubsub.E102"]
    assert "PUBSUB_PULPCORE_INTEGRATION = False" in errors[0].hint
    assert checks.check_pulpcore_version() == []  # the error says it all


@pytest.mark.parametrize("program", ["pulpcore-worker", "pulpcore-api", "pulpcore-content"])
def test_a_serving_process_on_another_backend_refuses_to_start(monkeypatch, program):
    monkeypatch.setattr(integration.sys, "argv", [f"/usr/bin/{program}"])
    with override_settings(PUBSUB_BACKEND="redis"):
        with pytest.raises(integration.IntegrationUnavailable) as refused:
            integration.fail_closed(["x no longer contains y"], checks.WAY_OUT)
    message = str(refused.value)
    assert "x no longer contains y" in message and "refuses to start" in message
    assert checks.WAY_OUT in message


def test_on_postgresql_a_serving_process_runs_stock_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(integration.sys, "argv", ["/usr/bin/pulpcore-worker"])
    with override_settings(PUBSUB_BACKEND="postgres"):
        integration.fail_closed(["x no longer contains y"], checks.WAY_OUT)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "pulp_pubsub.E102: x no longer contains y" in caplog.text


def test_admin_commands_on_another_backend_start_and_report(monkeypatch, caplog):
    # pulpcore-manager check/migrate must run to show the error (and to migrate).
    monkeypatch.setattr(integration.sys, "argv", ["/usr/bin/pulpcore-manager", "check"])
    with override_settings(PUBSUB_BACKEND="redis"):
        integration.fail_closed(["x no longer contains y"], checks.WAY_OUT)
    assert [r.levelname for r in caplog.records] == ["ERROR"]


def test_redis_workers_without_pulpcores_redis_worker_are_left_polling(pulp_installed):
    # As on pulpcore 3.105, which has no Redis-type worker (here: no pulpcore at all).
    with override_settings(WORKER_TYPE="redis"):
        found = checks.check_pulpcore_mode()
        assert [w.id for w in found] == ["pulp_pubsub.W101"]
        assert "has no Redis-type worker" in found[0].msg
        assert checks.check_pulpcore_version() == [] and checks.check_pulpcore_seams() == []


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


# -- targeted wake-ups ----------------------------------------------------------------


def wakeup(payload: str) -> None:
    """What pulpcore's wakeup_worker() sends, through the publishing seam."""
    with publishers.NotifyingConnection(Untouchable()).connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify('pulp_worker_wakeup', %s)", (payload,))


def wakeups(workers: list[Any]) -> list[list[str]]:
    """Dispatch every worker until the broadcast marker, then what each was handed."""
    wakeup("")  # a broadcast: every worker gets it, after anything targeted before it
    for worker in workers:
        while not any(m.payload == "" for m in worker.handled):
            worker.pubsub.dispatch(timeout=5)
    return [[m.payload for m in w.handled if m.payload] for w in workers]


def listening(new_worker, **kwargs: Any) -> Any:
    worker = new_worker(**kwargs)
    worker.cursor.execute("LISTEN pulp_worker_wakeup")
    return worker


def test_unblock_goes_to_one_non_auxiliary_worker(new_worker):
    workers = [listening(new_worker) for _ in range(3)]
    auxiliary = listening(new_worker, auxiliary=True)
    wakeup("unblock")
    got = wakeups([*workers, auxiliary])
    assert sorted(got[:3]) == [[], [], ["unblock"]]
    assert got[3] == []


def test_handle_goes_to_as_many_idle_workers_as_tasks_are_ready(new_worker):
    workers = [listening(new_worker) for _ in range(5)]
    workers[0].runners_wanted = lambda: 3  # three tasks ready to run
    workers[0].cursor.execute("SELECT pg_notify('pulp_worker_wakeup', %s)", ("handle",))
    # The idle sender takes one itself (it hears its own, as on PostgreSQL)...
    assert workers[0].wakeup_handle is True

    def handed() -> list[list[str]]:
        return [[m.payload for m in w.handled if m.payload == "handle"] for w in workers]

    while sum(map(len, handed()[1:])) < 2:
        for worker in workers:
            worker.pubsub.dispatch(timeout=0.05)
    # ... and two other workers are handed one each; the sender none of theirs.
    got = wakeups(workers)
    assert got[0] == [] and sorted(got[1:]) == [[], [], ["handle"], ["handle"]]


def test_a_busy_sender_hands_every_handle_to_others(new_worker):
    sender, other = listening(new_worker), listening(new_worker)
    sender.task = types.SimpleNamespace(pk=uuid.uuid4())  # its supervise loop unblocked
    worker_seam.select_shim.attach(sender.pubsub, sender)
    worker_seam.select_shim.select([], [], [], 0)  # busy: takes no "handle"
    sender.cursor.execute("SELECT pg_notify('pulp_worker_wakeup', %s)", ("handle",))
    assert sender.wakeup_handle is False
    # Handed to the sender before its pause reached the server, it is given back.
    deadline = time.monotonic() + 10
    while not any(m.payload == "handle" for m in other.handled):
        assert time.monotonic() < deadline, "the handle never reached the idle worker"
        sender.pubsub.dispatch(timeout=0.05)
        other.pubsub.dispatch(timeout=0.05)
    assert wakeups([sender, other]) == [[], ["handle"]]


def test_an_empty_wakeup_stays_a_broadcast(new_worker):
    workers = [listening(new_worker) for _ in range(3)]
    wakeups(workers)  # returns once every worker has had the empty wake-up
    assert all(any(m.payload == "" for m in w.handled) for w in workers)


def test_a_busy_worker_leaves_handle_to_an_idle_one(new_worker):
    busy, idle = listening(new_worker), listening(new_worker)
    busy.task = types.SimpleNamespace(pk=uuid.uuid4())
    worker_seam.select_shim.attach(busy.pubsub, busy)
    worker_seam.select_shim.select([], [], [], 0)  # the busy worker's supervise loop
    for _ in range(3):
        wakeup("handle")
    while len([m for m in idle.handled if m.payload == "handle"]) < 3:
        idle.pubsub.dispatch(timeout=5)
        idle.pubsub.ack()
    assert wakeups([busy, idle])[0] == []


def test_a_wakeup_is_acknowledged_when_the_worker_is_back_in_its_wait(new_worker):
    worker = listening(new_worker)
    sentinel_r, _ = os.pipe()
    wakeup("handle")
    while not worker.wakeup_handle:
        worker_seam.select_shim.select([sentinel_r], [], [], 5)
    assert worker.pubsub.holding == 1  # until it has acted on it
    worker_seam.select_shim.select([sentinel_r], [], [], 0)
    assert worker.pubsub.holding == 0


def test_a_worker_that_finds_the_unblocking_lock_taken_looks_again(new_worker):
    worker = listening(new_worker)  # the newest worker is the one the shim serves
    worker.unblock_results = [None, None, False]  # the lock taken twice, then free
    assert worker.unblock_tasks() is None
    sentinel_r, _ = os.pipe()
    for expected in (None, False):
        # No message comes: the wait ends at the retry, far sooner than its timeout.
        worker_seam.select_shim.select([sentinel_r], [], [], 60)
        assert worker.wakeup_unblock is True
        assert worker.unblock_tasks() is expected
    assert worker.unblock_retry_at is None  # it got the lock: no more tries
    worker_seam.select_shim.select([sentinel_r], [], [], 0)
    assert worker.wakeup_unblock is False


def test_an_untargeted_worker_does_not_retry_unblocking(new_worker):
    with override_settings(PUBSUB_PULPCORE_TARGETED=False):
        worker = listening(new_worker)
        worker.unblock_results = [None]
        assert worker.unblock_tasks() is None
        assert worker.unblock_retry_at is None


@pytest.mark.parametrize("setting", [False])
def test_with_targeting_off_every_worker_gets_every_wakeup(new_worker, setting):
    with override_settings(PUBSUB_PULPCORE_TARGETED=setting):
        workers = [listening(new_worker) for _ in range(2)]
        wakeup("unblock")
        assert wakeups(workers) == [["unblock"]] * 2


def test_an_idle_worker_that_hears_nothing_looks_for_work_after_the_safety_period(
    new_worker,
):
    with override_settings(PUBSUB_PULPCORE_SAFETY_LOOK=0.05):
        worker = listening(new_worker)
        sentinel_r, _ = os.pipe()
        # No message comes: the wait ends at the safety look, far sooner than its timeout.
        readable, _, _ = worker_seam.select_shim.select([sentinel_r], [], [], 60)
        assert readable == []
        assert worker.wakeup_handle is True and worker.wakeup_unblock is True
        assert worker.pubsub.backend.stats["pulpcore_safety_looks"] == 1
        assert worker.safety_look_at > time.monotonic()  # the next one is scheduled


def test_an_auxiliary_worker_safety_look_never_unblocks(new_worker):
    worker = listening(new_worker, auxiliary=True)
    worker.safety_look()
    assert worker.wakeup_handle is True and worker.wakeup_unblock is False


@pytest.mark.parametrize("canceling", [True, False])
def test_a_busy_worker_safety_look_asks_the_database_about_its_task(new_worker, canceling):
    worker = listening(new_worker)
    worker.task = types.SimpleNamespace(pk="t1")
    asked = []
    worker._task_is_canceling = lambda: asked.append(1) or canceling
    worker.safety_look()
    assert asked == [1]
    assert worker.cancel_task is canceling
    assert worker.wakeup_handle is False  # a busy worker takes no task


def test_a_wakeup_puts_the_next_safety_look_off(new_worker):
    worker = listening(new_worker)
    worker.safety_look_at = 0.0  # overdue
    worker.on_pubsub_message(Message(channel=WAKEUP, payload="handle"))
    assert worker.safety_look_at > time.monotonic()


def test_the_safety_look_defaults_to_pulps_worker_ttl_and_zero_turns_it_off(new_worker):
    with override_settings(WORKER_TTL=40):
        worker = listening(new_worker)
        assert 30 <= worker.safety_look_at - time.monotonic() <= 40
    with override_settings(PUBSUB_PULPCORE_SAFETY_LOOK=0):
        worker = listening(new_worker)
        assert worker.safety_look_at == math.inf
        sentinel_r, sentinel_w = os.pipe()
        os.write(sentinel_w, b"x")
        readable, _, _ = worker_seam.select_shim.select([sentinel_r], [], [], None)
        assert readable == [sentinel_r] and worker.wakeup_handle is False
