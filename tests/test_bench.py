"""Smoke tests of ``pubsub_bench``: every scenario runs, on every backend, and says something sane.

No timing threshold is asserted anywhere (this machine is shared and CI is
slower still); the tests hold the shape of the result and the figures that
do not depend on speed: counts equal N, nothing lost, no errors. The full run of every
scenario, and the relay's two-mode run, take tens of seconds: they are the long tier's.
"""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import psycopg
import pytest
from django.core.management import CommandError, call_command

from pulp_pubsub_tools.bench import SCENARIOS, BenchError
from pulp_pubsub_tools.bench.adapters import adapter_for
from pulp_pubsub_tools.testing import PostgresServer, RedisServer

N = 3
BACKENDS = ("memory", "postgres", "redis", "nats", "natsjs")


def bench(*args: str, blocker: Any) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    # The agents use Django's database connection (the benchmark's PostgreSQL, as a
    # Pulp worker uses its own): they are forked from here, and inherit the unblocking.
    with blocker.unblock():
        call_command("pubsub_bench", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: Any, django_db_blocker: Any) -> dict[str, Any]:
    """One quick run of everything on throwaway servers the benchmark starts itself."""
    tmp = tmp_path_factory.mktemp("bench")
    out, _ = bench(
        "--backends",
        ",".join(BACKENDS),
        "--quick",
        "--subscribers",
        str(N),
        "--json",
        str(tmp / "result.json"),
        "--plot",
        str(tmp / "result.png"),
        "--markdown",
        str(tmp / "result.md"),
        "--no-progress",
        blocker=django_db_blocker,
    )
    result = json.loads((tmp / "result.json").read_text())
    result["_out"], result["_tmp"] = out, tmp
    return dict(result)


pytestmark = [pytest.mark.backend, pytest.mark.servers]


@pytest.mark.long
def test_every_scenario_reports_every_backend(full_run: dict[str, Any]) -> None:
    assert full_run["meta"]["scenarios"] == list(SCENARIOS)
    for scenario in ("latency", "fanout", "targeted", "connections", "idle", "commit"):
        assert sorted(full_run[scenario]) == sorted(BACKENDS), scenario
    assert full_run["meta"]["params"]["subscribers"] == N
    assert full_run["meta"]["machine"]["cpus"] >= 1


@pytest.mark.long
def test_latency_compares_the_layer_with_the_raw_client(full_run: dict[str, Any]) -> None:
    for backend, r in full_run["latency"].items():
        assert r["layer"]["n"] > 0 and r["layer"]["lost"] == 0
        assert 0 < r["layer"]["p50"] <= r["layer"]["p99"]
        if backend == "memory":  # no client library to compare with
            assert "raw" not in r and r["raw_client"] is None
        else:
            assert r["raw"]["n"] == r["layer"]["n"] and r["raw"]["lost"] == 0
            assert r["ratio_p50"] > 0


@pytest.mark.long
def test_fanout_reaches_every_subscriber_every_round(full_run: dict[str, Any]) -> None:
    rounds = full_run["meta"]["params"]["rounds"]
    for r in full_run["fanout"].values():
        assert (r["subscribers"], r["lost"], r["resyncs"]) == (N, 0, 0)
        assert r["per_subscriber"]["n"] == N * rounds
        assert r["last"]["n"] == rounds
        assert 0 < r["first"]["p50"] <= r["last"]["p50"]
        cdf = r["per_subscriber_cdf"]
        assert len(cdf) == 101 and cdf == sorted(cdf)


@pytest.mark.long
def test_fanout_is_compared_with_the_bare_client(full_run: dict[str, Any]) -> None:
    rounds = full_run["meta"]["params"]["rounds"]
    for backend, r in full_run["fanout"].items():
        if backend == "memory":
            assert "raw" not in r
            continue
        assert r["raw"]["lost"] == 0 and r["raw"]["per_subscriber"]["n"] == N * rounds
        assert r["ratio_last_p50"] > 0
        # A message wakes a bare subscriber's thread at least once, and the layer's too.
        assert r["raw"]["wakeups_per_message"] >= 1
        assert r["wakeups_per_message"] >= 1


