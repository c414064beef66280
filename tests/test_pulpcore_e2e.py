"""Pulp itself on pulp-pubsub: real pulpcore, end to end, on the oldest and newest series.

Makes (once, then reuses) a virtualenv per series with pulpcore from PyPI
(``$PULP_PUBSUB_E2E_VENV`` or ``~/.cache/pulp-pubsub/``), starts throwaway
PostgreSQL, PgBouncer and Redis servers, and runs the scenarios of
:mod:`pulp_pubsub_tools.e2e.scenarios`: on the oldest supported
series the ones the issue asks of every series (contract, operator, pooler,
fail closed, head to head), on the newest all of them. The figures of each series are
printed whether the tests pass or not, and written as JSON to
``$PULP_PUBSUB_E2E_JSON_DIR/e2e-<series>.json`` when that is set.

The created->started latency target (p50 no worse than 1.25 x stock) is
asserted here with a looser bound, ``LATENCY_RATIO_CI``: CI shares the
2-core machine with the rest of the suite, so a few milliseconds of noise
move a ~50 ms median. The exact ratio is printed, and
``python -m pulp_pubsub_tools.e2e`` fails on 1.25.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pulp_pubsub.contrib.pulpcore.compat import E2E_SERIES
from pulp_pubsub_tools.e2e.figures import (
    CANCEL_SECONDS,
    IDLE_RATIO,
    as_dict,
    contrast,
    latency_ratio,
    nats_outage_verdicts,
    operator_verdicts,
    table,
    verdicts,
)
from pulp_pubsub_tools.e2e.redistype import redis_type_verdicts
from pulp_pubsub_tools.e2e.relayfleet import relay_verdicts
from pulp_pubsub_tools.e2e.scenarios import Config, Report, Run
from pulp_pubsub_tools.e2e.zkfleet import zookeeper_verdicts

LATENCY_RATIO_CI = 1.5
OLDEST, NEWEST = E2E_SERIES[0], E2E_SERIES[-1]
#: What every supported series must show; the newest also runs the contrast scenarios
#: and the relay and ZooKeeper fleets behind PgBouncer and the outage on the nats backend (run
#: only when named, as here).
EVERY_SERIES = ("contract", "operator", "pooler", "fail_closed", "head_to_head")
NEWEST_ONLY = ("relay_pgbouncer", "operator_nats", "zookeeper_pgbouncer")

pytestmark = [pytest.mark.pulp, pytest.mark.long, pytest.mark.backend, pytest.mark.timeout(1500)]

_reports: dict[str, Report] = {}
_failed: dict[str, str] = {}


def run_series(series: str, capture: object) -> Report:
    if series in _failed:
        pytest.fail(f"the pulpcore {series} run failed: {_failed[series]}")
    if series in _reports:
        return _reports[series]
    scenarios = (*Config().scenarios, *NEWEST_ONLY) if series == NEWEST else EVERY_SERIES
    lines: list[str] = []
    try:
        result = Run(Config(series=series, scenarios=scenarios), lines.append).run()
    except Exception as exc:  # one failed run is reported once, not run again
        _failed[series] = f"{type(exc).__name__}: {exc}"
        raise
    _reports[series] = result
    where = os.environ.get("PULP_PUBSUB_E2E_JSON_DIR")
    if where:
        path = Path(where) / f"e2e-{series}.json"
        path.write_text(json.dumps(as_dict(result), indent=2, default=str) + "\n")
    show(result, capture)
    return result


def show(report: Report, capture: object) -> None:
    text = "\n".join(
        [
            "",
            f"Pulp on pulp-pubsub, end to end, pulpcore {report.pulpcore}:",
            table(report),
            "",
            *contrast(report),
            f"latency ratio (pubsub-redis p50 / stock-direct p50): {latency_ratio(report)}",
            *(f"[{'PASS' if v.ok else 'FAIL'}] {v.name}: {v.figure}" for v in verdicts(report)),
            "",
        ]
    )
    if capture is not None:
        with capture.global_and_fixture_disabled():  # type: ignore[attr-defined]
            print(text)  # the figures are the point of this run
    else:
        print(text)


@pytest.fixture(scope="module", params=E2E_SERIES)
def report(request: pytest.FixtureRequest) -> Report:
    capture = request.config.pluginmanager.getplugin("capturemanager")
    return run_series(request.param, capture)


@pytest.fixture(scope="module")
def newest(request: pytest.FixtureRequest) -> Report:
    capture = request.config.pluginmanager.getplugin("capturemanager")
    return run_series(NEWEST, capture)


def test_both_ends_of_the_supported_series_are_run(report: Report) -> None:
    assert report.pulpcore is not None
    assert report.pulpcore.rsplit(".", 1)[0] in E2E_SERIES


@pytest.mark.parametrize("verdict", range(5))
def test_operator_scenario(report: Report, verdict: int) -> None:
    """Admin commands, API and content serving, REST cancel, forged cancel, outage."""
    found = operator_verdicts(report)
    assert len(found) == 5
    assert found[verdict].ok, f"{found[verdict].name}: {found[verdict].figure}"


def test_degraded_mode_keeps_pulp_working_through_a_nats_outage(newest: Report) -> None:
    """The operator's outage again on the nats backend: tasks start, a cancel lands."""
    [found] = nats_outage_verdicts(newest)
    assert found.ok, f"{found.name}: {found.figure}"


