"""``pubsub_demo``: run as a user would, judged by what it printed."""

from __future__ import annotations

import io
import re
import uuid

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from pulp_pubsub.backends.memory import MemoryBackend

from .test_subscriber import MEMORY

#: One line per wake-up handed to a single worker.
TARGETED_LINE = re.compile(
    r"^wake-up (\d+) \((handle|unblock)\): (worker-\d+)( \(reconnected\))? woke after "
    r"[\d.]+ ms(; the other (\d+) stayed asleep)?$",
    re.MULTILINE,
)
BROADCAST_LINE = re.compile(
    r"^wake-up (\d+) \((handle|unblock)\): (\d+)/(\d+) workers woke \(broadcast\)", re.MULTILINE
)


class BroadcastOnlyBackend(MemoryBackend):
    """The memory backend as a server that cannot target (PostgreSQL, core NATS) behaves."""

    targets = False


def run(**options) -> str:
    out = io.StringIO()
    call_command("pubsub_demo", stdout=out, stderr=io.StringIO(), **options)
    return out.getvalue()


def assert_one_worker_per_wakeup(text: str, wakeups: int, workers: int) -> list[str]:
    lines = TARGETED_LINE.findall(text)
    assert [int(line[0]) for line in lines] == list(range(1, wakeups + 1)), text
    if workers > 1:
        assert all(line[5] == str(workers - 1) for line in lines), text
    assert not BROADCAST_LINE.search(text), text
    assert f"{wakeups} wake-ups woke {wakeups} workers in all" in text
    return [line[2] for line in lines]


def test_memory_targeted_wakeups_wake_one_worker_each_and_the_cancel_all():
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}):
        text = run(workers=4, rounds=3)
    assert "4 worker threads" in text
    assert "Wake-ups are targeted" in text
    woke = assert_one_worker_per_wakeup(text, 3, 4)
    assert [reason for _, reason, *_ in TARGETED_LINE.findall(text)] == [
        "handle",
        "unblock",
        "handle",
    ]
    assert set(woke) <= {"worker-1", "worker-2", "worker-3", "worker-4"}
    assert re.search(r"^cancel [0-9a-f]{8}: reached 4/4 workers \(broadcast\)", text, re.M)
    assert "reconnect: skipped, it needs a real server" in text
    assert "as broadcasts they would have woken 12" in text


def test_a_backend_that_cannot_target_says_so_and_wakes_everyone():
    backend = f"{__name__}.BroadcastOnlyBackend"
    with override_settings(**{**MEMORY, "PUBSUB_BACKEND": backend}, PUBSUB_OPTIONS={}):
        text = run(workers=3, rounds=2)
    assert "cannot target a wake-up at one worker" in text
    assert [m[2:] for m in BROADCAST_LINE.findall(text)] == [("3", "3")] * 2, text
    assert not TARGETED_LINE.search(text)
    assert "reached 3/3 workers" in text
    assert "2 wake-ups woke 6 workers in all; memory broadcasts every wake-up" in text


def test_one_worker_wakes_for_every_wakeup():
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}):
        text = run(workers=1, rounds=2)
    assert "1 worker thread\n" in text
    assert assert_one_worker_per_wakeup(text, 2, 1) == ["worker-1", "worker-1"]
    assert "reached 1/1 workers" in text


@pytest.mark.parametrize(
    "options, option",
    [
        ({"workers": 0}, "--workers"),
        ({"workers": 65}, "--workers"),
        ({"workers": "many"}, "--workers"),
        ({"workers": True}, "--workers"),
        ({"rounds": 0}, "--rounds"),
        ({"rounds": -2}, "--rounds"),
        ({"rounds": 101}, "--rounds"),
        ({"rounds": 1.5}, "--rounds"),
    ],
)
def test_bad_options_are_command_errors(options, option):
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}):
        with pytest.raises(CommandError, match=f"{option} must be a whole number from 1 to"):
            run(**options)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    from .harness_redis import make_harness

    with make_harness(tmp_path_factory) as harness:
        yield harness


def test_redis_targets_wakeups_reconnects_a_cut_worker_and_wakes_it_again(redis_server):
    settings = redis_server.settings()
    prefix = f"demo{uuid.uuid4().hex[:8]}."
    with override_settings(**settings, PUBSUB_CHANNEL_PREFIX=prefix):
        text = run(workers=4, rounds=3)
    assert "4 worker processes" in text
    assert "Wake-ups are targeted" in text
    # Three before the cut, one after it.
    woke = assert_one_worker_per_wakeup(text, 4, 4)
    assert "reached 4/4 workers (broadcast)" in text
    assert re.search(
        r"^reconnect: cut worker-4's connection; back after [\d.]+ s with resync=True on "
        r"pulp_worker_cancel, pulp_worker_wakeup$",
        text,
        re.M,
    ), text
    reconnect_at = text.index("reconnect:")
    assert text.index("wake-up 4 (handle)") > reconnect_at
    assert woke[3].startswith("worker-")
    assert "as broadcasts they would have woken 16" in text