def test_a_variant_runs_its_backend_with_other_options() -> None:
    variant = adapter_for("redis+listener-reads")
    assert (variant.name, variant.backend) == ("redis+listener-reads", "redis")
    assert variant.options["owner_reads"] is False
    assert "owner_reads" not in adapter_for("redis").options
    with pytest.raises(BenchError, match="No variant 'fast' of 'redis'"):
        adapter_for("redis+fast")


#: The backends of the full run that deliver targeted messages natively.
TARGETING = {"memory", "redis", "natsjs"}


@pytest.mark.long
def test_targeted_delivery_reaches_one_subscriber_where_the_backend_targets(
    full_run: dict[str, Any],
) -> None:
    rounds = full_run["meta"]["params"]["rounds"]
    for backend, r in full_run["targeted"].items():
        targeted, broadcast = r["targeted"], r["broadcast"]
        assert targeted["lost"] == broadcast["lost"] == 0
        assert broadcast["deliveries_per_message"] == N
        if backend not in TARGETING:  # it falls back to broadcast, and says so
            assert r["delivery"] == "broadcast" and targeted["deliveries_per_message"] == N
        else:
            assert r["delivery"] == "targeted"
            assert targeted["deliveries_per_message"] == 1
            assert targeted["messages_handled_per_subscriber"] == round(rounds / N, 2)


@pytest.mark.long
def test_only_the_postgres_backend_holds_sessions(full_run: dict[str, Any]) -> None:
    held = {b: r["pg_sessions"] for b, r in full_run["connections"].items()}
    assert held == {"memory": 0, "postgres": N, "redis": 0, "nats": 0, "natsjs": 0}
    assert full_run["connections"]["redis"]["redis_clients"] >= N
    assert full_run["poll"]["pg_sessions"] == N


@pytest.mark.long
def test_idle_measures_cpu_and_transactions(full_run: dict[str, Any]) -> None:
    for backend, r in full_run["idle"].items():
        assert r["subscribers"] == N and r["window_s"] > 0
        assert r["cpu_s"] >= 0 and r["cpu_pct_of_core"] >= 0
        assert r["pg_xacts"] >= 0
        if backend != "postgres":  # its liveness probe is a query; the others touch no database
            assert r["pg_xacts"] == 0, backend
    # Polling is what the layer replaces: it queries all the time.
    assert full_run["poll"]["idle"]["pg_xacts"] > 0


@pytest.mark.long
def test_commit_counts_transactions_at_each_level(full_run: dict[str, Any]) -> None:
    for r in full_run["commit"].values():
        assert [level["subscribers"] for level in r["levels"]] == [0, N]
        for level in r["levels"]:
            assert level["commits_per_s"] > 0 and level["plain_commits_per_s"] > 0
            assert level["errors"] == 0 and level["plain_errors"] == 0
            # CPU per commit: the writers' and every throwaway server's, PostgreSQL's first.
            for cpu in (level["cpu_us_per_commit"], level["plain_cpu_us_per_commit"]):
                assert cpu["writers"] > 0 and cpu["postgres"] > 0, cpu
    assert "redis" in full_run["commit"]["redis"]["levels"][0]["cpu_us_per_commit"]
    assert "CPU µs/commit, yes - no" in full_run["_out"]


@pytest.mark.long
def test_poll_baseline_wakes_every_worker(full_run: dict[str, Any]) -> None:
    poll = full_run["poll"]
    assert (poll["workers"], poll["lost"]) == (N, 0)
    assert poll["per_worker"]["n"] == N * poll["rounds"]
    assert poll["period_ms"] == pytest.approx(N * 10)


@pytest.mark.long
def test_report_has_tables_targets_plot_and_markdown(full_run: dict[str, Any]) -> None:
    for title in ("Round trip", "reaching N", "Connections", "idle", "Commits/s", "Targets"):
        assert title in full_run["_out"]
    assert all(isinstance(t["met"], bool) for t in full_run["targets"])
    assert (full_run["_tmp"] / "result.png").read_bytes().startswith(b"\x89PNG")
    markdown = (full_run["_tmp"] / "result.md").read_text()
    assert "| backend |" in markdown and "result.png" in markdown


