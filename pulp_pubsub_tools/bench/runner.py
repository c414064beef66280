"""Puts the scenarios in order, per backend, and collects one JSON-ready result."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

from pulp_pubsub.backends.base import COMMON_OPTIONS
from pulp_pubsub.handler import backend_class

from . import SCENARIOS, BenchError, roles, scenarios
from .adapters import Target, adapter_for, django_database
from .agents import Fleet
from .board import Board
from .monitor import Monitor, RedisMonitor
from .progress import Progress
from .report import evaluate_targets
from .servers import ServerSet, check_postgres_capacity

#: The order scenarios run in for one backend. Idle comes before any wake-up reaches
#: the subscribers: a PostgreSQL listener runs a transaction for each NOTIFY it is
#: signalled about, and reports those only at its next command, which would be
#: the liveness probe inside the idle window. Commit then shrinks the fleet N, 100, 0.
#: Poll needs no backend and runs last.
RUN_ORDER = ("latency", "connections", "idle", "fanout", "targeted", "commit")


@dataclass
class Params:
    subscribers: int = 250
    pings: int = 2000
    rounds: int = 50
    window: float = 30.0
    writers: int = 4
    duration: float = 5.0
    #: Commit runs per subscriber level, each with and without a wake-up in turn:
    #: one backend's two rates then see the same drift of a shared machine.
    repeats: int = 1
    poll_rounds: int = 10
    #: Seconds between the last agent starting and an idle window. PostgreSQL
    #: publishes a session's counters up to 10 s late (PGSTAT_IDLE_INTERVAL) when it
    #: ran a statement within a second of its last report, so a subscriber's LISTEN
    #: at start-up would otherwise count as idle traffic.
    settle: float = 11.0
    #: Start an idle window only after each subscriber has probed once: its first
    #: probe also opens a connection (Redis: the publish pool), and a PostgreSQL
    #: listener reports the transactions other sessions' NOTIFYs (their probes) cost
    #: it only at its own next probe, so the window shows the steady state.
    steady: bool = True

    @property
    def commit_levels(self) -> list[int]:
        return sorted({0, min(100, self.subscribers), self.subscribers}, reverse=True)

    def check(self) -> None:
        for name in ("subscribers", "pings", "rounds", "writers", "repeats", "poll_rounds"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be at least 1.")
        if self.window <= 0 or self.duration <= 0:
            raise BenchError("--window and --duration must be positive.")


QUICK = Params(
    subscribers=5,
    pings=100,
    rounds=5,
    window=1.0,
    writers=2,
    duration=0.5,
    poll_rounds=2,
    settle=0.2,
    steady=False,
)


class Context:
    """What every scenario shares: parameters, servers, monitors, progress."""

    connect_wait = 120.0

    def __init__(self, params: Params, servers: ServerSet, progress: Progress) -> None:
        self.params, self.servers, self.progress = params, servers, progress
        self._monitor: Monitor | None = None
        self._redis_monitor: RedisMonitor | None = None

    def postgres_needed(self) -> int:
        """Sessions a run may hold at once: N subscribers, writers, pingers, a publisher."""
        p = self.params
        return p.subscribers + p.writers + 12

    def monitor(self) -> Monitor:
        if self._monitor is None:
            monitor = Monitor(self.servers.url("postgres"))
            if "postgres" in self.servers.given:
                check_postgres_capacity(monitor, self.postgres_needed())
            monitor.create_tables()
            self._monitor = monitor
        return self._monitor

    def redis_monitor(self) -> RedisMonitor:
        if self._redis_monitor is None:
            self._redis_monitor = RedisMonitor(self.servers.url("redis"))
        return self._redis_monitor

    @staticmethod
    def application_name(role: str) -> str:
        return f"pubsub-bench {role}"

    def agent_setup(self, role: str) -> Any:
        """Make the benchmark's PostgreSQL the agent's ``default`` database, named by role."""
        self.monitor()  # the server runs and the tables exist before any agent needs them
        database = django_database(self.servers.url("postgres"))
        database["OPTIONS"] = {"application_name": self.application_name(role)}
        return roles.use_database(database)

    def wait_gone(self, *agent_roles: str) -> None:
        """After agents of these roles ended: wait until the server has let go of them too."""
        if self._monitor is not None:
            for role in agent_roles:
                self._monitor.wait_gone(self.application_name(role))

    def close(self) -> None:
        if self._monitor is not None:
            if "postgres" in self.servers.given:
                self._monitor.drop_tables()
            self._monitor.close()
        if self._redis_monitor is not None:
            self._redis_monitor.close()


class BackendRun:
    """One backend's run: its target, its fleet of idle subscribers, its writers."""

    def __init__(self, ctx: Context, target: Target) -> None:
        self.ctx, self.target = ctx, target
        self.settings = target.settings_for("subscriber")
        self.fleet = Fleet()
        # Made before any subscriber is forked: every one of them shares it.
        self.board = Board(ctx.params.subscribers)
        self._round = 0
        self.writers = Fleet()

    def start_writers(self) -> None:
        """The commit scenario's writers, forked first: the subscribers of an in-process
        backend are threads, and a fork should find no other thread in the parent."""
        writer = roles.writer(self.target.settings_for("writer"), scenarios.COMMIT)
        self.writers.spawn(
            self.ctx.params.writers,
            "writer",
            scenarios.fixed(writer),
            in_process=False,
            setup=self.setup("writer", database=True),
        )
        scenarios.wait_ready(self.writers, self.ctx, f"{self.target.name}: starting writers")

    def next_round(self) -> int:
        self._round += 1
        return self._round

    @property
    def probe_interval(self) -> float:
        return float(self.settings.options.get("probe_interval", COMMON_OPTIONS["probe_interval"]))

    def setup(self, role: str, database: bool = False) -> Any:
        """The agent set-up: its Django ``default`` is the bench PostgreSQL where there is one.

        Subscribers get it too (when the run has a PostgreSQL anyway), so a session that a
        backend opened behind their back would show in ``pg_stat_activity`` under their name.
        """
        if self.target.in_process and not database:
            return None
        if (
            database
            or self.target.adapter.server == "postgres"
            or "postgres" in self.ctx.servers.urls
        ):
            return self.ctx.agent_setup(role)
        return None

    def session_names(self) -> list[str]:
        """What a subscriber's sessions are called: its Django one, its backend's own."""
        names = [self.ctx.application_name("subscriber")]
        listener = self.settings.options.get("application_name")
        if listener and listener not in names:
            names.append(listener)
        return names + list(self.target.adapter.extra_sessions)

    def shrink(self, count: int) -> None:
        self.fleet.shrink(count)

    def grow(self, count: int) -> None:
        missing = count - len(self.fleet)
        if missing <= 0:
            return
        new = self.fleet.spawn(
            missing,
            "subscriber",
            roles.subscriber(self.settings, scenarios.WAKE, self.board),
            in_process=self.target.in_process,
            setup=self.setup("subscriber"),
        )
        scenarios.wait_ready(self.fleet, self.ctx, f"{self.target.name}: starting subscribers", new)

    def close(self) -> None:
        self.writers.close()
        self.fleet.close()
        self.board.close()
        self.ctx.wait_gone("writer", "subscriber")


