"""The herd run's figures for one fleet size pool its passes (``--passes``)."""

from __future__ import annotations

from pulp_pubsub_tools.e2e.herd import pool, row


def one_pass(waits: list[float], xacts: int, beats: int) -> dict:
    return {
        "xacts": xacts,
        "beats": beats,
        "span": 10.0,
        "waits": waits,
        "unblocks": [w / 4 for w in waits],
        "tasks": len(waits),
        "idle_xacts": 5,
        "idle_span": 20.0,
    }


def test_a_size_pools_the_tasks_of_all_its_passes():
    first = one_pass([0.040, 0.050, 0.060], xacts=60, beats=3)
    second = one_pass([0.080, 0.090, 0.100], xacts=57, beats=0)
    figures = row(pool([first, second]))
    assert figures["tasks"] == figures["started"] == 6
    assert figures["per_task"] == round(117 / 6, 1)
    assert figures["per_task_less_heartbeats"] == round(114 / 6, 1)
    # The median of all six waits, not of the two passes' medians.
    assert figures["p50_ms"] == 70.0
    assert figures["pass_p50s_ms"] == [50.0, 90.0]
    assert figures["idle_per_s"] == 0.25
    # Pooling copies: a pass's own lists are left as they were.
    assert first["waits"] == [0.040, 0.050, 0.060]


def test_one_pass_gives_the_figures_of_that_pass():
    only = one_pass([0.030, 0.010, 0.020], xacts=30, beats=1)
    figures = row(pool([only]))
    assert figures["p50_ms"] == 20.0 and figures["pass_p50s_ms"] == [20.0]
    assert figures["per_task"] == 10.0 and figures["per_task_less_heartbeats"] == 9.7
