"""The integration of pulpcore's ``WORKER_TYPE = "redis"``, on the memory backend, without pulpcore.

A stand-in with the attributes and calls of pulpcore's ``RedisWorker`` the
seams rely on checks the idle wait, the wake-ups and the cancel path; the
publishing stand-ins are called with task-like objects. Real pulpcore is the
end-to-end run's (``redis_type`` in tests/test_pulpcore_e2e.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
import types
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from pulp_pubsub import CANCEL, WAKEUP, Message, get_backend
from pulp_pubsub.contrib.pulpcore import checks, redis_compat, redis_tasks
from pulp_pubsub.contrib.pulpcore import redis_worker as seam
from pulp_pubsub.contrib.pulpcore.worker import select_shim
from pulp_pubsub.registry import RUNNERS

from . import test_pulpcore_integration as integration_tests
from .util import dispatch_until

#: The memory backend, and pulpcore taken as installed: the other file's fixtures.
backend = integration_tests.backend
pulp_installed = integration_tests.pulp_installed

# -- the publishing side ----------------------------------------------------------------


@pytest.fixture
def fleet(backend):
    """Idle members of the ``handle`` group, and what each was handed."""
    subs, got = [], []

    def add(n: int) -> list[list[Message]]:
        for _ in range(n):
            sub = backend.subscriber()
            heard: list[Message] = []
            sub.subscribe(WAKEUP, heard.append, group=RUNNERS)
            sub.subscribe(CANCEL, heard.append)
            subs.append(sub)
            got.append(heard)
        return got

    def settle() -> list[list[str]]:
        """Every member dispatched until a broadcast marker: then what it holds is final."""
        backend.publish(WAKEUP, "")
        for sub, heard in zip(subs, got, strict=True):
            dispatch_until(sub, lambda heard=heard: any(m.payload == "" for m in heard))
        return [[m.payload for m in heard if m.payload] for heard in got]

    add.settle = settle  # type: ignore[attr-defined]
    yield add
    for sub in subs:
        sub.close()


def task(state: str, app_lock_id: Any = None, record: list[str] | None = None) -> Any:
    return types.SimpleNamespace(
        pk=uuid.uuid4(), state=state, app_lock_id=app_lock_id, reserved_resources_record=record
    )


@pytest.mark.parametrize(
    ("record", "held_back"),
    [
        (["repo:1"], ["repo:1", "shared:repo:1"]),
        (["shared:domain:d"], ["domain:d"]),
        (["repo:1", "shared:domain:d"], ["repo:1", "shared:repo:1", "domain:d"]),
        ([], []),
        (None, []),
    ],
)
def test_a_tasks_resources_hold_back_exactly_the_tasks_that_conflict(record, held_back):
    assert redis_tasks.held_back_by(record) == held_back


def test_a_task_left_for_a_worker_wakes_one_idle_worker(fleet):
    fleet(3)
    redis_tasks.dispatched(task("waiting"))
    assert sorted(fleet.settle()) == [[], [], ["handle"]]


def test_a_task_run_at_dispatch_wakes_one_worker_per_task_it_held_back(fleet, monkeypatch):
    fleet(4)
    monkeypatch.setattr(redis_tasks, "waiting_behind", lambda task: 2)
    redis_tasks.dispatched(task("completed", app_lock_id=1))
    assert sorted(fleet.settle()) == [[], [], ["handle"], ["handle"]]


def test_a_task_canceled_at_dispatch_or_nothing_held_back_wakes_nobody(fleet, monkeypatch):
    fleet(2)
    monkeypatch.setattr(redis_tasks, "waiting_behind", lambda task: 0)
    redis_tasks.dispatched(task("completed", app_lock_id=1))
    redis_tasks.dispatched(task("canceled", app_lock_id=1))
    assert fleet.settle() == [[], []]


def test_cancel_of_a_running_task_sends_its_id_after_pulpcores_key(fleet, monkeypatch):
    fleet(2)
    running = task("canceling", app_lock_id=7)
    redis_tasks.canceled(running)
    assert fleet.settle() == [[str(running.pk)]] * 2


def test_cancel_of_a_waiting_task_wakes_for_the_tasks_behind_it(fleet, monkeypatch):
    fleet(2)
    monkeypatch.setattr(redis_tasks, "waiting_behind", lambda task: 1)
    redis_tasks.canceled(task("canceled", app_lock_id=7))
    assert sorted(fleet.settle()) == [[], ["handle"]]


def test_with_targeting_off_a_wakeup_reaches_every_worker(backend):
    with override_settings(PUBSUB_PULPCORE_TARGETED=False), backend.subscriber() as a:
        with backend.subscriber() as b:
            heard: list[list[str]] = [[], []]
            for sub, got in ((a, heard[0]), (b, heard[1])):
                sub.subscribe(WAKEUP, lambda m, got=got: got.append(m.payload))
            redis_tasks.wake(3)
            for sub, got in ((a, heard[0]), (b, heard[1])):
                dispatch_until(sub, lambda got=got: got)
            assert heard == [["handle"], ["handle"]]


def test_the_stand_ins_call_pulpcores_functions_and_install_once(fleet):
    fleet(2)
    calls = []

    def dispatch(func, *args, **kwargs):
        calls.append(("dispatch", func))
        return task("waiting")

    async def adispatch(func, *args, **kwargs):
        calls.append(("adispatch", func))
        return task("waiting")

    def cancel_task(task_id):
        calls.append(("cancel_task", task_id))
        return task("completed", app_lock_id=1)  # already final: nothing to send

    module = types.SimpleNamespace(dispatch=dispatch, adispatch=adispatch, cancel_task=cancel_task)
    assert redis_tasks.install(module) is True
    assert redis_tasks.install(module) is False
    module.dispatch("f")
    asyncio.run(module.adispatch("g"))
    module.cancel_task("t")
    assert calls == [("dispatch", "f"), ("adispatch", "g"), ("cancel_task", "t")]
    assert fleet.settle() == [["handle"], ["handle"]]  # the two dispatches
    redis_tasks.uninstall(module)
    assert (module.dispatch, module.adispatch, module.cancel_task) == (
        dispatch,
        adispatch,
        cancel_task,
    )


# -- the worker side --------------------------------------------------------------------


class StandInRedisWorker:
    """The attributes and calls of pulpcore's RedisWorker the seams rely on."""

    def __init__(self) -> None:
        self.task: Any = None
        self.shutdown_requested = False
        self.sentinel, self.sentinel_w = os.pipe()
        os.set_blocking(self.sentinel, False)
        self.heartbeat_period = timedelta(seconds=60)
        self.app_status = types.SimpleNamespace(last_heartbeat=timezone.now())
        self.beats = 0
        self.beaten = threading.Event()
        self.looks = 0
        self.ignored_task_ids: list[Any] = []
        #: What pulpcore's fetch_task() finds.
        self.waiting: Any = None

    def beat(self) -> None:
        now = timezone.now()
        if self.app_status.last_heartbeat < now - self.heartbeat_period:
            self.app_status.last_heartbeat = now
            self.beats += 1
            if self.beats >= 2:
                self.beaten.set()

    def handle_tasks(self) -> None:
        self.looks += 1

    def fetch_task(self) -> Any:
        return self.waiting

    def sleep(self) -> None:
        self.beat()
        seam.idle_wait.sleep(0.01)  # pulpcore's time.sleep(), rebound

    def supervise_task(self, task: Any) -> None:
        self.task = task
        # pulpcore's loop: select.select([...], [], [], heartbeat), rebound.
        self.woke = select_shim.select([self.sentinel], [], [], 60)
        self.task = None

    supervise_immediate_task = supervise_task

    def app_worker_cleanup(self) -> None:
        pass

    def run(self, burst: bool = False) -> None:
        self.subscribed = self.pubsub.channels


