"""The scenarios of the end-to-end run and the figures they produce.

1. ``contract``: the worker contract on pulpcore's real classes (:mod:`.contract`).
2. ``stock-direct``: stock pulpcore, LISTEN/NOTIFY on direct connections (the baseline).
3. ``pubsub-redis-pgbouncer``: the integration on Redis; every worker's database
   connection goes through PgBouncer in transaction pooling mode, with a pool
   smaller than the number of workers.
4. ``stock-pgbouncer``: stock pulpcore through that same PgBouncer, for contrast.
5. ``mixed``: a stock API process (``pg_notify``), one stock worker (LISTEN on a direct
   connection) and integrated workers on the PostgreSQL backend (Django's
   connection through PgBouncer, the listener direct), all at once.
6. ``redis-worker``: Pulp's own polling ``WORKER_TYPE = "redis"``, idle only.

Idle transactions are counted exactly from the server log over a window that
starts once the workers are up, before any task (so every scenario's
heartbeats are in the same phase).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .site import LOG_CONF, Site, default_venv, ensure_venv

LISTENER_NAME = "pulp-pubsub listener"
FINAL_OK = "completed"


@dataclass
class Config:
    workers: int = 4
    pool_size: int = 2
    latency_tasks: int = 20
    async_tasks: int = 5
    burst_tasks: int = 8
    #: Two heartbeat periods (WORKER_TTL / 3 = 10 s): every worker beats twice.
    idle_seconds: float = 20.0
    #: The scenarios only shown for contrast idle for less.
    contrast_idle_seconds: float = 10.0
    stock_pgbouncer_wait: float = 15.0
    scenarios: tuple[str, ...] = (
        "contract",
        "stock_direct",
        "pubsub_redis",
        "stock_pgbouncer",
        "mixed",
        "redis_worker",
    )
    venv: Path | None = None


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
        from tests.servers import PgBouncerServer, PostgresServer, RedisServer

        began = time.monotonic()
        venv = ensure_venv(self.config.venv or default_venv(), self.log)
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
            self.log("migrating a throwaway database")
            self.report.seconds["migrate"] = site.migrate_template()
            for name in self.config.scenarios:
                started = time.monotonic()
                getattr(self, name)()
                self.report.seconds[name] = time.monotonic() - started
        finally:
            if site is not None:
                site.cleanup()
            for server in (bouncer, redis_server, postgres):
                if server is not None:
                    server.cleanup()
        self.report.total_seconds = time.monotonic() - began
        return self.report

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
        workers: list[tuple[str, Path]],
        ready: Callable[[], bool] | None = None,
    ) -> None:
        site = self.site
        site.create_database(db)
        for name, settings in workers:
            site.start_worker(f"{db}-{name}", settings, "--name-template", f"{name}@{db}")
        site.wait(lambda: site.workers_registered(db) == len(workers), 90, f"{db} workers")
        if ready is not None:
            site.wait(ready, 30, f"{db} workers subscribed")

    def idle(
        self, outcome: Outcome, db: str, seconds: float | None = None, settle: bool = True
    ) -> None:
        """Count the transactions of idle workers, once the last task's echo has died down."""
        seconds = self.config.idle_seconds if seconds is None else seconds
        if seconds <= 0:
            return
        if settle:
            self.site.wait_quiet(db)
        self.log(f"  {outcome.name}: {seconds:.0f} s idle")
        start = time.time()
        threading.Event().wait(seconds)  # a measuring window, not a synchronisation
        end = time.time()
        outcome.idle_xacts = self.site.transactions(db, start, end)
        outcome.idle_seconds = end - start

    def drive(self, outcome: Outcome, db: str, api: Path, **opts: Any) -> None:
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
        outcome.cancel = result.get("cancel")
        outcome.cancel_waiting = result.get("cancel_waiting")
        outcome.stray_notifies = result.get("stray_notifies")
        outcome.integration = result.get("integration")

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

    def stock_direct(self) -> None:
        k, db = self.config.workers, "stock_direct"
        self.log(f"stock-direct: {k} stock workers, LISTEN/NOTIFY on direct connections")
        outcome = Outcome(db, "stock pulpcore, LISTEN/NOTIFY", k, "direct")
        workers = self.pulp_settings(f"{db}-worker", db, via_bouncer=False, OTEL_ENABLED=True)
        api = self.pulp_settings(f"{db}-api", db, via_bouncer=False)
        self.start_fleet(db, [(f"stock{i}", workers) for i in range(k)])
        self.drive(outcome, db, api)
        self.idle(outcome, db)
        self.site.stop_all()
        self.report.outcomes[db] = outcome

    def pubsub_redis(self) -> None:
        k, db = self.config.workers, "pubsub_redis"
        pool = self.config.pool_size
        self.log(f"pubsub-redis: {k} integrated workers on Redis, PgBouncer pool of {pool}")
        outcome = Outcome(db, "pulp-pubsub, Redis backend", k, f"PgBouncer txn, pool {pool}")
        layer = self.integrated(
            PUBSUB_BACKEND="redis", PUBSUB_URL=self.redis_url, PUBSUB_CHANNEL_PREFIX=f"{db}."
        )
        workers = self.pulp_settings(
            f"{db}-worker", db, via_bouncer=True, OTEL_ENABLED=True, **layer
        )
        api = self.pulp_settings(f"{db}-api", db, via_bouncer=True, **layer)
        self.start_fleet(
            db,
            [(f"pubsub{i}", workers) for i in range(k)],
            ready=lambda: self.redis_subscribers(f"{db}.pulp_worker_wakeup") == k,
        )
        self.drive(outcome, db, api)
        self.idle(outcome, db)
        self.site.stop_all()
        self.report.outcomes[db] = outcome

    def stock_pgbouncer(self) -> None:
        k, db = self.config.workers, "stock_pgbouncer"
        pool = self.config.pool_size
        self.log(f"stock-pgbouncer: {k} stock workers through the same PgBouncer")
        outcome = Outcome(db, "stock pulpcore, LISTEN/NOTIFY", k, f"PgBouncer txn, pool {pool}")
        workers = self.pulp_settings(f"{db}-worker", db, via_bouncer=True, OTEL_ENABLED=True)
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
        self.idle(outcome, db, self.config.contrast_idle_seconds)
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
            db, fleet, ready=lambda: self.site.listener_sessions(LISTENER_NAME) == pubsub
        )
        self.drive(outcome, db, stock, async_tasks=0, burst_tasks=3 * k, burst_seconds=0.5)
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
        self.idle(outcome, db, self.config.contrast_idle_seconds, settle=False)  # it polls
        self.site.stop_all()
        self.report.outcomes[db] = outcome
