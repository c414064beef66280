"""The herd run (issue 15): targeted wake-ups against stock pulpcore, real workers.

    python -m pulp_pubsub_tools.e2e.herd --sizes 4,16,32 --json herd.json

For each fleet size K, one stock fleet (LISTEN/NOTIFY) and one integrated
fleet (Redis, targeted wake-ups), both on direct database connections, each
on a database of its own, running at the same time; their tasks alternate in
rounds, so load from anything else on the machine falls on both alike:

* ``sequential``: T tasks dispatched one at a time. Database transactions in
  the fleet's database from the server log (every statement is logged with its
  virtual transaction id), leaving out the dispatcher's own sessions, per
  task, counted the same way for both fleets: all of them (``per_task``), and
  without the fleet's heartbeats (``per_task_less_heartbeats``): the
  transactions of pulpcore's ``beat()`` (its ``last_heartbeat`` UPDATE and the
  scheduling, metrics and cleanup lock tries), told apart by their statements.
  Every worker beats once per heartbeat period whether tasks come or not, so
  they grow with K times the window on both fleets alike and are no cost of a
  dispatch. (``per_task_less_idle`` subtracts the rate measured over the idle
  window instead, which is noisier.) Before the idle window each fleet has
  dispatched and finished pulpcore's scheduled tasks (its first beat
  dispatches them), so they land in neither fleet's window. A round's window
  ends at its last statement that is not a heartbeat's (found once the
  database has seen nothing else for a second: that wait is no task's, and
  its heartbeats would grow with K). And created->started p50/p95.
* ``burst``: B tasks dispatched at once onto the burst fleet size; time from the
  first created to the last started.
* ``faults`` (integrated only): a worker SIGKILLed right after it was handed
  the ``unblock`` wake-up (all workers are stopped with SIGSTOP, the holder is
  found in Redis, killed, the others continued): time until the task starts on
  another; and Redis restarted (killed and started again) during a spaced burst:
  how many tasks started.

With ``--passes N`` the sizes run N times in turn, each pass on fresh fleets,
and each size's figures pool the tasks of its passes: the first fleet of a run
is often the slowest, and one pass per size cannot tell that from K.

It prints the tables and writes everything as JSON (``--json``), from which
``--load`` renders them without running anything; ``--markdown docs/pulp.md`` puts
them between that page's markers, and ``--check`` only says whether the page
holds what the JSON renders (the test suite runs that on the committed result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .marked import add_result_options, result_options_problem
from .scenarios import Config, Run
from .site import POOLER_CHECK, RESULT_MARK, Settings

KINDS = ("stock", "pubsub")
#: The statements of pulpcore's ``beat()``: the heartbeat UPDATE, and the
#: scheduling (42), metrics (74) and worker cleanup (11) lock tries with what
#: runs under them when nothing is due (the schedule query, the missing-worker
#: cleanup). A transaction of nothing else, with the UPDATE or a lock try, is a heartbeat.
HEARTBEAT_MARKS = re.compile(
    r'UPDATE "core_appstatus" SET "last_heart|SELECT pg_try_advisory_xact_lock\(0, (42|74|11)\)'
)
HEARTBEAT_STATEMENTS = re.compile(
    rf"BEGIN|COMMIT|ROLLBACK|{HEARTBEAT_MARKS.pattern}"
    r'|SELECT .*"core_taskschedule"|SELECT .*"core_appstatus"|DELETE FROM "core_appstatus"'
)


def is_heartbeat(statements: set[str]) -> bool:
    """Whether a transaction's statements (their first 40 characters) are a heartbeat's."""
    return all(HEARTBEAT_STATEMENTS.match(text) for text in statements) and any(
        HEARTBEAT_MARKS.match(text) for text in statements
    )


START, END = "<!-- herd:start -->", "<!-- herd:end -->"
WAKEUP = "pulp_worker_wakeup"


@dataclass
class HerdConfig:
    sizes: tuple[int, ...] = (4, 16, 32)
    tasks: int = 40
    #: The sequential tasks alternate between the two fleets in this many rounds.
    rounds: int = 4
    burst_tasks: int = 64
    burst_workers: int = 16
    burst_seconds: float = 0.5
    #: Two heartbeat periods (WORKER_TTL / 3 = 10 s): every worker beats twice.
    idle_seconds: float = 20.0
    faults: bool = True
    #: The fleets to run; ``("pubsub",)`` alone shows how the layer's own figures move
    #: with K without a stock fleet of the same size beside it on the machine.
    kinds: tuple[str, ...] = KINDS
    #: The sizes run this many times, in turn (4, 16, 32, 4, 16, 32, ...), on fresh
    #: fleets, and each size's figures pool its passes: a machine whose speed drifts
    #: over minutes then weighs on every size alike, not on whichever ran last.
    passes: int = 1


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class HerdRun(Run):
    def __init__(self, herd: HerdConfig, log: Any) -> None:
        biggest = max((*herd.sizes, herd.burst_workers))
        super().__init__(Config(workers=biggest, scenarios=("herd",)), log)
        self.herd_config = herd
        self.result: dict[str, Any] = {"config": herd.__dict__, "sizes": {}, "burst": {}}

    # -- pieces ----------------------------------------------------------------------

    def herd_agent(
        self, settings: Settings, command: str, opts: dict[str, Any], wait: bool = True
    ) -> Any:
        argv = [
            self.site.bin("python"),
            "-m",
            "pulp_pubsub_tools.e2e.herd_agent",
            command,
            json.dumps(opts),
        ]
        popen = subprocess.Popen(
            argv,
            env=self.site.env(settings),
            cwd=self.site.root / "tmp",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return self.agent_result(popen) if wait else popen

    @staticmethod
    def agent_result(popen: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
        out, err = popen.communicate(timeout=timeout)
        for line in reversed(out.splitlines()):
            if line.startswith(RESULT_MARK):
                result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
                return result
        raise RuntimeError(f"herd agent gave no result (exit {popen.returncode}):\n{err[-3000:]}")

    def fleet(self, kind: str, k: int, tag: str, redis_url: str | None = None) -> tuple[str, Path]:
        """Start K workers of ``kind``; return their database and the dispatcher's settings."""
        db = f"{tag}_{kind}_{k}"
        values: dict[str, Any] = {}
        ready = None
        if kind == "pubsub":
            prefix = f"{db}."
            url = redis_url or self.redis_url
            values = self.integrated(
                PUBSUB_BACKEND="redis", PUBSUB_URL=url, PUBSUB_CHANNEL_PREFIX=prefix
            )

            def ready() -> bool:
                return self.subscribers(url, prefix + WAKEUP) == k

        workers = self.pulp_settings(f"{db}-worker", db, via_bouncer=False, **values)
        api = self.pulp_settings(f"{db}-api", db, via_bouncer=False, **values)
        self.start_fleet(db, [(f"{kind}{i}", workers) for i in range(k)], ready=ready)
        return db, api

    @staticmethod
    def subscribers(url: str, channel: str) -> int:
        import redis

        client = redis.Redis.from_url(url)
        try:
            return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
        finally:
            client.close()

    def count(self, db: str, window: list[float], leave_out: list[str]) -> int:
        """Transactions in ``db`` within ``window``, without the given backends' own."""
        return self.classify(db, window, leave_out)[0]

    def classify(
        self,
        db: str,
        window: list[float],
        leave_out: list[str],
        beat: Callable[[set[str]], bool] = is_heartbeat,
    ) -> tuple[int, int]:
        """Those transactions, and how many of them are heartbeats (``beat``)."""
        seen: dict[str, set[str]] = {}
        for stamp, vxid, text in self.site.log.read(db):
            if window[0] <= stamp < window[1] and vxid.split("/")[0] not in leave_out:
                seen.setdefault(vxid, set()).add(text.strip())
        counted = [texts for texts in seen.values() if texts != {POOLER_CHECK}]
        beats = sum(1 for texts in counted if beat(texts))
        return len(counted), beats

    def wait_settled(self, db: str, quiet: float = 1.0, timeout: float = 30) -> float:
        """Until ``db`` has seen no statement but heartbeats for ``quiet`` seconds.

        32 workers beat about three times a second, so waiting for no
        statement at all would make the window longer (and its heartbeats
        more) the larger the fleet. Returns the time of the last statement
        that was not a heartbeat's: the end of what the dispatches caused,
        where a round's window ends (the quiet wait after it is no task's).
        """
        last_seen = 0.0

        def settled() -> bool:
            nonlocal last_seen
            now = time.time()
            statements: dict[str, list[tuple[float, str]]] = {}
            for stamp, vxid, text in reversed(self.site.log.read(db)):
                if stamp < now - 60:
                    break
                statements.setdefault(vxid, []).append((stamp, text.strip()))
            last = max(
                (
                    max(stamp for stamp, _ in entries)
                    for entries in statements.values()
                    if not is_heartbeat({text for _, text in entries})
                ),
                default=0.0,
            )
            last_seen = last
            return now - last >= quiet

        self.site.wait(settled, timeout, f"{db} to settle")
        return last_seen

    def wait_scheduled(self, db: str, timeout: float = 60) -> None:
        """Until pulpcore's scheduled tasks that are due have been dispatched and have finished.

        A fleet's first heartbeat dispatches them; the fleet started first would
        otherwise do so before the idle window and the other inside it.
        """
        conn = self.site.connect(db)
        try:

            def done() -> bool:
                row = conn.execute(
                    "SELECT count(*) FROM core_taskschedule s"
                    " LEFT JOIN core_task t ON t.pulp_id = s.last_task_id"
                    " WHERE s.next_dispatch <= now()"
                    " OR (s.last_task_id IS NOT NULL AND t.state NOT IN"
                    " ('completed', 'failed', 'canceled', 'skipped'))"
                ).fetchone()
                return not row or not row[0]

            self.site.wait(done, timeout, f"{db}'s scheduled tasks")
        finally:
            conn.close()

    # -- the scenarios ---------------------------------------------------------------

    def herd(self) -> None:
        config = self.herd_config
        passes: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for n in range(config.passes):
            for k in config.sizes:
                self.log(
                    f"herd: K={k}: {config.tasks} sequential tasks a fleet, "
                    f"{' and '.join(config.kinds)} at once (pass {n + 1} of {config.passes})"
                )
                # A database per pass: a fresh fleet, and no name taken twice.
                for kind, total in self.sequential(k, f"herd{n}").items():
                    passes.setdefault(k, {}).setdefault(kind, []).append(total)
                self.site.stop_all()
        for k, by_kind in passes.items():
            self.result["sizes"][str(k)] = {kind: row(pool(t)) for kind, t in by_kind.items()}
        k = config.burst_workers
        for kind in config.kinds if config.burst_tasks else ():
            self.log(f"burst: {config.burst_tasks} tasks onto {k} {kind} workers")
            db, api = self.fleet(kind, k, "burst")
            res = self.herd_agent(
                api,
                "burst",
                {
                    "observer_dsn": self.site.dsn(db),
                    "tasks": config.burst_tasks,
                    "seconds": config.burst_seconds,
                },
            )
            self.result["burst"][kind] = summarize_burst(res)
            self.site.stop_all()
        if config.faults:
            self.result["faults"] = {"sigkill": self.sigkill(), "redis_restart": self.restart()}

    def sequential(self, k: int, tag: str) -> dict[str, dict[str, Any]]:
        """One pass at size K: each fleet's sums (made into figures by :func:`row`)."""
        config = self.herd_config
        kinds = config.kinds
        fleets = {kind: self.fleet(kind, k, tag) for kind in kinds}
        for db, _ in fleets.values():
            self.wait_scheduled(db)
        for db, _ in fleets.values():
            self.site.wait_quiet(db)
        # Each fleet's own idle rate (heartbeats), to tell it from the dispatch's cost.
        idle_start = time.time()
        threading.Event().wait(config.idle_seconds)  # a measuring window
        idle_end = time.time()
        totals: dict[str, dict[str, Any]] = {
            kind: {"xacts": 0, "beats": 0, "span": 0.0, "waits": [], "unblocks": [], "tasks": 0}
            for kind in kinds
        }
        rounds = max(1, min(config.rounds, config.tasks))
        per_round = -(-config.tasks // rounds)
        for n in range(rounds):
            for kind in kinds if n % 2 == 0 else kinds[::-1]:
                db, api = fleets[kind]
                res = self.herd_agent(
                    api, "sequential", {"observer_dsn": self.site.dsn(db), "tasks": per_round}
                )
                window = res["window"]
                # The last task's echo belongs to the round; the quiet wait after it does not.
                end = max(self.wait_settled(db), window[1]) + 0.001
                total = totals[kind]
                xacts, beats = self.classify(db, [window[0], end], res["own_backends"])
                total["xacts"] += xacts
                total["beats"] += beats
                total["span"] += end - window[0]
                total["tasks"] += len(res["records"])
                total["waits"] += [r["wait"] for r in res["records"] if r["wait"] is not None]
                total["unblocks"] += [r["unblock"] for r in res["records"] if r.get("unblock")]
        for kind, total in totals.items():
            db = fleets[kind][0]
            total["idle_xacts"] = self.count(db, [idle_start, idle_end], [])
            total["idle_span"] = idle_end - idle_start
        return totals

    def sigkill(self) -> dict[str, Any]:
        """Kill the worker holding the unblock wake-up; time until its task starts."""
        k = 4
        self.log("fault: a worker SIGKILLed right after it was handed a wake-up")
        db, api = self.fleet("pubsub", k, "kill")
        pids = [p.popen.pid for p in self.site.processes]
        result = self.kill_wakeup_holder(db, api, f"{db}.{WAKEUP}#unblock", pids)
        self.site.stop_all()
        return result

    def kill_wakeup_holder(
        self, db: str, api: Settings, key: str, pids: list[int]
    ) -> dict[str, Any]:
        """Dispatch one task with the fleet ``pids`` frozen (SIGSTOP), SIGKILL the worker
        its wake-up went to (the consumer holding it in the stream ``key``), let the
        others go on: how soon the task starts."""
        import redis

        self.herd_agent(api, "dispatch", {})  # warm: every worker has read once
        self.site.wait_quiet(db)
        # The dispatcher starts first (Django, pulpcore), so the workers stay frozen
        # only for the moment of the hand-over, well within their probe timeout.
        agent = self.herd_agent(api, "dispatch", {"wait_for_go": True}, wait=False)
        assert agent.stdout is not None and agent.stdin is not None
        while agent.stdout.readline().strip() not in ("READY", ""):
            pass
        for pid in pids:
            os.killpg(pid, signal.SIGSTOP)
        stopped_at = time.time()
        client: Any = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            agent.stdin.write("go\n")
            agent.stdin.flush()
            task = self.agent_result(agent)
            holder = None
            deadline = time.monotonic() + 10
            while holder is None and time.monotonic() < deadline:
                pending = client.xpending_range(key, "pulp-pubsub", "-", "+", 10)
                if pending:
                    holder = int(pending[0]["consumer"].split(":")[1])
                else:
                    threading.Event().wait(0.05)
        finally:
            client.close()
        killed_at = time.time()
        if holder in pids:
            os.killpg(holder, signal.SIGKILL)
        for pid in pids:
            if pid != holder:
                os.killpg(pid, signal.SIGCONT)
        started = self.wait_started(db, [task["id"]], 30)
        start = started.get(task["id"])
        return {
            "holder_found": holder in pids,
            "started": start is not None,
            "frozen_s": round(killed_at - stopped_at, 2),
            "kill_to_start_s": None if start is None else round(start - killed_at, 2),
            "heartbeat_period_s": 10,
        }

    def restart(self) -> dict[str, Any]:
        """Restart Redis while a spaced burst is being dispatched: does every task start?"""
        from pulp_pubsub_tools.testing import RedisServer

        k, n = 4, 32
        self.log(f"fault: Redis restarted during a burst of {n} onto {k} workers")
        server = RedisServer()
        try:
            server.start()
            db, api = self.fleet("pubsub", k, "restart", redis_url=server.url)
            popen = self.herd_agent(
                api,
                "burst",
                {
                    "observer_dsn": self.site.dsn(db),
                    "tasks": n,
                    "seconds": 0.1,
                    "spacing": 0.1,
                    "timeout": 90,
                },
                wait=False,
            )
            threading.Event().wait(1.0)  # mid-burst: the fault's moment, not a synchronisation
            server.restart("kill")
            res = summarize_burst(self.agent_result(popen))
        finally:
            self.site.stop_all()
            server.cleanup()
        return res

    def wait_started(self, db: str, pks: list[str], timeout: float) -> dict[str, float]:
        conn = self.site.connect(db)
        try:
            deadline = time.monotonic() + timeout
            while True:
                rows = conn.execute(
                    "SELECT pulp_id::text, started_at FROM core_task WHERE pulp_id::text = ANY(%s)",
                    [pks],
                ).fetchall()
                got = {pk: started.timestamp() for pk, started in rows if started is not None}
                if len(got) == len(pks) or time.monotonic() > deadline:
                    return got
                threading.Event().wait(0.02)
        finally:
            conn.close()


def pool(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """One fleet size's sums over its passes, and each pass's own p50."""
    pooled: dict[str, Any] = {"pass_p50s": [median_ms(total["waits"]) for total in passes]}
    for total in passes:
        for key, value in total.items():
            pooled[key] = pooled[key] + value if key in pooled else value
    return pooled


def row(total: dict[str, Any]) -> dict[str, Any]:
    """A fleet's figures at one size, from the sums of its passes."""
    tasks, xacts, waits = total["tasks"], total["xacts"], total["waits"]
    idle_rate = total["idle_xacts"] / total["idle_span"]
    less_idle = xacts - idle_rate * total["span"]
    less_beats = xacts - total["beats"]
    return {
        "tasks": tasks,
        "started": len(waits),
        "transactions": xacts,
        "heartbeats": total["beats"],
        "per_task": round(xacts / tasks, 1) if tasks else None,
        "per_task_less_heartbeats": round(less_beats / tasks, 1) if tasks else None,
        "per_task_less_idle": round(less_idle / tasks, 1) if tasks else None,
        "idle_per_s": round(idle_rate, 2),
        "p50_ms": median_ms(waits),
        "p95_ms": ms(pct(waits, 0.95)),
        # created->unblocked: where in created->started a change with K lies.
        "unblock_p50_ms": median_ms(total["unblocks"]),
        # Each pass's own p50: how far the machine moves one size's figure between passes.
        "pass_p50s_ms": total["pass_p50s"],
    }


def median_ms(seconds: list[float]) -> float | None:
    return ms(statistics.median(seconds)) if seconds else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def summarize_burst(res: dict[str, Any]) -> dict[str, Any]:
    records = res["records"]
    first = res.get("first_created")
    return {
        "dispatched": res["dispatched"],
        "dispatch_errors": len(res["dispatch_errors"]),
        "tasks": len(records),
        "started": sum(1 for r in records if r["wait"] is not None),
        "completed": sum(1 for r in records if r["state"] == "completed"),
        "workers_used": len({r["worker"] for r in records if r["worker"]}),
        "to_last_start_s": _seconds_between(first, res.get("last_started")),
        # How long the dispatcher took to create them all (the agents that record it).
        "dispatch_span_s": _seconds_between(first, res.get("last_created")),
    }


def _seconds_between(first: str | None, last: str | None) -> float | None:
    from datetime import datetime

    if not (first and last):
        return None
    return round((datetime.fromisoformat(last) - datetime.fromisoformat(first)).total_seconds(), 2)


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/pulp.md ("No thundering herd"), from a result."""
    lines = [
        "| idle workers | stock: transactions/task | pulp-pubsub: transactions/task "
        "| stock: created→started p50 / p95 | pulp-pubsub: p50 / p95 |",
        "|---|---|---|---|---|",
    ]
    exact = all(
        "per_task_less_heartbeats" in fleet
        for r in result["sizes"].values()
        for fleet in r.values()
    )
    less = "per_task_less_heartbeats" if exact else "per_task_less_idle"

    def cells(fleet: dict[str, Any] | None) -> tuple[str, str]:
        if fleet is None:
            return "not run", "not run"
        return (
            f"{fleet['per_task']} ({fleet[less]})",
            f"{fleet['p50_ms']} / {fleet['p95_ms']} ms",
        )

    for k, row in result["sizes"].items():
        stock, ours = cells(row.get("stock")), cells(row.get("pubsub"))
        lines.append(f"| {k} | {stock[0]} | {ours[0]} | {stock[1]} | {ours[1]} |")
    lines.append("")
    if exact:
        lines.append(
            "(in parentheses: without the workers' heartbeats, pulpcore's `beat()` every 10 s "
            "on every worker, told apart by their statements, for both fleets alike)"
        )
    else:
        lines.append("(in parentheses: the fleet's idle heartbeat rate subtracted)")
    burst = result.get("burst") or {}
    if burst:
        cfg = result["config"]
        lines += [
            "",
            f"Burst: {cfg['burst_tasks']} tasks at once onto {cfg['burst_workers']} idle workers.",
            "",
            "| fleet | started | workers used | first created → last started |",
            "|---|---|---|---|",
        ]
        for kind, b in burst.items():
            lines.append(
                f"| {kind} | {b['started']}/{b['tasks']} | {b['workers_used']} "
                f"| {b['to_last_start_s']} s |"
            )
    faults = result.get("faults")
    if faults:
        kill, restart = faults["sigkill"], faults["redis_restart"]
        lines += [
            "",
            f"SIGKILL of the worker holding the wake-up (the fleet frozen for "
            f"{kill.get('frozen_s', '?')} s around the hand-over): task started "
            f"{kill['kill_to_start_s']} s after the kill (heartbeat period 10 s).",
            f"Redis restarted during a burst: {restart['started']}/{restart['tasks']} tasks "
            f"started ({restart['dispatch_errors']} dispatch errors during the outage).",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pulp_pubsub_tools.e2e.herd")
    defaults = HerdConfig()
    parser.add_argument("--sizes", default=",".join(map(str, defaults.sizes)))
    parser.add_argument("--tasks", type=int, default=defaults.tasks)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--burst-tasks", type=int, default=defaults.burst_tasks)
    parser.add_argument("--burst-workers", type=int, default=defaults.burst_workers)
    parser.add_argument("--idle-seconds", type=float, default=defaults.idle_seconds)
    parser.add_argument(
        "--passes",
        type=int,
        default=defaults.passes,
        help="run the sizes this many times in turn and pool each size's passes",
    )
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument(
        "--fleets",
        default=",".join(KINDS),
        help="which fleets run: stock,pubsub (default), or one of them alone",
    )
    add_result_options(parser, (START, END), "--readme")
    args = parser.parse_args(argv)
    problem = result_options_problem(args)
    if problem:
        parser.error(problem)
    if args.load:
        result = json.loads(args.load.read_text())
    else:
        sizes = tuple(int(x) for x in args.sizes.split(",") if x)
        kinds = tuple(x for x in args.fleets.split(",") if x)
        if not kinds or not set(kinds) <= set(KINDS):
            parser.error(f"--fleets takes {' and/or '.join(KINDS)}, e.g. --fleets pubsub")
        if args.passes < 1:
            parser.error("--passes takes a positive number")
        if sizes and min(sizes) < 1:
            parser.error("--sizes takes positive fleet sizes, e.g. 4,16,32 (or none)")
        herd = HerdConfig(
            sizes=sizes,
            tasks=args.tasks,
            rounds=args.rounds,
            burst_tasks=args.burst_tasks,
            burst_workers=args.burst_workers,
            idle_seconds=args.idle_seconds,
            faults=not args.no_faults,
            kinds=kinds,
            passes=args.passes,
        )

        def log(text: str) -> None:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

        run = HerdRun(herd, log)
        report = run.run()
        result = run.result
        result["seconds"] = round(report.total_seconds)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
    text = markdown(result)
    if not args.check:
        sys.stdout.write(text + "\n")
    if args.markdown:
        page = args.markdown.read_text()
        head, start, rest = page.partition(START)
        _, end, tail = rest.partition(END)
        if not start or not end:
            parser.error(f"{args.markdown} has no {START} ... {END} markers")
        updated = f"{head}{START}\n{text}\n{END}{tail}"
        if args.check:
            if updated != page:
                sys.stderr.write(f"out of date with the JSON: {args.markdown}\n")
                return 1
        else:
            args.markdown.write_text(updated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