@pytest.fixture
def new_worker(backend):
    made = []

    def make() -> Any:
        worker = seam.make_worker_class(StandInRedisWorker)()
        worker.listen(burst=False)
        made.append(worker)
        return worker

    yield make
    for worker in made:
        select_shim.detach(worker.pubsub)
        seam.idle_wait.detach(worker)
        worker.pubsub.close()


def test_an_idle_worker_beats_and_waits_for_a_wakeup_instead_of_polling(new_worker):
    worker = new_worker()
    worker.heartbeat_period = timedelta(seconds=0.05)
    sleeper = threading.Thread(target=worker.sleep)
    sleeper.start()
    assert worker.beaten.wait(10), "the idle wait never ran pulpcore's beat()"
    assert sleeper.is_alive() and worker.looks == 0  # two heartbeats, no poll
    redis_tasks.wake(1)
    sleeper.join(10)
    assert not sleeper.is_alive(), "a wake-up did not end the idle wait"
    assert worker.look_now is True
    worker.handle_tasks()
    assert worker.look_now is False and worker.looks == 1


def test_a_signal_ends_the_idle_wait(new_worker):
    worker = new_worker()
    os.write(worker.sentinel_w, b"\x0f")  # what signal.set_wakeup_fd() writes
    worker.sleep()  # returns: pulpcore's loop then reads the flag the handler set
    with pytest.raises(BlockingIOError):
        os.read(worker.sentinel, 1)  # drained