def test_the_pooler_error_names_the_pooler_and_the_way_out(report: Report) -> None:
    """The PostgreSQL backend behind PgBouncer, no PUBSUB_URL: loud, not silent."""
    pooler = report.pooler
    assert pooler is not None and pooler.error is not None
    assert "PgBouncer" in pooler.error and "PUBSUB_URL" in pooler.error
    assert pooler.ping not in (None, 0) and "PUBSUB_URL" in pooler.ping_says
    assert pooler.hear["heard"] == 0 and pooler.hear["deaf"] is True


def test_serving_programs_refuse_to_start_when_a_seam_moved_on_redis(report: Report) -> None:
    """Fail closed on Redis; on PostgreSQL, stock Pulp with a WARNING."""
    closed = report.fail_closed
    assert closed is not None
    assert set(closed.refused) == {"pulpcore-worker", "pulpcore-api", "pulpcore-content"}
    for name, refused in closed.refused.items():
        assert refused["exit"] not in (None, 0), name
        assert refused["refuses"] and refused["way_out"], refused["says"]
    assert closed.postgres_worker["running"] and closed.postgres_worker["warning"]


def test_every_contract_check_passes_on_pulpcores_own_classes(report: Report) -> None:
    failed = {name: c["detail"] for name, c in report.contract.items() if not c["ok"]}
    assert report.contract and not failed


def test_integration_is_installed_in_the_api_process(report: Report) -> None:
    integration = report.outcomes["pubsub_redis"].integration
    assert integration == {"installed": True, "reason": "", "problems": [], "backend": "redis"}


def test_every_task_starts_and_finishes_behind_pgbouncer(report: Report) -> None:
    ours = report.outcomes["pubsub_redis"]
    assert ours.tasks and ours.finished == len(ours.tasks)
    assert {t["phase"] for t in ours.tasks} == {"warmup", "latency", "async", "burst"}


def test_no_notify_reaches_postgresql(report: Report) -> None:
    assert report.outcomes["pubsub_redis"].stray_notifies == {}


def test_cancel_reaches_the_running_task_within_a_second(report: Report) -> None:
    ours = report.outcomes["pubsub_redis"]
    assert ours.cancel is not None and ours.cancel["state"] == "canceled"
    assert ours.cancel_latency is not None and ours.cancel_latency < CANCEL_SECONDS
    assert ours.cancel_waiting == {"first": "completed", "second": "canceled"}


