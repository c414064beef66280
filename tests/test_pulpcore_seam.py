"""The adapter behind pulpcore's pub/sub interface (contrib/pulpcore/seam.py).

On the memory backend without pulpcore: the draft's method names and their
meaning, the helpers' exact payloads, and how each kind of resync reaches a
caller of ``fetch()``. Then against a throwaway redis-server: a connection cut
under the subscriber surfaces as a resync through ``fetch()``.
"""

from __future__ import annotations

import importlib.machinery
import select
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import transaction
from django.test import override_settings

from pulp_pubsub import CANCEL, METRICS_HEARTBEAT, WAKEUP, get_backend
from pulp_pubsub.backends import memory
from pulp_pubsub.contrib import pulpcore as integration
from pulp_pubsub.contrib.pulpcore import compat, seam
from pulp_pubsub.contrib.pulpcore.seam import PubsubMessage

from .harness_redis import make_harness

MEMORY = {"PUBSUB_BACKEND": "memory", "PUBSUB_URL": None, "PUBSUB_CHANNEL_PREFIX": ""}
FAST = {"reconnect_min": 0.05, "reconnect_max": 0.3, "connect_timeout": 1.0}
#: A task the stand-in database shows as being canceled by a worker.
CANCELING = str(uuid.uuid4())


class Backend(seam.PubSubBackend):
    """The adapter with the one database question answered here instead of by pulpcore."""

    @classmethod
    def canceling_tasks(cls) -> set[str]:
        return {CANCELING}


def fetch_until(
    pubsub: seam.PubSubBackend,
    predicate: Callable[[list[PubsubMessage]], bool],
    timeout: float = 10,
) -> list[PubsubMessage]:
    """Wait in select() on fileno(), as pulpcore's worker does, until the fetched messages fit."""
    fetched: list[PubsubMessage] = []
    deadline = time.monotonic() + timeout
    while not predicate(fetched):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"fetched only {fetched} within {timeout} s")
        select.select([pubsub], [], [], left)
        fetched += pubsub.fetch()
    return fetched


@pytest.fixture
def pubsub() -> Iterator[Backend]:
    with override_settings(**MEMORY, PUBSUB_OPTIONS=FAST):
        backend = Backend()
        try:
            yield backend
        finally:
            backend.close()


def test_the_module_imports_no_pulpcore():
    assert "pulpcore" not in sys.modules
    assert seam.PATH == "pulp_pubsub.contrib.pulpcore.seam.PubSubBackend"


def test_the_message_keeps_the_two_field_shape():
    message = PubsubMessage(WAKEUP, "handle")
    assert message._fields == ("channel", "payload")
    assert (message.channel, message.payload) == (WAKEUP, "handle")
    assert message == (WAKEUP, "handle")


def test_subscriptions_are_listed_and_unsubscribe_stops_delivery(pubsub):
    pubsub.subscribe(WAKEUP)
    pubsub.subscribe("other_channel")
    assert pubsub.get_subscriptions() == {WAKEUP, "other_channel"}
    pubsub.unsubscribe("other_channel")
    assert pubsub.get_subscriptions() == {WAKEUP}
    Backend.publish("other_channel", "dropped")
    Backend.publish(WAKEUP, "handle")
    assert fetch_until(pubsub, bool) == [(WAKEUP, "handle")]


def test_fetch_returns_nothing_at_once_when_nothing_waits(pubsub):
    pubsub.subscribe(WAKEUP)
    started = time.monotonic()
    assert pubsub.fetch() == []
    assert time.monotonic() - started < 0.5
    assert select.select([pubsub.fileno()], [], [], 0)[0] == []


def test_fileno_is_readable_while_messages_wait_and_fetch_drains_them(pubsub):
    pubsub.subscribe(WAKEUP)
    Backend.wakeup_worker("unblock")
    readable, _, _ = select.select([pubsub.fileno()], [], [], 10)
    assert readable == [pubsub.fileno()]
    assert fetch_until(pubsub, bool) == [(WAKEUP, "unblock")]
    assert select.select([pubsub.fileno()], [], [], 0)[0] == []


def test_the_helpers_send_what_pulpcore_sends(pubsub):
    for channel in (WAKEUP, CANCEL, METRICS_HEARTBEAT):
        pubsub.subscribe(channel)
    stamp = "2026-11-26 22:02:04.317465+00:00"
    Backend.wakeup_worker()
    Backend.cancel_task(uuid.UUID(CANCELING))
    Backend.record_worker_metrics(stamp)
    fetched = fetch_until(pubsub, lambda got: len(got) == 3)
    assert sorted(fetched) == sorted(
        [(WAKEUP, "unknown"), (CANCEL, CANCELING), (METRICS_HEARTBEAT, stamp)]
    )


def test_publish_without_payload_sends_an_empty_one(pubsub):
    pubsub.subscribe("plain")
    Backend.publish("plain")
    assert fetch_until(pubsub, bool) == [("plain", "")]