def test_the_time_stand_in_is_plain_time_outside_the_idle_wait(new_worker):
    worker = new_worker()
    worker.wait_for_work = lambda: pytest.fail("waited for work outside sleep()")
    seam.idle_wait.sleep(0)
    assert seam.idle_wait.monotonic is not None  # the rest of the time module


def test_an_idle_worker_that_hears_nothing_looks_after_the_safety_period(new_worker):
    with override_settings(PUBSUB_PULPCORE_SAFETY_LOOK=0.05):
        worker = new_worker()
        worker.sleep()  # returns: no message, heartbeat far off
        assert worker.look_now is True
        assert worker.pubsub.backend.stats["pulpcore_safety_looks"] == 1


def test_a_cancel_message_ends_the_supervising_wait_so_pulpcore_reads_its_key(new_worker):
    worker = new_worker()
    running = types.SimpleNamespace(pk=uuid.uuid4(), reserved_resources_record=[])
    worker.cancel_signalled = lambda: True  # pulpcore's cancel_task() set the key
    worker.task_is_canceling = lambda: pytest.fail("asked the database")
    get_backend().publish(CANCEL, str(running.pk))
    worker.waiting_tasks = lambda: 0
    before = get_backend().stats["pulpcore_cancels_refused"]
    seam.PubSubRedisWorkerMixin.supervise_task(worker, running)
    assert worker.woke == ([], [], [])  # woken by the message, not the 60 s timeout
    assert get_backend().stats["pulpcore_cancels_refused"] == before


def test_a_forged_cancel_is_refused_loudly_and_pulpcore_finds_no_key(new_worker, caplog):
    worker = new_worker()
    worker.task = types.SimpleNamespace(pk=uuid.uuid4())
    worker.cancel_signalled = lambda: False
    worker.task_is_canceling = lambda: False
    before = get_backend().stats["pulpcore_cancels_refused"]
    worker.on_pubsub_message(Message(CANCEL, str(worker.task.pk)))
    worker.on_pubsub_message(Message(CANCEL, str(uuid.uuid4())))  # another worker's task
    assert get_backend().stats["pulpcore_cancels_refused"] == before + 1
    assert "does not show it as being canceled" in caplog.text


@pytest.fixture
def held_back(monkeypatch):
    """What reaches wake() (the backend side is tested above), and the tasks counted."""
    sent: list[int] = []
    counted: list[tuple[Any, ...]] = []

    def waiting_behind(*tasks: Any) -> int:
        counted.append(tasks)
        return 3

    monkeypatch.setattr(seam, "wake", sent.append)
    monkeypatch.setattr(seam, "waiting_behind", waiting_behind)
    return types.SimpleNamespace(sent=sent, counted=counted)


def test_a_finished_task_is_counted_only_after_its_worker_has_looked_again(new_worker, held_back):
    worker = new_worker()
    ended = types.SimpleNamespace()
    worker.task_ended(ended)
    # The worker's own look comes first: no query stands between the end and it.
    assert held_back.counted == [] and held_back.sent == []
    worker.waiting = types.SimpleNamespace()
    worker.task = worker.fetch_task()  # it took a task (not held back: still 3 waiting)
    # It forked it: the task's start comes first too, so the supervising wait counts later...
    assert select_shim.select([worker.sentinel], [], [], 0) == ([], [], [])
    assert held_back.counted == []
    # ...without being woken: pulpcore's 60 s wait ends for the count, and only once.
    assert select_shim.select([worker.sentinel], [], [], 60) == ([], [], [])
    assert held_back.counted == [(ended,)] and held_back.sent == [3]
    select_shim.select([worker.sentinel], [], [], 0)
    assert held_back.sent == [3]


def test_a_supervising_worker_counts_for_all_its_ended_tasks_by_the_first_ones_time(
    new_worker, held_back, monkeypatch
):
    worker = new_worker()
    monkeypatch.setattr(seam, "HELD_BACK_AFTER", 5.0)
    first, second = types.SimpleNamespace(), types.SimpleNamespace()
    worker.task = types.SimpleNamespace()
    worker.task_ended(first)
    assert worker.while_waiting(1000.0) == 1005.0
    worker.task_ended(second)  # a short task ended before the count: the time holds
    assert worker.while_waiting(1004.0) == 1005.0 and held_back.counted == []
    assert worker.while_waiting(1005.0) is None
    assert held_back.counted == [(first, second)] and held_back.sent == [3]
    assert worker.held_back_at is None and worker.while_waiting(1006.0) is None


