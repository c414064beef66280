"""The Redis-type sizes run's pieces that need no pulpcore: its beat classifier and its page."""

from __future__ import annotations

import json

from pulp_pubsub_tools.e2e import redistype_sizes
from pulp_pubsub_tools.e2e.redistype_sizes import START, is_beat, markdown


def fleet(per_s: float, p50: float, cancel: float) -> dict:
    return {
        "workers": 4,
        "tasks": 40,
        "started": 40,
        "p50_ms": p50,
        "p95_ms": p50 * 2,
        "cancel": {"http": 202, "state": "canceled", "latency_s": cancel, "http_s": 0.1},
        "idle": {"per_s": per_s, "less_heartbeats_per_s": per_s / 2},
    }


RESULT = {
    "config": {"tasks": 40, "idle_seconds": 20.0, "burst_tasks": 64, "burst_workers": 16},
    "sizes": {"4": {"stock": fleet(150.0, 120.0, 9.9), "pubsub": fleet(1.2, 110.0, 0.08)}},
}


def test_a_beat_is_the_heartbeat_and_the_worker_count_but_not_a_task_query():
    assert is_beat({'UPDATE "core_appstatus" SET "last_heart', "BEGIN", "COMMIT"})
    assert is_beat({"SELECT pg_try_advisory_xact_lock(0, 42)", "BEGIN", "COMMIT"})
    assert is_beat({'SELECT COUNT(*) AS "__count" FROM "core_'})
    assert not is_beat({'SELECT "core_task"."pulp_id", "core_task"'})
    assert not is_beat({'SELECT COUNT(*) AS "__count" FROM "core_', 'UPDATE "core_task" SET'})


def test_the_table_has_a_row_per_size_with_both_fleets():
    text = markdown(RESULT)
    row = next(line for line in text.splitlines() if line.startswith("| 4 |"))
    assert "| 150.0 (75.0) | 1.2 (0.6) |" in row
    assert "| 120 / 240 ms | 110 / 220 ms |" in row
    assert row.endswith("| 9900 ms (canceled) | 80 ms (canceled) |")


def test_a_run_onto_an_idle_fleet_says_so_under_its_table():
    assert "idle fleet" not in markdown(RESULT)
    onto_idle = {**RESULT, "config": {**RESULT["config"], "latency_gap": 0.2}}
    assert "after 0.2 to 0.4 s of quiet, onto an idle fleet" in markdown(onto_idle)


def test_check_fails_on_a_page_that_differs_from_the_json(tmp_path):
    result, page = tmp_path / "result.json", tmp_path / "page.md"
    result.write_text(json.dumps(RESULT))
    page.write_text(f"before\n{START}\nstale\n{redistype_sizes.END}\nafter\n")
    args = ["--load", str(result), "--markdown", str(page)]
    assert redistype_sizes.main([*args, "--check"]) == 1
    assert redistype_sizes.main(args) == 0
    assert redistype_sizes.main([*args, "--check"]) == 0
    assert page.read_text().startswith("before\n") and page.read_text().endswith("after\n")


def one_pass(waits: list[float], cancel: float | None, xacts: int) -> dict:
    return {
        "workers": 4,
        "tasks": len(waits),
        "waits": waits,
        "idle": {"xacts": xacts, "beats": 4, "span": 10.0},
        "cancel": {"http": 200, "state": "canceled", "latency": cancel, "http_seconds": 0.1},
        "stray_notifies": 0,
    }


def test_a_size_pools_its_passes_and_keeps_the_slowest_cancel():
    row = redistype_sizes.pooled(
        [one_pass([0.04, 0.05, 0.06], 0.2, 12), one_pass([0.08, 0.09, 0.10], 0.5, 8)]
    )
    assert row["tasks"] == row["started"] == 6 and row["passes"] == 2
    assert row["p50_ms"] == 70.0  # the median of all six waits, not of the two passes' medians
    assert row["pass_p50s_ms"] == [50.0, 90.0]
    assert row["cancel"]["latency_s"] == 0.5 and row["cancel"]["state"] == "canceled"
    assert row["idle"]["per_s"] == 1.0 and row["idle"]["less_heartbeats_per_s"] == 0.6


def test_a_cancel_that_never_finished_is_not_hidden_by_the_other_passes():
    row = redistype_sizes.pooled([one_pass([0.05], 0.2, 5), one_pass([0.05], None, 5)])
    assert row["cancel"]["latency_s"] is None


def test_the_burst_line_says_how_the_burst_ran():
    burst = {
        "dispatched": 64,
        "tasks": 64,
        "started": 64,
        "completed": 64,
        "workers_used": 16,
        "to_last_start_s": 3.6,
    }
    alone = {**RESULT, "burst": {"stock": {**burst, "runs": [burst] * 3}, "pubsub": burst}}
    assert "each fleet's alone with the other frozen, in turn, 3 times" in markdown(alone)
    together = {**RESULT, "burst": {"stock": burst, "pubsub": burst}}
    assert "both fleets at the same time" in markdown(together)
    assert "| pubsub | 64/64 | 64/64 | 16 | 3.6 s |" in markdown(together)