def test_a_cancel_the_database_does_not_show_is_dropped_and_counted(pubsub, caplog):
    pubsub.subscribe(CANCEL)
    pubsub.subscribe(WAKEUP)
    forged = str(uuid.uuid4())
    Backend.cancel_task(forged)
    Backend.wakeup_worker("handle")  # arrives after the cancel, so fetch() has seen both
    assert fetch_until(pubsub, bool) == [(WAKEUP, "handle")]
    assert forged in caplog.text
    assert get_backend().stats["pulpcore_cancels_refused"] == 1


def resyncs(pubsub: seam.PubSubBackend, channels: list[str]) -> list[PubsubMessage]:
    """What fetch() gives after the memory server dropped the subscriber's connection."""
    for channel in channels:
        pubsub.subscribe(channel)
    assert memory.drop_connections() >= 1
    return fetch_until(pubsub, bool)


def test_a_wakeup_resync_is_an_unblock_and_a_handle(pubsub):
    assert resyncs(pubsub, [WAKEUP]) == [(WAKEUP, "unblock"), (WAKEUP, "handle")]


def test_a_cancel_resync_names_each_task_being_canceled(pubsub):
    assert resyncs(pubsub, [CANCEL]) == [(CANCEL, CANCELING)]


def test_a_heartbeat_resync_says_nothing_and_another_channel_gets_an_empty_payload(pubsub):
    assert resyncs(pubsub, [METRICS_HEARTBEAT, "plain"]) == [("plain", "")]


@pytest.mark.django_db(transaction=True)
def test_a_publish_inside_atomic_goes_out_at_commit_and_never_on_rollback(pubsub):
    pubsub.subscribe(WAKEUP)
    with transaction.atomic():
        Backend.wakeup_worker("unblock")
        assert pubsub.fetch() == []
    with pytest.raises(RuntimeError), transaction.atomic():
        Backend.wakeup_worker("dropped")
        raise RuntimeError
    Backend.wakeup_worker("handle")
    assert fetch_until(pubsub, lambda got: len(got) >= 2) == [
        (WAKEUP, "unblock"),
        (WAKEUP, "handle"),
    ]


def test_a_backend_outage_never_raises_into_the_publisher(pubsub):
    memory.set_server_down(True)
    try:
        Backend.wakeup_worker("handle")
    finally:
        memory.set_server_down(False)
    assert get_backend().stats["pulpcore_messages_dropped"] == 1


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: Any) -> Iterator[Any]:
    with make_harness(tmp_path_factory) as running:
        yield running


@pytest.mark.backend
def test_on_redis_a_cut_connection_surfaces_as_a_resync_through_fetch(redis_server):
    with override_settings(**redis_server.settings(**FAST), PUBSUB_CHANNEL_PREFIX=""):
        pubsub = Backend()
        try:
            pubsub.subscribe(WAKEUP)
            pubsub.subscribe(CANCEL)
            redis_server.publish_external(WAKEUP, "handle")  # a plain client's message
            assert fetch_until(pubsub, bool) == [(WAKEUP, "handle")]
            assert redis_server.kill_subscriber_connections() >= 1
            fetched = fetch_until(pubsub, lambda got: len(got) >= 3)
            assert sorted(fetched) == sorted(
                [(WAKEUP, "unblock"), (WAKEUP, "handle"), (CANCEL, CANCELING)]
            )
            Backend.wakeup_worker("unblock")  # and after the resync, plain delivery again
            assert fetch_until(pubsub, bool) == [(WAKEUP, "unblock")]
        finally:
            pubsub.close()


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(integration, "state", integration.State(reason=""))
    return integration


def test_setup_names_the_adapter_in_pulpcores_setting_and_uninstall_gives_it_back(fresh_state):
    with override_settings(TASKING_PUBSUB_BACKEND=compat.PUBSUB_DEFAULT):
        fresh_state.use_seam()
        assert settings.TASKING_PUBSUB_BACKEND == seam.PATH
        assert (fresh_state.state.installed, fresh_state.state.seam) == (True, True)
        fresh_state.uninstall()
        assert settings.TASKING_PUBSUB_BACKEND == compat.PUBSUB_DEFAULT
        assert fresh_state.state.installed is False


def test_a_class_an_operator_named_is_left_alone(fresh_state, caplog):
    with override_settings(TASKING_PUBSUB_BACKEND="site.pubsub.Mine"):
        fresh_state.use_seam()
        assert settings.TASKING_PUBSUB_BACKEND == "site.pubsub.Mine"
    assert fresh_state.state.installed is False
    assert "'site.pubsub.Mine'" in fresh_state.state.reason and "leaves alone" in caplog.text