def test_an_idle_worker_counts_what_its_tasks_held_back_at_once(new_worker, held_back):
    worker = new_worker()
    ended = types.SimpleNamespace()
    worker.task_ended(ended)
    worker.task = types.SimpleNamespace()
    assert worker.while_waiting(0.0) is not None  # supervising: later
    worker.task = None  # its next task ended at once, and it is idle before the time
    assert worker.while_waiting(0.01) is None
    assert held_back.counted == [(ended,)] and held_back.sent == [3]


def test_a_look_that_finds_nothing_wakes_nobody_for_the_finished_task(new_worker, held_back):
    worker = new_worker()
    worker.task_ended(types.SimpleNamespace())
    assert worker.fetch_task() is None  # every waiting task is held back by another lock
    select_shim.select([worker.sentinel], [], [], 0)  # back in its wait, idle
    assert held_back.counted == [] and held_back.sent == []


def test_tasks_set_aside_by_the_look_are_still_woken_for(new_worker, held_back):
    worker = new_worker()
    worker.ignored_task_ids = [uuid.uuid4()]  # beyond its versions: another worker may run it
    worker.task_ended(types.SimpleNamespace())
    assert worker.fetch_task() is None
    select_shim.select([worker.sentinel], [], [], 0)
    assert held_back.sent == [3]


def test_a_worker_that_stops_looking_wakes_for_what_its_last_task_held_back(new_worker, held_back):
    worker = new_worker()
    worker.task_ended(types.SimpleNamespace())  # then shut down: handle_tasks() looks no more
    worker.run()
    assert held_back.sent == [3]


def test_a_reconciled_lock_wakes_for_the_waiting_tasks_and_the_worker_looks(
    new_worker, monkeypatch
):
    worker = new_worker()
    sent: list[int] = []
    monkeypatch.setattr(seam, "wake", sent.append)
    worker.num_workers = 3  # pulpcore's count of the fleet: no more wake-ups than workers
    worker.waiting_tasks = lambda: 5
    worker.app_worker_cleanup()
    assert worker.look_now is True  # idle: it looks itself, and wakes the others
    assert sent == [2]
    worker.waiting_tasks = lambda: 0
    worker.app_worker_cleanup()
    assert sent == [2]  # nothing waiting: nobody woken


def test_install_rebinds_the_class_time_and_select_once():
    import select
    import time

    module = types.SimpleNamespace(RedisWorker=StandInRedisWorker, select=select, time=time)
    assert seam.install(module) is True
    assert seam.install(module) is False
    assert seam.stock(module.RedisWorker) is StandInRedisWorker
    assert (module.select, module.time) == (select_shim, seam.idle_wait)
    seam.uninstall(module)
    assert (module.RedisWorker, module.select, module.time) == (StandInRedisWorker, select, time)


# -- checks ----------------------------------------------------------------------------


def test_a_redis_type_that_cannot_be_integrated_is_a_warning_not_an_error(
    pulp_installed,
    monkeypatch,
):
    monkeypatch.setattr(checks, "_redis_problems", lambda: ["x no longer contains y"])
    with override_settings(WORKER_TYPE="redis"):
        found = checks.check_pulpcore_mode()
        assert [w.id for w in found] == ["pulp_pubsub.W101"]
        assert "x no longer contains y" in found[0].msg and "poll" in found[0].msg
        assert checks.check_pulpcore_seams() == [] and checks.check_pulpcore_version() == []


def test_an_integrated_redis_type_has_no_warning(pulp_installed, monkeypatch):
    monkeypatch.setattr(checks, "_redis_problems", lambda: [])
    with override_settings(WORKER_TYPE="redis"):
        assert checks.check_pulpcore_mode() == []
        assert checks.check_pulpcore_seams() == []


def test_without_a_redis_worker_the_check_says_the_type_is_not_integrated():
    problems = redis_compat.redis_seam_problems()  # no pulpcore here, as on 3.105
    assert len(problems) == 1 and "has no Redis-type worker" in problems[0]
    assert "3.108" in problems[0]


def test_a_moved_redis_seam_is_a_problem(monkeypatch):
    monkeypatch.setattr(redis_compat.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(redis_compat, "_source", lambda where: "nothing of it")
    monkeypatch.setattr(redis_compat, "_module_problems", lambda: [])
    monkeypatch.setattr(redis_compat, "_states_problem", lambda: None)
    problems = redis_compat.redis_seam_problems()
    assert len(problems) == len(redis_compat.REDIS_SEAMS)
    assert any("RedisWorker.sleep no longer contains" in p for p in problems)