@pytest.mark.long
def test_load_redraws_without_running(full_run: dict[str, Any], django_db_blocker: Any) -> None:
    tmp = full_run["_tmp"]
    out, _ = bench(
        "--load",
        str(tmp / "result.json"),
        "--plot",
        str(tmp / "again.png"),
        blocker=django_db_blocker,
    )
    assert "Targets" in out and (tmp / "again.png").exists()


def test_given_servers_are_used_and_left_clean(django_db_blocker: Any) -> None:
    with PostgresServer(max_connections=60) as pg, RedisServer() as rds:
        bench(
            "connections",
            "--backends",
            "postgres,redis",
            "--quick",
            "--no-progress",
            "--postgres-url",
            pg.url,
            "--redis-url",
            rds.url,
            blocker=django_db_blocker,
        )
        with psycopg.connect(pg.url) as conn:
            tables = conn.execute("SELECT to_regclass('pubsub_bench_event')").fetchone()
        assert tables == (None,)  # the bench drops its tables from a server it was given


def test_a_server_too_small_for_n_is_refused(django_db_blocker: Any) -> None:
    with PostgresServer(max_connections=20) as pg, pytest.raises(CommandError, match="room for"):
        bench(
            "connections",
            "--backends",
            "redis",
            "--subscribers",
            "30",
            "--no-progress",
            "--postgres-url",
            pg.url,
            blocker=django_db_blocker,
        )


def test_unknown_scenario_and_backend_are_command_errors(django_db_blocker: Any) -> None:
    with pytest.raises(CommandError, match="Unknown scenario"):
        bench("nonsense", "--no-progress", blocker=django_db_blocker)
    with pytest.raises(CommandError, match="No benchmark adapter"):
        bench("latency", "--backends", "carrier-pigeon", "--no-progress", blocker=django_db_blocker)


@pytest.mark.long
def test_the_relay_holds_one_session_and_reaches_every_subscriber_in_both_modes(
    tmp_path: Any, django_db_blocker: Any
) -> None:
    bench(
        "connections",
        "fanout",
        "commit",
        "--backends",
        "relay,relay_direct",
        "--quick",
        "--subscribers",
        str(N),
        "--repeats",
        "2",
        "--json",
        str(tmp_path / "relay.json"),
        "--no-progress",
        blocker=django_db_blocker,
    )
    result = json.loads((tmp_path / "relay.json").read_text())
    for mode in ("relay", "relay_direct"):
        assert result["connections"][mode]["pg_sessions"] == 1  # the relay's, for all N
        assert result["fanout"][mode]["lost"] == 0
        for level in result["commit"][mode]["levels"]:
            assert level["errors"] == 0 and level["commits_per_s"] > 0
            # --repeats 2: two runs each way, and the share is the median of the pairs' ratios.
            pairs = list(zip(level["samples"], level["plain_samples"], strict=True))
            assert len(pairs) == 2
            assert level["share"] == round(sum(a / b for a, b in pairs) / 2, 4)
            # The relay is a throwaway server here: its CPU is counted (in pg_notify mode
            # it has nothing to do with commits, so no amount is asserted).
            assert level["cpu_us_per_commit"]["relay"] >= 0


def test_etcd_runs_beside_its_bare_gateway_client(django_db_blocker: Any, tmp_path: Any) -> None:
    """Round trip against a bare watch/put ping-pong, fan-out, connections and idle, on etcd."""
    bench(
        "latency",
        "fanout",
        "connections",
        "idle",
        "--backends",
        "etcd",
        "--quick",
        "--subscribers",
        str(N),
        "--json",
        str(tmp_path / "etcd.json"),
        "--no-progress",
        blocker=django_db_blocker,
    )
    result = json.loads((tmp_path / "etcd.json").read_text())
    latency = result["latency"]["etcd"]
    assert latency["raw_client"].startswith("etcd watch / put")
    assert latency["layer"]["lost"] == latency["raw"]["lost"] == 0
    assert latency["layer"]["p50"] > 0 and latency["raw"]["p50"] > 0
    assert result["fanout"]["etcd"]["lost"] == 0
    assert result["connections"]["etcd"]["etcd_watchers"] >= N
    assert "etcd" in result["idle"]["etcd"]["server_cpu_pct"]


