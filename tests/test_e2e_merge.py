"""Putting one scenario's run into a series' committed end-to-end JSON without the rest."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pulp_pubsub_tools.e2e.__main__ import main
from pulp_pubsub_tools.e2e.figures import merge


def a_run() -> dict:
    """A whole run's JSON, as ``as_dict`` writes it, in small."""
    return {
        "pulpcore": "3.123.1",
        "config": {"scenarios": "('contract', 'operator', 'head_to_head')"},
        "operator": {"ping": 0, "problems": []},
        "pooler": None,
        "fail_closed": None,
        "seconds": {"virtualenv": 0.1, "migrate": 14.0, "operator": 97.0, "head_to_head": 54.0},
        "total_seconds": 170.0,
        "contract": {"subscribes": {"ok": True, "detail": ""}},
        "outcomes": {"stock_direct": {"tasks": 38}, "pubsub_redis": {"tasks": 38}},
        "latency_ratio": 0.8,
        "verdicts": [
            {"name": "worker contract on pulpcore's classes", "ok": True, "figure": "1/1"},
            {"name": "pubsub-redis: every task starts and finishes", "ok": True, "figure": "38"},
        ],
    }


def one_scenario(pulpcore: str, scenarios: str, outcome: str) -> dict:
    return {
        "pulpcore": pulpcore,
        "config": {"scenarios": scenarios},
        "operator": None,
        "pooler": None,
        "fail_closed": None,
        "seconds": {"virtualenv": 0.1, "migrate": 9.0, "zookeeper_pgbouncer": 41.0},
        "total_seconds": 55.0,
        "contract": {},
        "outcomes": {outcome: {"db_path": "PgBouncer txn, pool 2", "tasks": 34}},
        "latency_ratio": None,
        "verdicts": [{"name": "zookeeper-pgbouncer: all done", "ok": True, "figure": "34/34"}],
    }


def test_a_scenario_is_added_and_the_rest_kept() -> None:
    old = a_run()
    before = copy.deepcopy(old)
    new = one_scenario(old["pulpcore"], "('zookeeper_pgbouncer',)", "zookeeper_pgbouncer")
    merged = merge(old, new)
    assert old == before  # not changed in place
    assert list(merged["outcomes"]) == [*before["outcomes"], "zookeeper_pgbouncer"]
    assert merged["verdicts"] == [*before["verdicts"], *new["verdicts"]]
    for key in ("operator", "pooler", "fail_closed", "contract", "latency_ratio", "config"):
        assert merged[key] == before[key], key
    assert merged["seconds"] == {**before["seconds"], "zookeeper_pgbouncer": 41.0}
    assert merged["merged_scenarios"] == ["zookeeper_pgbouncer"]


def test_a_scenario_run_again_replaces_its_figures_and_verdicts() -> None:
    old = a_run()
    new = one_scenario(old["pulpcore"], "('head_to_head',)", "pubsub_redis")
    new["latency_ratio"] = 0.5
    new["verdicts"] = [dict(old["verdicts"][-1], figure="again")]
    merged = merge(merge(old, new), new)
    assert merged["outcomes"]["pubsub_redis"] == new["outcomes"]["pubsub_redis"]
    assert merged["latency_ratio"] == 0.5
    assert len(merged["verdicts"]) == len(old["verdicts"])
    assert merged["verdicts"][-1]["figure"] == "again"
    assert merged["merged_scenarios"] == ["head_to_head"]


def test_another_release_is_refused_and_the_file_left_alone(tmp_path: Path) -> None:
    old = a_run()
    with pytest.raises(ValueError, match="run every scenario again"):
        merge(old, one_scenario("3.123.0", "('zookeeper_pgbouncer',)", "zookeeper_pgbouncer"))
    missing = tmp_path / "e2e.json"
    with pytest.raises(SystemExit) as exited:
        main(["--scenarios", "zookeeper_pgbouncer", "--merge", "--json", str(missing)])
    assert exited.value.code == 2 and not missing.exists()
