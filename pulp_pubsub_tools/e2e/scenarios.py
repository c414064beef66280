"""The scenarios of the end-to-end run and the figures they produce.

1. ``contract``: the worker contract on pulpcore's real classes (:mod:`.contract`).
   ``operator``: real API, content app and workers configured by ``PULP_*`` alone:
   admin commands, REST cancel, a forged cancel, a Redis outage (:mod:`.operator`);
   ``operator_nats`` (when named): that outage again on the nats backend.
   ``pooler``: the PostgreSQL backend behind PgBouncer with no ``PUBSUB_URL``: a loud
   error in the worker's log and a failing ``pubsub_ping``, not silence.
   ``fail_closed``: a pulpcore whose seam moved: on Redis the worker, API and content
   app refuse to start; on PostgreSQL the worker runs stock with a WARNING
   (:mod:`.failures`).
2. ``head_to_head``, two fleets at once, their latency tasks alternating in rounds:
   ``stock_direct``, stock pulpcore with LISTEN/NOTIFY on direct connections (the
   baseline), and ``pubsub_redis``, the integration on Redis with every worker's
   database connection going through PgBouncer in transaction pooling mode, with a
   pool smaller than the number of workers.
3. ``stock_pgbouncer``: stock pulpcore through that same PgBouncer, for contrast.
4. ``mixed``: a stock API process (``pg_notify``), one stock worker (LISTEN on a direct
   connection) and integrated workers on the PostgreSQL backend (Django's
   connection through PgBouncer, the listener direct), all at once.
5. ``rollout``: half-way through a rolling move to Redis: a stock API and stock worker,
   moved API and workers (Redis, ``PUBSUB_PULPCORE_ALSO_NOTIFY``), and the bridge.
6. ``redis_type``: Pulp's ``WORKER_TYPE = "redis"``, stock (polling) and integrated fleets
   side by side (:mod:`.redistype`); ``redis_worker``, run only when named, is the stock
   fleet idle alone.

Idle transactions are counted exactly from the server log (every statement is
logged with its virtual transaction id) over a window of two heartbeat periods
that opens once the database has been quiet for a second after the last task.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pulp_pubsub.contrib.pulpcore.compat import E2E_SERIES

from .site import LOG_CONF, Settings, Site, default_venv, ensure_venv

LISTENER_NAME = "pulp-pubsub listener"
BRIDGE_NAME = "pulp-pubsub bridge"
FINAL_OK = "completed"


@dataclass
class Config:
    workers: int = 4
    pool_size: int = 2
    latency_tasks: int = 20
    #: The latency tasks alternate between the fleets in this many rounds.
    rounds: int = 4
    async_tasks: int = 5
    burst_tasks: int = 8
    #: Two heartbeat periods (WORKER_TTL / 3 = 10 s): every worker beats twice.
    idle_seconds: float = 20.0
    #: The scenarios only shown for contrast idle for less.
    contrast_idle_seconds: float = 10.0
    stock_pgbouncer_wait: float = 15.0
    scenarios: tuple[str, ...] = (
        "contract",
        "operator",
        "pooler",
        "fail_closed",
        "head_to_head",
        "stock_pgbouncer",
        "mixed",
        "rollout",
        "redis_type",
    )
    #: The pulpcore series (MAJOR.MINOR) to install from PyPI.
    series: str = E2E_SERIES[-1]
    venv: Path | None = None
    #: How long Redis stays down in the operator scenario's outage.
    outage_seconds: float = 60.0
    #: ``redis_type``: this many tasks dispatched at once onto this many workers of each kind.
    redis_burst: tuple[int, int] = (64, 16)
    #: Copy the server and process logs here before the throwaway servers go.
    keep_logs: Path | None = None


@dataclass
class Outcome:
    name: str
    description: str
    workers: int
    db_path: str
    tasks: list[dict[str, Any]] = field(default_factory=list)
    cancel: dict[str, Any] | None = None
    cancel_waiting: dict[str, Any] | None = None
    idle_xacts: int | None = None
    idle_seconds: float | None = None
    stray_notifies: dict[str, int] | None = None
    integration: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    workers_used: dict[str, int] = field(default_factory=dict)
    #: Faults and what followed (the ``redis_type`` scenario).
    faults: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> int:
        return sum(1 for t in self.tasks if t["state"] == FINAL_OK)

    @property
    def started(self) -> int:
        return sum(1 for t in self.tasks if t["wait"] is not None)

    def waits(self, phase: str | None = None) -> list[float]:
        return [
            t["wait"]
            for t in self.tasks
            if t["wait"] is not None and (phase is None or t["phase"] == phase)
        ]

    def p50(self, phase: str = "latency") -> float | None:
        waits = self.waits(phase)
        return statistics.median(waits) if waits else None

    @property
    def idle_rate(self) -> float | None:
        if self.idle_xacts is None or not self.idle_seconds:
            return None
        return self.idle_xacts / self.idle_seconds

    @property
    def cancel_latency(self) -> float | None:
        return None if self.cancel is None else self.cancel.get("latency")


@dataclass
class Report:
    config: Config
    contract: dict[str, dict[str, Any]] = field(default_factory=dict)
    operator: Any = None  # an operator.OperatorOutcome
    operator_nats: Any = None  # the same, of the outage on the nats backend
    pooler: Any = None  # a failures.PoolerOutcome
    fail_closed: Any = None  # a failures.FailClosedOutcome
    pulpcore: str | None = None
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0


class Run:
    def __init__(self, config: Config, log: Callable[[str], None]) -> None:
        self.config = config
        self.log = log
        self.report = Report(config)

    # -- the whole run -----------------------------------------------------------

    def run(self) -> Report:
        from pulp_pubsub_tools.testing import PgBouncerServer, PostgresServer, RedisServer

        began = time.monotonic()
        series = self.config.series
        venv = ensure_venv(self.config.venv or default_venv(series), series, self.log)
        self.report.seconds["virtualenv"] = time.monotonic() - began
        k = self.config.workers
        postgres = PostgresServer(max_connections=100 + 4 * k, extra_conf=LOG_CONF)
        redis_server = RedisServer()
        bouncer: Any = None
        site: Site | None = None
        try:
            postgres.start()
            redis_server.start()
            bouncer = PgBouncerServer(
                postgres, pool_mode="transaction", default_pool_size=self.config.pool_size
            ).start()
            site = Site(venv, postgres)
            self.site, self.redis_url, self.bouncer = site, redis_server.url, bouncer
            self.redis_server = redis_server
            self.report.pulpcore = site.pulpcore_version()
            self.log("migrating a throwaway database")
            self.report.seconds["migrate"] = site.migrate_template()
            for name in self.config.scenarios:
                started = time.monotonic()
                getattr(self, name)()
                self.report.seconds[name] = time.monotonic() - started
        finally:
            if self.config.keep_logs is not None:
                self.keep_logs(self.config.keep_logs, postgres, site)
            if site is not None:
                site.cleanup()
            for server in (bouncer, redis_server, postgres):
                if server is not None:
                    server.cleanup()
        self.report.total_seconds = time.monotonic() - began
        return self.report

    @staticmethod
    def keep_logs(where: Path, postgres: Any, site: Site | None) -> None:
        where.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy(postgres.log_path, where / "postgres.log")
        if site is not None:
            shutil.copytree(site.root / "logs", where / "processes", dirs_exist_ok=True)

    # -- pieces ------------------------------------------------------------------

    def pulp_settings(self, name: str, db: str, via_bouncer: bool, **values: Any) -> Path:
        site = self.site
        database = site.database(db, via=self.bouncer if via_bouncer else None)
        return site.settings(name, database, **values)

    def integrated(self, **values: Any) -> dict[str, Any]:
        return {"INSTALLED_APPS": ["dynaconf_merge", "pulp_pubsub"], **values}

    def redis_subscribers(self, channel: str = "pulp_worker_wakeup") -> int:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
        finally:
            client.close()

    def start_fleet(
        self,
        db: str,
        workers: Sequence[tuple[str, Settings]],
        ready: Callable[[], bool] | None = None,
    ) -> None:
        site = self.site
        site.create_database(db)
        for name, settings in workers:
            site.start_worker(f"{db}-{name}", settings, "--name-template", f"{name}@{db}")
        # A worker takes seconds of CPU to start: a large fleet on a small machine, longer.
        timeout = max(90.0, 5.0 * len(workers))
        site.wait(lambda: site.workers_registered(db) == len(workers), timeout, f"{db} workers")
        if ready is not None:
            site.wait(ready, 30, f"{db} workers subscribed")

    def idle(
        self, outcomes: dict[str, Outcome], seconds: float | None = None, settle: bool = True
    ) -> None:
        """Count the transactions of idle fleets (one database each) over one window.

        The window opens once the last task's echo has died down (``settle``).
        """
        seconds = self.config.idle_seconds if seconds is None else seconds
        if seconds <= 0:
            return
        if settle:
            for db in outcomes:
                self.site.wait_quiet(db)
        self.log(f"  {', '.join(outcomes)}: {seconds:.0f} s idle")
        start = time.time()
        threading.Event().wait(seconds)  # a measuring window, not a synchronisation
        end = time.time()
        for db, outcome in outcomes.items():
            outcome.idle_xacts = self.site.transactions(db, start, end)
            outcome.idle_seconds = end - start

    def drive(self, outcome: Outcome, db: str, api: Settings, **opts: Any) -> None:
        config = self.config
        defaults = {
            "latency_tasks": config.latency_tasks,
            "async_tasks": config.async_tasks,
            "burst_tasks": config.burst_tasks,
            "cancel": True,
            "start_timeout": 30,
            "observer_dsn": self.site.dsn(db),
        }
        result = self.site.agent(api, "drive", {**defaults, **opts})
        for phase, records in result["phases"].items():
            for record in records:
                outcome.tasks.append({**record, "phase": phase})
                if record.get("worker"):
                    kind = record["worker"].split("@")[0].rstrip("0123456789")
                    outcome.workers_used[kind] = outcome.workers_used.get(kind, 0) + 1
        for key in ("cancel", "cancel_waiting", "integration"):
            if key in result:
                setattr(outcome, key, result[key])
        stray = dict(outcome.stray_notifies or {})
        for channel, n in result.get("stray_notifies", {}).items():
            stray[channel] = stray.get(channel, 0) + n
        outcome.stray_notifies = stray

    # -- the scenarios --------------------------------------------------------------

    def contract(self) -> None:
        self.log("contract: pulpcore's worker on the layer, check by check")
        db = "contract"
        self.site.create_database(db)
        settings = self.pulp_settings(
            db,
            db,
            via_bouncer=True,
            **self.integrated(
                PUBSUB_BACKEND="redis",
                PUBSUB_URL=self.redis_url,
                PUBSUB_CHANNEL_PREFIX="contract.",
                OTEL_ENABLED=True,
            ),
        )
        result = self.site.agent(
            settings, "contract", {"redis_url": self.redis_url, "observer_dsn": self.site.dsn(db)}
        )
        self.report.contract = result["checks"]

    def operator(self) -> None:
        from .operator import Operator

        self.log(
            "operator: pulpcore-api, pulpcore-content and workers configured by PULP_* only; "
            f"admin commands, REST cancel, forged cancel, Redis down "
            f"{self.config.outage_seconds:.0f} s"
        )
        self.report.operator = Operator(self, outage_seconds=self.config.outage_seconds)()

    def operator_nats(self) -> None:
        from .operator import NatsOperator

        self.log(
            f"operator-nats: the same Pulp on the nats backend, nats-server down "
            f"{self.config.outage_seconds:.0f} s while tasks are dispatched and one canceled"
        )
        self.report.operator_nats = NatsOperator(self, outage_seconds=self.config.outage_seconds)()

    def pooler(self) -> None:
        from .failures import Pooler

        self.log(
            "pooler: the PostgreSQL backend, Django's database through PgBouncer (transaction "
            "pooling), no PUBSUB_URL: pulpcore-worker and pulpcore-api"
        )
        self.report.pooler = Pooler(self)()

    def fail_closed(self) -> None:
        from .failures import FailClosed

        self.log(
            "fail-closed: a moved seam; on Redis pulpcore-worker, -api and -content must refuse "
            "to start, on PostgreSQL the worker runs stock with a WARNING"
        )
        self.report.fail_closed = FailClosed(self)()

    def head_to_head(self) -> None:
        """Stock on direct connections against the integration behind PgBouncer.

        Both fleets run at once (each on its own database) and the latency
        tasks alternate between them in rounds, so load from anything else on
        the machine falls on both alike; their idle windows are the same window.
        """
        k, pool = self.config.workers, self.config.pool_size
        self.log(
            f"head to head: {k} stock workers (LISTEN/NOTIFY, direct) and {k} integrated "
            f"workers (Redis; PgBouncer transaction pool of {pool})"
        )
        stock = Outcome("stock_direct", "stock pulpcore, LISTEN/NOTIFY", k, "direct")
        ours = Outcome(
            "pubsub_redis", "pulp-pubsub, Redis backend", k, f"PgBouncer txn, pool {pool}"
        )
        # Pulp's defaults (OTEL_ENABLED off): nothing but heartbeats while idle, so
        # both fleets' idle counts are in lockstep. The metrics heartbeat has the
        # contract, and the mixed and rollout fleets, which run with it on.
        stock_workers = self.pulp_settings("stock_direct-worker", stock.name, via_bouncer=False)
        stock_api = self.pulp_settings("stock_direct-api", stock.name, via_bouncer=False)
        layer = self.integrated(
            PUBSUB_BACKEND="redis", PUBSUB_URL=self.redis_url, PUBSUB_CHANNEL_PREFIX="pubsub."
        )
        our_workers = self.pulp_settings(
            "pubsub_redis-worker", ours.name, via_bouncer=True, **layer
        )
        our_api = self.pulp_settings("pubsub_redis-api", ours.name, via_bouncer=True, **layer)
        self.start_fleet(stock.name, [(f"stock{i}", stock_workers) for i in range(k)])
        self.start_fleet(
            ours.name,
            [(f"pubsub{i}", our_workers) for i in range(k)],
            ready=lambda: self.redis_subscribers("pubsub.pulp_worker_wakeup") == k,
        )
        rounds = max(1, min(self.config.rounds, self.config.latency_tasks))
        per_round = -(-self.config.latency_tasks // rounds)
        pairs = [(stock, stock_api), (ours, our_api)]
        only_latency = {"async_tasks": 0, "burst_tasks": 0, "cancel": False}
        for n in range(rounds):
            for outcome, api in pairs if n % 2 == 0 else pairs[::-1]:
                self.drive(outcome, outcome.name, api, latency_tasks=per_round, **only_latency)
        for outcome, api in pairs:
            self.drive(outcome, outcome.name, api, latency_tasks=0)
        self.idle({stock.name: stock, ours.name: ours})
        self.site.stop_all()
        self.report.outcomes.update({stock.name: stock, ours.name: ours})

    def stock_pgbouncer(self) -> None:
        k, db = self.config.workers, "stock_pgbouncer"
        pool = self.config.pool_size
        self.log(f"stock-pgbouncer: {k} stock workers through the same PgBouncer")
        outcome = Outcome(db, "stock pulpcore, LISTEN/NOTIFY", k, f"PgBouncer txn, pool {pool}")
        workers = self.pulp_settings(f"{db}-worker", db, via_bouncer=True)
        api = self.pulp_settings(f"{db}-api", db, via_bouncer=True)
        self.start_fleet(db, [(f"stock{i}", workers) for i in range(k)])
        wait = self.config.stock_pgbouncer_wait
        self.drive(
            outcome,
            db,
            api,
            latency_tasks=0,
            async_tasks=0,
            burst_tasks=k,
            burst_timeout=wait,
            start_timeout=wait,
        )
        outcome.notes.append(f"waited {wait:.0f} s for tasks to start")
        self.idle({db: outcome}, self.config.contrast_idle_seconds)
        self.site.stop_all()
        self.report.outcomes[db] = outcome

    def mixed(self) -> None:
        k, db = self.config.workers, "mixed"
        pubsub = max(1, k - 1)
        self.log(f"mixed: stock API and 1 stock worker, {pubsub} integrated on PostgreSQL")
        outcome = Outcome(db, "mixed: stock API + stock and pulp-pubsub workers", k, "mixed")
        stock = self.pulp_settings(f"{db}-stock", db, via_bouncer=False, OTEL_ENABLED=True)
        layer = self.integrated(
            PUBSUB_BACKEND="postgres", PUBSUB_URL=self.site.dsn(db), OTEL_ENABLED=True
        )
        integrated = self.pulp_settings(f"{db}-pubsub", db, via_bouncer=True, **layer)
        fleet = [("stock0", stock)] + [(f"pubsub{i}", integrated) for i in range(pubsub)]
        self.start_fleet(
            db, fleet, ready=lambda: self.site.listener_sessions(LISTENER_NAME, db) == pubsub
        )
        self.drive(outcome, db, stock, async_tasks=0, burst_tasks=3 * k, burst_seconds=0.5)
        self.site.stop_all()
        self.report.outcomes[db] = outcome

    def rollout(self) -> None:
        """Half-way through a rolling move to Redis: old and new processes, and the bridge."""
        k, db = self.config.workers, "rollout"
        moved = max(1, k - 2)
        self.log(
            f"rollout: stock API + {k - moved} stock worker(s) on LISTEN/NOTIFY, new API + "
            f"{moved} worker(s) on Redis (also NOTIFY), one bridge"
        )
        outcome = Outcome(db, "rolling move to Redis, bridge", k, "mixed")
        old = self.pulp_settings(f"{db}-old", db, via_bouncer=False, OTEL_ENABLED=True)
        layer = self.integrated(
            PUBSUB_BACKEND="redis",
            PUBSUB_URL=self.redis_url,
            PUBSUB_CHANNEL_PREFIX="rollout.",
            PUBSUB_PULPCORE_ALSO_NOTIFY=True,
            OTEL_ENABLED=True,
        )
        new = self.pulp_settings(f"{db}-new", db, via_bouncer=True, **layer)
        fleet = [(f"stock{i}", old) for i in range(k - moved)]
        fleet += [(f"pubsub{i}", new) for i in range(moved)]
        bridge_settings = self.pulp_settings(f"{db}-bridge", db, via_bouncer=True, **layer)
        self.site.start_bridge(f"{db}-bridge", bridge_settings, self.site.dsn(db))
        self.start_fleet(
            db,
            fleet,
            ready=lambda: (
                self.redis_subscribers("rollout.pulp_worker_wakeup") == moved
                and self.site.listener_sessions(BRIDGE_NAME, db) == 1
            ),
        )
        for api in (old, new):  # each side's API dispatches and cancels
            self.drive(outcome, db, api, async_tasks=0, burst_tasks=2 * k, burst_seconds=0.5)
            outcome.notes.append(
                f"cancel from the {'old' if api is old else 'new'} API: "
                f"{(outcome.cancel or {}).get('state')}"
            )
        self.site.stop_all()
        self.report.outcomes[db] = outcome

    def redis_worker(self) -> None:
        k, db = self.config.workers, "redis_worker"
        self.log(f"redis-worker: {k} of Pulp's polling redis workers, idle")
        outcome = Outcome(db, 'stock pulpcore, WORKER_TYPE="redis"', k, "direct")
        workers = self.pulp_settings(
            f"{db}-worker", db, via_bouncer=False, WORKER_TYPE="redis", REDIS_URL=self.redis_url
        )
        self.start_fleet(db, [(f"redis{i}", workers) for i in range(k)])
        self.idle({db: outcome}, self.config.contrast_idle_seconds, settle=False)  # it polls
        self.site.stop_all()
        self.report.outcomes[db] = outcome

    def redis_type(self) -> None:
        from .redistype import redis_type

        redis_type(self)

    def relay_pgbouncer(self) -> None:
        from .relayfleet import relay_pgbouncer

        relay_pgbouncer(self)

    def zookeeper_pgbouncer(self) -> None:
        from .zkfleet import zookeeper_pgbouncer

        zookeeper_pgbouncer(self)


#: Scenarios run only when named (``--scenarios``), not by default.
OPTIONAL_SCENARIOS = ("relay_pgbouncer", "operator_nats", "redis_worker", "zookeeper_pgbouncer")