def test_zookeeper_runs_beside_its_bare_kazoo_client(django_db_blocker: Any, tmp_path: Any) -> None:
    """Round trip against a bare ChildrenWatch/create ping-pong, fan-out and idle, on ZooKeeper."""
    bench(
        "latency",
        "fanout",
        "idle",
        "--backends",
        "zookeeper",
        "--quick",
        "--subscribers",
        str(N),
        "--json",
        str(tmp_path / "zookeeper.json"),
        "--no-progress",
        blocker=django_db_blocker,
    )
    result = json.loads((tmp_path / "zookeeper.json").read_text())
    latency = result["latency"]["zookeeper"]
    assert latency["raw_client"].startswith("kazoo ChildrenWatch")
    assert latency["layer"]["lost"] == latency["raw"]["lost"] == 0
    assert latency["layer"]["p50"] > 0 and latency["raw"]["p50"] > 0
    assert result["fanout"]["zookeeper"]["lost"] == 0
    assert "zookeeper" in result["idle"]["zookeeper"]["server_cpu_pct"]


@pytest.mark.parametrize(("with_wakeup", "met"), [(950, True), (850, False)])
def test_the_commit_share_target_compares_redis_with_and_without_wakeups(
    with_wakeup: int, met: bool
) -> None:
    from pulp_pubsub_tools.bench.report import evaluate_targets

    level = {"subscribers": 0, "commits_per_s": with_wakeup, "plain_commits_per_s": 1000}
    result = {"commit": {"redis": {"levels": [level, {**level, "subscribers": 3}]}}}
    [target] = [t for t in evaluate_targets(result) if t["backend"] == "redis"]
    assert target["met"] is met
    assert target["measured"].startswith(f"{with_wakeup // 10}%")


@pytest.mark.parametrize(
    ("direct", "redis", "met"),
    [
        # The raw rates of runs minutes apart say less than each backend's own share.
        ((6900, 7300, 0.95), (7200, 7800, 0.93), True),
        ((7300, 7700, 0.90), (7200, 7600, 0.94), False),
    ],
)
def test_direct_publishing_is_judged_by_its_share_against_redis(
    direct: tuple[int, int, float], redis: tuple[int, int, float], met: bool
) -> None:
    from pulp_pubsub_tools.bench.report import evaluate_targets

    def levels(rates: tuple[int, int, float]) -> list[dict[str, Any]]:
        top = {"subscribers": 250, "commits_per_s": rates[0], "plain_commits_per_s": rates[1]}
        return [{**top, "subscribers": 0}, {**top, "share": rates[2]}]

    result = {
        "commit": {"relay_direct": {"levels": levels(direct)}, "redis": {"levels": levels(redis)}}
    }
    [target] = [t for t in evaluate_targets(result) if t["backend"] == "relay_direct"]
    assert target["met"] is met
    assert target["measured"].startswith(f"{direct[2]:.1%} vs {redis[2]:.1%}")


def test_direct_publishing_without_shares_is_judged_by_raw_rates() -> None:
    from pulp_pubsub_tools.bench.report import evaluate_targets

    def levels(rate: int) -> list[dict[str, Any]]:
        return [{"subscribers": 250, "commits_per_s": rate, "plain_commits_per_s": 8000}]

    result = {
        "commit": {"relay_direct": {"levels": levels(7000)}, "redis": {"levels": levels(7100)}}
    }
    [target] = [t for t in evaluate_targets(result) if t["backend"] == "relay_direct"]
    assert target["met"] is False and target["measured"] == "7000/s vs 7100/s"