def test_latency_is_close_to_stock(report: Report) -> None:
    ratio = latency_ratio(report)
    assert ratio is not None and ratio <= LATENCY_RATIO_CI


def test_idle_workers_use_no_more_transactions_than_stock(report: Report) -> None:
    # Stock's idle transactions are heartbeats; ours add a safety look per worker per
    # WORKER_TTL, so a 20 s window holds none or several of them: the verdict's bound.
    ours, stock = report.outcomes["pubsub_redis"], report.outcomes["stock_direct"]
    assert ours.idle_rate is not None and stock.idle_rate is not None
    assert ours.idle_rate <= IDLE_RATIO * stock.idle_rate


def test_idle_integrated_workers_use_fewer_transactions_than_polling_ones(newest: Report) -> None:
    ours, polling = newest.outcomes["pubsub_redis"].idle_rate, newest.outcomes["redis_type_stock"]
    assert ours is not None and polling.idle_rate is not None and ours < polling.idle_rate


#: The Redis type's verdicts this test holds: those that compare with the stock fleet's
#: timing are figures (the latency ratio is held below at LATENCY_RATIO_CI).
REDIS_TYPE_VERDICTS = 9


@pytest.mark.parametrize("verdict", range(REDIS_TYPE_VERDICTS))
def test_redis_type_workers_wait_for_wakeups_and_cancel_at_once(
    newest: Report, verdict: int
) -> None:
    """Stock and integrated WORKER_TYPE="redis" fleets side by side: tasks, cancel, idle
    transactions, a 64-task burst, SIGKILLed workers."""
    found = [
        v for v in redis_type_verdicts(newest) if "p50" not in v.name and "no later" not in v.name
    ]
    assert len(found) == REDIS_TYPE_VERDICTS
    assert found[verdict].ok, f"{found[verdict].name}: {found[verdict].figure}"


def test_redis_type_latency_is_close_to_polling(newest: Report) -> None:
    ours, stock = (
        newest.outcomes["redis_type_pubsub"].p50(),
        newest.outcomes["redis_type_stock"].p50(),
    )
    assert ours is not None and stock is not None and ours <= LATENCY_RATIO_CI * stock


def test_stock_workers_behind_the_same_pgbouncer_are_measured_for_contrast(
    newest: Report,
) -> None:
    stock = newest.outcomes["stock_pgbouncer"]
    assert stock.tasks and stock.idle_rate is not None
    assert stock.stray_notifies  # stock pulpcore signals through PostgreSQL


@pytest.mark.parametrize("scenario", ["mixed", "rollout"])
def test_a_mixed_fleet_runs_every_task_and_cancel(newest: Report, scenario: str) -> None:
    mixed = newest.outcomes[scenario]
    assert mixed.tasks and mixed.finished == len(mixed.tasks)
    assert mixed.cancel is not None and mixed.cancel["state"] == "canceled"
    assert mixed.workers_used.get("pubsub", 0) > 0
    assert all(n.endswith("canceled") for n in mixed.notes if n.startswith("cancel"))


@pytest.mark.parametrize("verdict", range(2))
def test_the_relay_runs_pulp_with_workers_behind_pgbouncer(newest: Report, verdict: int) -> None:
    """Every task and cancel through one relay; PostgreSQL holds the pool and the relay."""
    found = relay_verdicts(newest)
    assert len(found) == 2
    assert found[verdict].ok, f"{found[verdict].name}: {found[verdict].figure}"


@pytest.mark.parametrize("verdict", range(2))
def test_zookeeper_runs_pulp_with_workers_behind_pgbouncer(newest: Report, verdict: int) -> None:
    """Workers configured by PULP_* alone on a ZooKeeper server: every task and cancel, and
    PostgreSQL holds the pool and hears no NOTIFY."""
    found = zookeeper_verdicts(newest)
    assert len(found) == 2
    assert found[verdict].ok, f"{found[verdict].name}: {found[verdict].figure}"