SCENARIO_FUNCTIONS = {name: getattr(scenarios, name) for name in RUN_ORDER}


def run_benchmark(
    params: Params,
    chosen: list[str],
    backends: list[str],
    servers: ServerSet,
    progress: Progress,
    command: str,
) -> dict[str, Any]:
    params.check()
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        raise BenchError(
            f"Unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}."
        )
    adapters = [adapter_for(name) for name in backends]
    for adapter in adapters:
        if adapter.max_subscribers and params.subscribers > adapter.max_subscribers:
            raise BenchError(
                f"The {adapter.name} backend runs its subscribers as threads of this process: "
                f"at most --subscribers {adapter.max_subscribers}."
            )
    for adapter in adapters:
        # Imported now: agents share the code, and errors come early.
        backend_class(adapter.backend or adapter.name)
    if any(a.server == "postgres" for a in adapters) or set(chosen) - {"latency", "fanout"}:
        from django.db.utils import load_backend

        load_backend("django.db.backends.postgresql")
    # The layer's fleet (one session each on postgres) stays up while the bare psycopg
    # subscribers run beside it, one session each too (a bare client opens its publishing
    # connection only when it publishes).
    servers.max_connections = max(100, 2 * params.subscribers + params.writers + 50)
    ctx = Context(params, servers, progress)
    started = time.monotonic()
    meta = new_meta(command, backends, {**asdict(params), "commit_levels": params.commit_levels})
    meta["scenarios"] = [name for name in SCENARIOS if name in chosen]
    result: dict[str, Any] = {"meta": meta}
    for name in SCENARIOS:
        if name in chosen:
            result[name] = {}
    try:
        for adapter in adapters:
            run = BackendRun(ctx, adapter.target(servers))
            try:
                if "commit" in chosen:
                    run.start_writers()
                for name in RUN_ORDER:
                    if name in chosen:
                        result[name][adapter.name] = SCENARIO_FUNCTIONS[name](ctx, run)
            finally:
                run.close()
        if "poll" in chosen:
            result["poll"] = scenarios.poll(ctx)
        meta = result["meta"]
        meta["servers"] = servers.describe()
        if ctx._monitor is not None:
            meta["postgres_version"] = ctx._monitor.version
        if ctx._redis_monitor is not None:
            meta["redis_version"] = ctx._redis_monitor.version
    finally:
        ctx.close()
    finish_meta(result["meta"], started)
    result["targets"] = evaluate_targets(result)
    return result


def new_meta(command: str, backends: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """What a result says about how it was made, before the run."""
    return {
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "params": params,
        "backends": backends,
    }


def finish_meta(meta: dict[str, Any], started: float) -> None:
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["load_after"] = [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    """Where the figures come from: they mean little without it."""
    import django

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            info["cpu_model"] = models[0]
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    for module in ("psycopg", "redis"):
        with contextlib.suppress(ImportError):
            info[module] = __import__(module).__version__
    return info
