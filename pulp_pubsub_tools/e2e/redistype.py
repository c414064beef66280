"""``redis_type``: pulpcore's ``WORKER_TYPE = "redis"``, stock and integrated, side by side.

Two fleets of K Redis-type workers run at once, each on its own database and
its own Redis database for pulpcore's locks, every process configured by
``PULP_*`` variables alone: ``redis_type_stock`` has pulp_pubsub installed
with ``PUBSUB_PULPCORE_INTEGRATION = False`` (stock: the switch back), and
``redis_type_pubsub`` the integration on the Redis backend. Their latency
tasks alternate in rounds, as in ``head_to_head``, each round with the other
fleet frozen (:func:`latency_rounds`), then each gets async
dispatches, a burst, a cancel of a running task (from ``cancel_task()`` to
``finished_at``) and of a queued one; their idle transactions are counted
over the same window. Then a burst onto more workers of each kind
(``Config.redis_burst``: 64 tasks at once onto 16), each fleet's alone with the
other frozen, in turn, three times (:func:`big_burst`), and two faults per fleet:

* a worker SIGKILLed while it runs a task (its task process goes on, as when
  only the worker dies): what becomes of that task, and how soon the next
  dispatched task starts;
* the worker that went idle last (the one an integrated fleet's next wake-up
  goes to) SIGKILLed, then a task dispatched: how soon it starts.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .operator import pulp_environment
from .scenarios import Outcome

if TYPE_CHECKING:
    from .figures import Verdict
    from .scenarios import Report, Run

STOCK, OURS = "redis_type_stock", "redis_type_pubsub"
PREFIX = "redis_type."
#: pulpcore's heartbeat period at its default WORKER_TTL (30 s / 3).
HEARTBEAT_SECONDS = 10.0
#: Long enough for a stock Redis-type worker's cancel (read once per heartbeat period).
CANCEL_WAIT = 15.0
FINAL = ("completed", "failed", "canceled")


def environments(
    run: Run, names: tuple[str, str] = (STOCK, OURS), prefix: str = PREFIX, redis_db: int = 1
) -> dict[str, dict[str, str]]:
    """Each fleet's whole configuration; pulpcore's locks in a Redis database of its own
    (``redis_db`` for the stock fleet, the next one for the integrated fleet)."""
    base = run.redis_url.rsplit("/", 1)[0]
    stock, ours = names
    out = {}
    for n, (db, pubsub) in enumerate(
        (
            (stock, {"PULP_PUBSUB_PULPCORE_INTEGRATION": "false"}),
            (
                ours,
                {
                    "PULP_PUBSUB_BACKEND": "redis",
                    "PULP_PUBSUB_URL": run.redis_url,
                    "PULP_PUBSUB_CHANNEL_PREFIX": prefix,
                },
            ),
        ),
        start=redis_db,
    ):
        env = pulp_environment(run.site, db, run.site.postgres, 24816, **pubsub)
        env.update(PULP_WORKER_TYPE="redis", PULP_REDIS_URL=f"{base}/{n}")
        out[db] = env
    return out


def start_fleets(
    run: Run, k: int, envs: dict[str, dict[str, str]], prefix: str = PREFIX
) -> tuple[Outcome, Outcome]:
    """K stock and K integrated Redis-type workers, each fleet on its own database
    (named as in ``envs``, stock first), both registered and the integrated subscribed."""
    stock_db, ours_db = envs
    stock = Outcome(stock_db, 'stock pulpcore, WORKER_TYPE="redis"', k, "direct")
    ours = Outcome(ours_db, 'pulp-pubsub on Redis, WORKER_TYPE="redis"', k, "direct")
    run.start_fleet(stock_db, [(f"redis{i}", envs[stock_db]) for i in range(k)])
    run.start_fleet(
        ours_db,
        [(f"redis{i}", envs[ours_db]) for i in range(k)],
        ready=lambda: run.redis_subscribers(f"{prefix}pulp_worker_wakeup") == k,
    )
    return stock, ours


def latency_rounds(
    run: Run, pairs: list[tuple[Outcome, dict[str, str]]], tasks: int, gap: float = 0.0
) -> None:
    """``tasks`` latency tasks a fleet, one at a time, the fleets alternating in rounds so
    load from anything else on the machine falls on both alike; with ``gap``, each after
    that many seconds of quiet or up to twice as many (onto an idle fleet).

    Each fleet's round runs with the other fleet frozen: a stock fleet polls ~100 times a
    second, and on a small machine that CPU came out of whichever fleet's tasks ran beside
    it, the integrated fleet's included. Each is measured as it would run alone.
    """
    rounds = max(1, min(run.config.rounds, tasks))
    per_round = -(-tasks // rounds)
    only_latency = {"async_tasks": 0, "burst_tasks": 0, "cancel": False, "latency_gap": gap}
    for n in range(rounds):
        for outcome, env in pairs if n % 2 == 0 else pairs[::-1]:
            with others_frozen(run.site, pairs, outcome):
                run.drive(outcome, outcome.name, env, latency_tasks=per_round, **only_latency)


def redis_type(run: Run) -> None:
    k = run.config.workers
    run.log(f"redis-type: {k} stock and {k} integrated Redis-type workers, side by side")
    envs = environments(run)
    stock, ours = start_fleets(run, k, envs)
    pairs = [(stock, envs[STOCK]), (ours, envs[OURS])]
    latency_rounds(run, pairs, run.config.latency_tasks)
    for outcome, env in pairs:
        run.drive(outcome, outcome.name, env, latency_tasks=0, cancel_wait=CANCEL_WAIT, as_api=True)
    run.site.wait_quiet(OURS)  # the stock fleet polls: it is never quiet
    run.idle({STOCK: stock, OURS: ours}, settle=False)
    tasks, workers = run.config.redis_burst
    if tasks:
        big_burst(run, pairs, tasks, workers)
    for outcome, env in pairs:
        Faults(run, outcome, env)()
    run.site.stop_all()
    run.report.outcomes.update({STOCK: stock, OURS: ours})


#: The burst is repeated this many times per fleet, in turn, and its median is the figure.
BURST_REPEATS = 3


def big_burst(
    run: Run,
    pairs: list[tuple[Outcome, dict[str, str]]],
    tasks: int,
    workers: int,
    repeats: int = BURST_REPEATS,
) -> None:
    """``tasks`` dispatched at once onto ``workers`` idle workers of each fleet (more
    workers started for it, then stopped): how long from the first created to the last
    started, whether all finish, and the CPU the fleet spent on them.

    On a small machine a burst is bound by CPU: the dispatcher, the workers and their task
    processes share it. So each fleet's burst runs alone, the other fleet frozen (SIGSTOP)
    meanwhile, whose polling would otherwise tax whichever burst runs beside it; the fleets
    take turns, in alternating order, ``repeats`` times, and the medians count.
    """
    from .herd import summarize_burst

    site, extra = run.site, []
    for outcome, env in pairs:
        db = outcome.name
        extra += [
            site.start_worker(f"{db}-extra{i}", env, "--name-template", f"extra{i}@{db}")
            for i in range(max(0, workers - outcome.workers))
        ]

    def registered(db: str, size: int) -> Callable[[], bool]:
        return lambda: site.workers_registered(db) == size

    for outcome, _ in pairs:
        site.wait(registered(outcome.name, max(workers, outcome.workers)), 180, outcome.name)
    prefix = pairs[-1][1].get("PULP_PUBSUB_CHANNEL_PREFIX", PREFIX)
    channel = f"{prefix}pulp_worker_wakeup"
    site.wait(lambda: run.redis_subscribers(channel) >= workers, 60, "subscribers")
    runs: dict[str, list[dict[str, Any]]] = {outcome.name: [] for outcome, _ in pairs}
    for n in range(repeats):
        for outcome, env in pairs if n % 2 == 0 else pairs[::-1]:
            run.log(f"  {tasks} tasks at once onto {workers} {outcome.name} workers ({n + 1})")
            with others_frozen(site, pairs, outcome):
                runs[outcome.name].append(one_burst(run, outcome, env, pairs, tasks))
    for outcome, _ in pairs:
        done = [summarize_burst(res) | {"cpu_s": res["cpu_s"]} for res in runs[outcome.name]]
        outcome.faults["burst"] = {
            **median_burst(done),
            "workers": max(workers, outcome.workers),
            "runs": done,
        }
    for process in extra:
        process.stop()
        site.processes.remove(process)


def fleet_processes(
    site: Any, pairs: list[tuple[Outcome, dict[str, str]]]
) -> list[tuple[str, int]]:
    """(name, pid) of every live worker process of these fleets."""
    names = tuple(f"{outcome.name}-" for outcome, _ in pairs)
    return [
        (p.name, p.popen.pid)
        for p in site.processes
        if p.name.startswith(names) and p.popen.poll() is None
    ]


@contextmanager
def others_frozen(
    site: Any, pairs: list[tuple[Outcome, dict[str, str]]], outcome: Outcome
) -> Iterator[None]:
    """Every worker of the fleets other than ``outcome``'s stopped (SIGSTOP) meanwhile."""
    mine = f"{outcome.name}-"
    others = [pid for name, pid in fleet_processes(site, pairs) if not name.startswith(mine)]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def cpu_seconds(pid: int) -> float:
    """User and system seconds of ``pid`` and of its children it has reaped (a worker's
    task processes), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def one_burst(
    run: Run,
    outcome: Outcome,
    env: dict[str, str],
    pairs: list[tuple[Outcome, dict[str, str]]],
    tasks: int,
) -> dict[str, Any]:
    import subprocess

    from .herd import HerdRun

    site = run.site
    mine = [pid for name, pid in fleet_processes(site, pairs) if name.startswith(outcome.name)]
    before = sum(cpu_seconds(pid) for pid in mine)
    opts = {"observer_dsn": site.dsn(outcome.name), "tasks": tasks, "seconds": 0.5}
    popen = subprocess.Popen(
        [
            site.bin("python"),
            "-m",
            "pulp_pubsub_tools.e2e.herd_agent",
            "burst",
            json.dumps({**opts, "timeout": 120}),
        ],
        env=site.env(env),
        cwd=site.root / "tmp",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    result = HerdRun.agent_result(popen)
    result["cpu_s"] = round(sum(cpu_seconds(pid) for pid in mine) - before, 2)
    return dict(result)


def median_burst(done: list[dict[str, Any]]) -> dict[str, Any]:
    """One burst's figures for the table: the run of median time to the last start, and
    counts that must hold in every run (all started, all finished) as their worst."""
    timed = sorted(done, key=lambda r: r["to_last_start_s"] if r["to_last_start_s"] else 1e9)
    middle = dict(timed[len(timed) // 2])
    middle.pop("cpu_s", None)
    for key in ("started", "completed"):
        middle[key] = min(r[key] for r in done)
    middle["cpu_s"] = sorted(r["cpu_s"] for r in done)[len(done) // 2]
    return middle


class Faults:
    def __init__(self, run: Run, outcome: Outcome, env: dict[str, str]) -> None:
        self.run, self.site, self.outcome, self.env = run, run.site, outcome, env
        self.db = outcome.name

    def dispatch(self, seconds: float) -> str:
        return str(self.site.agent(self.env, "dispatch", {"seconds": seconds})["task"])

    def row(self, pk: str) -> dict[str, Any]:
        with self.site.connect(self.db) as conn:
            found = conn.execute(
                "SELECT t.state, t.pulp_created, t.started_at, a.name FROM core_task t"
                " LEFT JOIN core_appstatus a ON a.pulp_id = t.app_lock_id"
                " WHERE t.pulp_id = %s",
                [pk],
            ).fetchone()
        assert found is not None, pk
        state, created, started, worker = found
        wait = None if started is None else (started - created).total_seconds()
        return {"state": state, "wait": wait, "worker": worker}

    def wait_for(self, pk: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while True:
            row = self.row(pk)
            if row["state"] in states or time.monotonic() > deadline:
                return row
            pause.wait(0.05)

    def kill(self, worker: str | None) -> bool:
        """SIGKILL the worker process of that name, alone (its task process lives on)."""
        name = f"{self.db}-{(worker or '').split('@')[0]}"
        for process in self.site.processes:
            if process.name == name and process.popen.poll() is None:
                os.kill(process.popen.pid, signal.SIGKILL)
                process.popen.wait()
                return True
        return False

    def __call__(self) -> None:
        running = self.dispatch(4)
        row = self.wait_for(running, ("running", *FINAL), 30)
        killed = row["state"] == "running" and self.kill(row["worker"])
        after = self.dispatch(0)
        next_row = self.wait_for(after, FINAL, 30)
        end = self.wait_for(running, FINAL, 15)
        self.outcome.faults["killed_mid_task"] = {
            "killed": killed,
            "task_state": end["state"],
            "next_task_state": next_row["state"],
            "next_task_wait": next_row["wait"],
        }
        # The worker that ran the last task went idle last: an integrated fleet's next
        # wake-up is handed to it.
        killed = self.kill(next_row["worker"])
        pk = self.dispatch(0)
        row = self.wait_for(pk, FINAL, 3 * HEARTBEAT_SECONDS)
        self.outcome.faults["killed_idle_last"] = {
            "killed": killed,
            "state": row["state"],
            "wait": row["wait"],
        }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def redis_type_verdicts(report: Report) -> list[Verdict]:
    from .figures import CANCEL_SECONDS, LATENCY_RATIO, Verdict

    stock, ours = report.outcomes.get(STOCK), report.outcomes.get(OURS)
    if stock is None or ours is None:
        return []
    out = [
        Verdict(
            "redis type, integrated: every task starts and finishes",
            bool(ours.tasks) and ours.finished == len(ours.tasks),
            f"{ours.finished}/{len(ours.tasks)} (stock: {stock.finished}/{len(stock.tasks)})",
        ),
        Verdict(
            "redis type: the integration is on in the integrated API process, off in stock's",
            (ours.integration or {}).get("installed") is True
            and (stock.integration or {}).get("installed") is False,
            f"{(ours.integration or {}).get('installed')} / "
            f"{(stock.integration or {}).get('installed')}",
        ),
    ]
    latency, stock_latency = ours.cancel_latency, stock.cancel_latency
    out.append(
        Verdict(
            f"redis type, integrated: cancel of a running task within {CANCEL_SECONDS:.0f} s",
            latency is not None
            and latency < CANCEL_SECONDS
            and ours.cancel is not None
            and ours.cancel["state"] == "canceled",
            f"{_ms(latency)} (stock: {_ms(stock_latency)})",
        )
    )
    out.append(
        Verdict(
            "redis type, integrated: cancel of a queued task",
            (ours.cancel_waiting or {}).get("second") == "canceled",
            str(ours.cancel_waiting),
        )
    )
    a, b = ours.p50(), stock.p50()
    ratio = None if a is None or not b else a / b
    out.append(
        Verdict(
            f"redis type: created->started p50 <= {LATENCY_RATIO} x stock",
            ratio is not None and ratio <= LATENCY_RATIO,
            f"{_ms(a)} vs {_ms(b)}: ratio " + ("-" if ratio is None else f"{ratio:.2f}"),
        )
    )
    big, stock_big = ours.faults.get("burst"), stock.faults.get("burst")
    if big is not None and stock_big is not None:
        last, stock_last = big["to_last_start_s"], stock_big["to_last_start_s"]
        out.append(
            Verdict(
                f"redis type, integrated: {big['dispatched']} tasks at once onto "
                f"{big['workers']} workers all finish",
                big["completed"] == big["dispatched"],
                f"{big['completed']}/{big['dispatched']} on {big['workers_used']} workers "
                f"(stock: {stock_big['completed']}/{stock_big['dispatched']})",
            )
        )
        out.append(
            Verdict(
                "redis type: that burst's last task started no later than stock's (+ 0.5 s)",
                last is not None and stock_last is not None and last <= stock_last + 0.5,
                f"{last} s from the first created to the last started (stock: {stock_last} s)",
            )
        )
    ours_rate, stock_rate = ours.idle_rate, stock.idle_rate
    per_worker = None if ours_rate is None else ours_rate / ours.workers
    out.append(
        Verdict(
            "redis type: idle DB xact/s at the heartbeat level (<= 0.5 per worker), stock polls",
            per_worker is not None and per_worker <= 0.5,
            f"{ours_rate:.2f}/s vs stock {stock_rate:.2f}/s"
            if ours_rate is not None and stock_rate is not None
            else "-",
        )
    )
    mid, stock_mid = ours.faults.get("killed_mid_task", {}), stock.faults.get("killed_mid_task", {})
    out.append(
        Verdict(
            "redis type: a worker SIGKILLed mid-task: its task ends as on stock, the next starts",
            bool(mid.get("killed"))
            and mid.get("task_state") == stock_mid.get("task_state")
            and mid.get("next_task_state") == "completed",
            f"task {mid.get('task_state')} (stock: {stock_mid.get('task_state')}); next "
            f"started after {_ms(mid.get('next_task_wait'))} "
            f"(stock: {_ms(stock_mid.get('next_task_wait'))})",
        )
    )
    last, stock_last = (
        ours.faults.get("killed_idle_last", {}),
        stock.faults.get("killed_idle_last", {}),
    )
    wait = last.get("wait")
    out.append(
        Verdict(
            "redis type: the worker idle last SIGKILLed, the next task starts within a "
            "heartbeat period",
            bool(last.get("killed")) and wait is not None and wait < HEARTBEAT_SECONDS,
            f"{_ms(wait)} (stock: {_ms(stock_last.get('wait'))})",
        )
    )
    stray = sum((ours.stray_notifies or {}).values())
    out.append(
        Verdict("redis type, integrated: no NOTIFY reaches PostgreSQL", stray == 0, str(stray))
    )
    return out