@pytest.fixture
def fake_pulpcore(monkeypatch, tmp_path):
    """A pulpcore with the pub/sub module whose tasking code is the files of ``tmp_path``."""
    for name in ("pulpcore", compat.TASKING, compat.PUBSUB_MODULE):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__spec__.submodule_search_locations = [str(tmp_path)]
        monkeypatch.setitem(sys.modules, name, module)
    pubsub = sys.modules[compat.PUBSUB_MODULE]
    pubsub.BasePubSubBackend = type("BasePubSubBackend", (), dict(vars(seam.PubSubBackend)))
    pubsub.get_backend = lambda: pubsub.BasePubSubBackend
    (tmp_path / "pubsub.py").write_text("def listen(execute):\n    execute('LISTEN {}')\n")
    return pubsub, tmp_path


def test_a_patched_pulpcore_whose_interface_fits_has_no_seam_problem(fake_pulpcore):
    with override_settings(TASKING_PUBSUB_BACKEND=compat.PUBSUB_DEFAULT):
        assert compat.has_pubsub_seam()
        assert compat.seam_problems() == []


def test_a_method_the_adapter_lacks_or_a_notify_around_the_module_is_a_seam_problem(
    fake_pulpcore,
):
    pubsub, tasking = fake_pulpcore
    pubsub.BasePubSubBackend.notify_everyone = classmethod(lambda cls: None)
    (tasking / "worker.py").write_text("def run(execute):\n    execute('LISTEN elsewhere')\n")
    with override_settings(TASKING_PUBSUB_BACKEND=compat.PUBSUB_DEFAULT):
        problems = compat.seam_problems()
    assert len(problems) == 2
    assert "['notify_everyone']" in problems[0]
    assert "pulpcore.tasking.worker:run sends 'LISTEN elsewhere'" in problems[1]


@pytest.fixture
def fleet() -> Iterator[dict[str, Backend]]:
    """Three workers' instances, as pulpcore makes them: ``backend(worker=self)``."""
    workers = {
        "idle": types.SimpleNamespace(task=None, auxiliary=False),
        "busy": types.SimpleNamespace(task=object(), auxiliary=False),
        "auxiliary": types.SimpleNamespace(task=None, auxiliary=True),
    }
    with override_settings(**MEMORY, PUBSUB_OPTIONS=FAST):
        instances = {name: Backend(worker=worker) for name, worker in workers.items()}
        try:
            for instance in instances.values():
                instance.subscribe(WAKEUP)
                instance.fileno()  # back in select(): the busy one takes no "handle"
            yield instances
        finally:
            for instance in instances.values():
                instance.close()


def test_a_counted_handle_wakes_that_many_idle_workers_and_no_busy_one(fleet):
    Backend.wakeup_worker("handle", count=2)
    for name in ("idle", "auxiliary"):
        assert fetch_until(fleet[name], bool) == [(WAKEUP, "handle")]
    Backend.wakeup_worker("unknown")  # a broadcast, which every worker hears
    assert fetch_until(fleet["busy"], bool) == [(WAKEUP, "unknown")]


def test_a_counted_unblock_skips_auxiliary_workers(fleet):
    fleet["idle"].worker.task = object()  # busy workers unblock too; auxiliary ones never
    Backend.wakeup_worker("unblock", count=2)
    for name in ("idle", "busy"):
        assert fetch_until(fleet[name], bool) == [(WAKEUP, "unblock")]
    Backend.wakeup_worker("unknown")
    assert fetch_until(fleet["auxiliary"], bool) == [(WAKEUP, "unknown")]


def test_a_wakeup_without_a_count_reaches_every_worker_busy_or_not(fleet):
    Backend.wakeup_worker("handle")
    for instance in fleet.values():
        assert fetch_until(instance, bool) == [(WAKEUP, "handle")]


def test_a_wakeup_fetched_by_a_worker_that_never_waits_again_goes_to_another(fleet):
    fleet["auxiliary"].worker.task = object()
    fleet["auxiliary"].fileno()
    Backend.wakeup_worker("handle", count=1)
    assert fetch_until(fleet["idle"], bool) == [(WAKEUP, "handle")]
    fleet["auxiliary"].worker.task = None
    fleet["idle"].close()  # it dies before acting: the wake-up is handed on
    assert fetch_until(fleet["auxiliary"], bool) == [(WAKEUP, "handle")]


def test_the_adapter_lets_redis_type_workers_wait_for_wakeups():
    assert seam.PubSubBackend.pushes is True


def test_a_worker_back_in_its_wait_has_acted_and_takes_the_next_wakeup(fleet):
    fleet["auxiliary"].worker.task = object()
    fleet["auxiliary"].fileno()  # only "idle" takes a "handle" now
    for _ in range(2):  # held until acknowledged, so the second needs the first acked
        Backend.wakeup_worker("handle", count=1)
        assert fetch_until(fleet["idle"], bool) == [(WAKEUP, "handle")]
