"""Pulp's Redis-type workers, stock against integrated, at several fleet sizes (issue 29).

    python -m pulp_pubsub_tools.e2e.redistype_sizes --series 3.123 --sizes 4,16,32 \\
        --passes 3 --json docs/figures/redis_type_sizes.json --markdown docs/pulp.md

For each fleet size K, the ``redis_type`` scenario's two fleets (:mod:`.redistype`):
K stock Redis-type workers (pulp_pubsub installed, ``PUBSUB_PULPCORE_INTEGRATION``
off) and K integrated ones, every process configured by ``PULP_*`` alone, each
fleet on a database and a Redis database of its own, running at the same time:

* created→started p50 and p95 of tasks dispatched one at a time, the fleets
  alternating in rounds (as in the herd run, :mod:`.herd`), each round with the
  other fleet frozen;
* the fleet's idle database transactions per second over one window for both,
  counted exactly from the server log, and how many of them are heartbeats;
* the cancel of a running task through the REST API: a real ``pulpcore-api``
  per fleet, ``PATCH /pulp/api/v3/tasks/<id>/`` to the task's ``finished_at``
  (the API process is started after the idle window, so its own heartbeats are
  in no fleet's idle count).

Once per run, at the burst's size (``--burst-workers``, a size of the run or
else the largest, with workers added): a burst of B tasks at once onto each
fleet (:func:`.redistype.big_burst`: each alone, the other frozen, in turn,
the median of ``--burst-repeats``, five by default); the integrated fleet
frozen while a task is dispatched, the worker its ``handle`` wake-up went to
SIGKILLed and the others let go (how soon the task starts: at most a heartbeat
period); then :class:`.redistype.Faults` on both fleets (a worker killed
mid-task, the worker idle last killed).

With ``--passes N`` the sizes run N times in turn, each pass on fresh fleets, and
each size's figures pool its passes (every task's wait, the idle windows summed,
the slowest REST cancel), as the herd run's do: on a shared machine one pass per
size cannot tell the machine's drift from K.

It prints the tables and writes everything as JSON (``--json``), from which
``--load`` renders them without running anything; ``--markdown docs/pulp.md``
puts them between that page's markers, and ``--check`` only says whether the
page holds what the JSON renders (the test suite runs that on the committed result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulp_pubsub.contrib.pulpcore.compat import E2E_SERIES
from pulp_pubsub_tools.testing import free_port

from .herd import WAKEUP, HerdRun, is_heartbeat, median_ms, ms, pct
from .marked import add_result_options, result_options_problem, rewrite
from .operator import Operator
from .redistype import HEARTBEAT_SECONDS, Faults, big_burst, environments, latency_rounds
from .redistype import start_fleets as start_side_by_side
from .scenarios import Config, Outcome, Run

START, END = "<!-- redis-type-sizes:start -->", "<!-- redis-type-sizes:end -->"
KINDS = ("stock", "pubsub")
#: How long the idle window waits for the integrated fleet's database to be quiet.
SETTLE = 5.0
#: How long the run waits for a pulpcore-api to answer on a loaded machine (not a figure).
API_WAIT = 180.0


@dataclass
class SizesConfig:
    sizes: tuple[int, ...] = (4, 16, 32)
    series: str = E2E_SERIES[-1]
    venv: Path | None = None
    #: Latency tasks a fleet at each size, alternating between the fleets in rounds.
    tasks: int = 40
    rounds: int = 4
    #: Two heartbeat periods (WORKER_TTL / 3 = 10 s): every worker beats twice.
    idle_seconds: float = 20.0
    burst_tasks: int = 64
    burst_workers: int = 16
    #: Each fleet's burst this many times, in turn; the median is the figure.
    burst_repeats: int = 5
    faults: bool = True
    #: The sizes run this many times in turn (4, 16, 32, 4, 16, 32, ...), on fresh fleets,
    #: and each size's figures pool its passes (as the herd run's ``--passes``).
    passes: int = 1
    #: Seconds of quiet (up to twice as many) before each latency task. With none, a task
    #: is dispatched as soon as the previous one finished, and the worker that ran it,
    #: still winding down, takes it on both fleets without waiting for a poll or a
    #: wake-up; with a gap, the task finds the fleet idle, which is what a wake-up is for.
    latency_gap: float = 0.0
    #: Each fleet's latency rounds ran with the other fleet frozen (recorded in the result:
    #: runs before :func:`.redistype.latency_rounds` froze it had both fleets running).
    latency_alone: bool = True


#: The online-worker count a Redis-type worker's ``beat()`` takes for its poll interval,
#: a transaction of its own, as the statement log keeps it (40 characters: the table's
#: name is cut, so a lone COUNT of another ``core_`` table would pass for one; an idle
#: fleet runs none).
WORKER_COUNT = re.compile(r'SELECT COUNT\(\*\) AS "__count" FROM "core_')


def is_beat(statements: set[str]) -> bool:
    """Whether a transaction is part of a Redis-type worker's ``beat()``: the heartbeat
    UPDATE, the scheduling and cleanup lock tries (:func:`.herd.is_heartbeat`), or the
    online-worker count (which that function does not count: no lock try, no UPDATE)."""
    return is_heartbeat(statements) or (
        len(statements) == 1 and WORKER_COUNT.match(next(iter(statements))) is not None
    )


class SizesRun(HerdRun):
    """One set of throwaway servers for every size: a database pair per size."""

    def __init__(self, sizes: SizesConfig, log: Any) -> None:
        biggest = max((*sizes.sizes, sizes.burst_workers))
        Run.__init__(
            self,
            Config(
                # Two fleets of the largest size at once: the server's connection limit.
                workers=2 * biggest,
                latency_tasks=sizes.tasks,
                rounds=sizes.rounds,
                idle_seconds=sizes.idle_seconds,
                scenarios=("sizes",),
                series=sizes.series,
                venv=sizes.venv,
            ),
            log,
        )
        self.sizes_config = sizes
        self.result: dict[str, Any] = {"config": _jsonable(sizes.__dict__), "sizes": {}}
        self.load: dict[str, list[float]] = {}
        self._sampling = threading.Event()

    def run(self) -> Any:
        sampler = threading.Thread(target=self._sample_load, daemon=True)
        sampler.start()
        try:
            report = super().run()
        finally:
            self._sampling.set()
            sampler.join()
        self.result["pulpcore"] = report.pulpcore
        self.result["seconds"] = round(report.total_seconds)
        samples = self.load.get("run", [])
        if samples:
            self.result["load_1min"] = {
                "min": min(samples),
                "mean": round(sum(samples) / len(samples), 2),
                "max": max(samples),
                "cpus": os.cpu_count(),
            }
        return report

    def _sample_load(self) -> None:
        while not self._sampling.wait(15):
            self.load.setdefault("run", []).append(round(os.getloadavg()[0], 2))

    # -- the run -----------------------------------------------------------------------

    def sizes(self) -> None:
        config = self.sizes_config
        at = config.burst_workers if config.burst_workers in config.sizes else config.sizes[-1]
        passes: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for n in range(config.passes):
            for i, k in enumerate(config.sizes):
                self.log(
                    f"redis-type sizes: K={k}, {k} stock and {k} integrated workers at once "
                    f"(pass {n + 1} of {config.passes})"
                )
                one = self.size(k, n, 1 + 2 * i, once=n == 0 and k == at)
                for kind, raw in one.items():
                    passes.setdefault(k, {}).setdefault(kind, []).append(raw)
                self.site.stop_all()
        for k, by_kind in passes.items():
            self.result["sizes"][str(k)] = {kind: pooled(raws) for kind, raws in by_kind.items()}

    def size(self, k: int, n: int, redis_db: int, once: bool) -> dict[str, Any]:
        """One pass ``n`` at size K: each fleet's raw figures (pooled by :func:`pooled`)."""
        config = self.sizes_config
        names = (f"rt{n}_stock_{k}", f"rt{n}_pubsub_{k}")
        prefix = f"rt{n}_{k}."
        envs = environments(self, names, prefix, redis_db)
        self.flush_locks(envs)
        stock, ours = start_side_by_side(self, k, envs, prefix)
        pairs = [(stock, envs[names[0]]), (ours, envs[names[1]])]
        latency_rounds(self, pairs, config.tasks, config.latency_gap)
        idle: dict[str, dict[str, float]] = {}
        if config.idle_seconds > 0:
            for db in names:
                self.wait_scheduled(db)
            self.settle(names[1])  # the stock fleet polls: it is never quiet
            self.log(f"  both fleets: {config.idle_seconds:.0f} s idle")
            start = time.time()
            threading.Event().wait(config.idle_seconds)  # a measuring window
            end = time.time()
            for db in names:
                xacts, beats = self.classify(db, [start, end], [], is_beat)
                idle[db] = {"xacts": xacts, "beats": beats, "span": end - start}
        cancels = {db: self.rest_cancel(db, envs[db]) for db in names}
        out = {
            kind: {
                "workers": k,
                "tasks": len([t for t in outcome.tasks if t["phase"] == "latency"]),
                "waits": outcome.waits("latency"),
                "idle": idle.get(outcome.name),
                "cancel": cancels[outcome.name],
                "stray_notifies": sum((outcome.stray_notifies or {}).values()),
            }
            for kind, outcome in zip(KINDS, (stock, ours), strict=True)
        }
        if once:
            self.once(k, pairs, envs, prefix)
        return out

    def settle(self, db: str) -> None:
        """Until the last task's echo has died down in ``db``: no statement for a second.

        A large fleet's heartbeats and safety looks may leave no such second; then the
        window opens after :data:`SETTLE` seconds anyway (the tasks had all finished).
        """
        try:
            self.site.wait_quiet(db, timeout=SETTLE)
        except RuntimeError:
            self.log(f"  {db}: no quiet second in {SETTLE:.0f} s (heartbeats); idle window opens")

    def rest_cancel(self, db: str, env: dict[str, str]) -> dict[str, Any]:
        """A running task canceled through a real pulpcore-api of the fleet: the
        :class:`.operator.Operator`'s ``PATCH``, timed to the task's ``finished_at``."""
        site = self.site
        api = Operator(self, workers=0)
        api.db, api.api_port, api.content_port = db, free_port(), free_port()
        site.manage(env, "reset-admin-password", f"--password={api.password}")
        argv = [site.bin("pulpcore-api"), "--bind", f"127.0.0.1:{api.api_port}"]
        process = site.start(f"{db}-api", env, [*argv, "--workers", "1"])
        status = f"http://127.0.0.1:{api.api_port}/pulp/api/v3/status/"
        site.wait(lambda: api.responds(status), API_WAIT, f"{db}'s pulpcore-api")
        api.rest_cancel(env)
        process.stop()
        site.processes.remove(process)
        cancel = dict(api.outcome.rest_cancel or {})
        cancel["login"] = api.outcome.serving.get("login")
        return cancel

    def flush_locks(self, envs: dict[str, dict[str, str]]) -> None:
        """Empty the Redis databases of pulpcore's locks a size's fleets use (an earlier
        pass's fleets used them too; they stopped, but a fault may have left a lock)."""
        import redis

        for env in envs.values():
            client = redis.Redis.from_url(env["PULP_REDIS_URL"])
            try:
                client.flushdb()
            finally:
                client.close()

    def once(
        self,
        k: int,
        pairs: list[tuple[Outcome, dict[str, str]]],
        envs: dict[str, dict[str, str]],
        prefix: str,
    ) -> None:
        """The burst and the faults, on this size's fleets."""
        config = self.sizes_config
        if config.burst_tasks:
            self.log(f"  burst: {config.burst_tasks} tasks at once onto {config.burst_workers}")
            big_burst(self, pairs, config.burst_tasks, config.burst_workers, config.burst_repeats)
            self.result["burst"] = {
                kind: outcome.faults["burst"]
                for kind, (outcome, _) in zip(KINDS, pairs, strict=True)
            }
        if not config.faults:
            return
        ours, env = pairs[1]
        self.log("  fault: an integrated worker SIGKILLed right after it was handed a wake-up")
        pids = [p.popen.pid for p in self.site.processes if p.name.startswith(f"{ours.name}-")]
        faults: dict[str, Any] = {
            "handed_wakeup": {
                **self.kill_wakeup_holder(ours.name, env, f"{prefix}{WAKEUP}#handle", pids),
                "workers": len(pids),
                "heartbeat_period_s": HEARTBEAT_SECONDS,
            }
        }
        for kind, (outcome, outcome_env) in zip(KINDS, pairs, strict=True):
            self.log(f"  faults on the {kind} fleet: a worker killed mid-task, the idle-last one")
            Faults(self, outcome, outcome_env)()
            faults[kind] = {
                name: outcome.faults[name] for name in ("killed_mid_task", "killed_idle_last")
            }
        self.result["faults"] = faults


def pooled(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """A fleet's figures at one size, from its passes: every task's wait pooled, the idle
    windows summed, and the slowest of the REST cancels."""
    waits = [w for one in passes for w in one["waits"]]
    cancels = [one["cancel"] for one in passes]
    latencies = [cancel.get("latency") for cancel in cancels]
    states = sorted({str(cancel.get("state")) for cancel in cancels})
    row: dict[str, Any] = {
        "workers": passes[0]["workers"],
        "passes": len(passes),
        "tasks": sum(one["tasks"] for one in passes),
        "started": len(waits),
        "p50_ms": median_ms(waits),
        "p95_ms": ms(pct(waits, 0.95)),
        # Each pass's own p50: how far the machine moves one size's figure between passes.
        "pass_p50s_ms": [median_ms(one["waits"]) for one in passes],
        "cancel": {
            "http": [cancel.get("http") for cancel in cancels],
            "state": "/".join(states),
            # The slowest; None when any pass's cancel never finished.
            "latency_s": None if None in latencies else _round(max(latencies)),
            "latencies_s": [_round(latency) for latency in latencies],
            "http_s": [_round(cancel.get("http_seconds")) for cancel in cancels],
        },
        "stray_notifies": sum(one["stray_notifies"] for one in passes),
    }
    idles = [one["idle"] for one in passes if one["idle"] is not None]
    if idles:
        xacts = sum(idle["xacts"] for idle in idles)
        beats = sum(idle["beats"] for idle in idles)
        span = sum(idle["span"] for idle in idles)
        row["idle"] = {
            "seconds": round(span, 1),
            "transactions": xacts,
            "heartbeats": beats,
            "per_s": round(xacts / span, 2),
            "per_worker_s": round(xacts / span / row["workers"], 3),
            "less_heartbeats_per_s": round((xacts - beats) / span, 2),
        }
    return row


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


# -- the tables ----------------------------------------------------------------------------


def _cancel(row: dict[str, Any]) -> str:
    cancel = row["cancel"]
    latency = cancel.get("latency_s")
    seconds = "-" if latency is None else f"{latency * 1000:.0f} ms"
    return f"{seconds} ({cancel.get('state')})"


def _idle(row: dict[str, Any]) -> str:
    idle = row.get("idle")
    if idle is None:
        return "not measured"
    return f"{idle['per_s']} ({idle['less_heartbeats_per_s']})"


def _ms_cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/pulp.md (Redis-type workers at K = 4, 16 and 32), from a result."""
    lines = [
        "| idle workers | stock: idle xact/s | pulp-pubsub: idle xact/s "
        "| stock: created→started p50 / p95 | pulp-pubsub: p50 / p95 "
        "| stock: REST cancel → finished | pulp-pubsub: REST cancel → finished |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, row in result["sizes"].items():
        stock, ours = row["stock"], row["pubsub"]
        lines.append(
            f"| {k} | {_idle(stock)} | {_idle(ours)} "
            f"| {_ms_cell(stock['p50_ms'])} / {_ms_cell(stock['p95_ms'])} ms "
            f"| {_ms_cell(ours['p50_ms'])} / {_ms_cell(ours['p95_ms'])} ms "
            f"| {_cancel(stock)} | {_cancel(ours)} |"
        )
    cfg = result["config"]
    passes = cfg.get("passes", 1)
    if cfg.get("latency_gap"):
        gap = cfg["latency_gap"]
        lines += [
            "",
            f"Each latency task dispatched after {gap:g} to {2 * gap:g} s of quiet, onto an "
            "idle fleet (`--latency-gap`).",
        ]
    if cfg.get("latency_alone"):
        lines += [
            "",
            "Each fleet's latency tasks ran with the other fleet's workers frozen (SIGSTOP): "
            "each measured as it runs alone.",
        ]
    if passes > 1:
        lines += [
            "",
            f"({passes} passes, the sizes in turn, each on fresh fleets, pooled: "
            f"{cfg['tasks'] * passes} tasks a fleet at each size for p50 / p95; idle "
            f"transactions over {passes} windows of {cfg['idle_seconds']:.0f} s, in "
            "parentheses without the workers' heartbeats, told apart by their statements; "
            f"the slowest of the {passes} REST cancels)",
        ]
    else:
        lines += [
            "",
            f"({cfg['tasks']} tasks a fleet at each size for p50 / p95; idle transactions "
            f"over {cfg['idle_seconds']:.0f} s, in parentheses without the workers' "
            "heartbeats, told apart by their statements)",
        ]
    burst = result.get("burst") or {}
    if burst:
        repeats = len(next(iter(burst.values())).get("runs", ()))
        how = (
            f"each fleet's alone with the other frozen, in turn, {repeats} times: the median"
            if repeats
            else "both fleets at the same time"
        )
        lines += [
            "",
            f"Burst: {cfg['burst_tasks']} tasks at once onto {cfg['burst_workers']} idle "
            f"workers of each fleet, {how}.",
            "",
            "| fleet | started | completed | workers used | first created → last started |",
            "|---|---|---|---|---|",
        ]
        for kind, b in burst.items():
            lines.append(
                f"| {kind} | {b['started']}/{b['tasks']} | {b['completed']}/{b['dispatched']} "
                f"| {b['workers_used']} | {b['to_last_start_s']} s |"
            )
    faults = result.get("faults")
    if faults:
        handed = faults["handed_wakeup"]
        start = handed["kill_to_start_s"]
        lines += [
            "",
            f"SIGKILL of the integrated worker holding the `handle` wake-up (its "
            f"{handed['workers']} workers frozen for {handed['frozen_s']} s around the "
            f"hand-over; holder found: {handed['holder_found']}): the task started "
            + ("never (within 30 s)" if start is None else f"{start} s after the kill")
            + f" (heartbeat period {handed['heartbeat_period_s']:.0f} s).",
        ]
        for kind in KINDS:
            mid, last = faults[kind]["killed_mid_task"], faults[kind]["killed_idle_last"]
            lines.append(
                f"{kind}: a worker killed mid-task: its task {mid['task_state']}, the next "
                f"started after {_seconds(mid['next_task_wait'])}; the worker idle last "
                f"killed: the next task {last['state']}, started after {_seconds(last['wait'])}."
            )
    if "seconds" in result:
        load = result.get("load_1min") or {}
        lines += [
            "",
            f"pulpcore {result.get('pulpcore')}, one run of {result['seconds']} s"
            + (
                f"; 1-minute load average {load['min']} to {load['max']} "
                f"(mean {load['mean']}) on {load['cpus']} CPUs"
                if load
                else ""
            )
            + ".",
        ]
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pulp_pubsub_tools.e2e.redistype_sizes")
    defaults = SizesConfig()
    parser.add_argument("--sizes", default=",".join(map(str, defaults.sizes)))
    parser.add_argument("--series", default=defaults.series)
    parser.add_argument("--venv", type=Path, default=None, help="the pulpcore virtualenv")
    parser.add_argument("--tasks", type=int, default=defaults.tasks)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--idle-seconds", type=float, default=defaults.idle_seconds)
    parser.add_argument("--burst-tasks", type=int, default=defaults.burst_tasks)
    parser.add_argument("--burst-workers", type=int, default=defaults.burst_workers)
    parser.add_argument("--burst-repeats", type=int, default=defaults.burst_repeats)
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument(
        "--latency-gap",
        type=float,
        default=defaults.latency_gap,
        help="seconds of quiet (up to twice as many) before each latency task: onto an "
        "idle fleet (default: none, each as soon as the previous one finished)",
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=defaults.passes,
        help="run the sizes this many times in turn and pool each size's passes",
    )
    add_result_options(parser, (START, END))
    args = parser.parse_args(argv)
    problem = result_options_problem(args)
    if problem:
        parser.error(problem)
    if args.load:
        result = json.loads(args.load.read_text())
    else:
        sizes = tuple(int(x) for x in args.sizes.split(",") if x)
        if not sizes or min(sizes) < 1:
            parser.error("--sizes takes positive fleet sizes, e.g. 4,16,32")
        if args.passes < 1:
            parser.error("--passes takes a positive number")
        if args.latency_gap < 0:
            parser.error("--latency-gap takes seconds, 0 or more")
        config = SizesConfig(
            sizes=sizes,
            series=args.series,
            venv=args.venv,
            tasks=args.tasks,
            rounds=args.rounds,
            idle_seconds=args.idle_seconds,
            burst_tasks=args.burst_tasks,
            burst_workers=args.burst_workers,
            burst_repeats=args.burst_repeats,
            faults=not args.no_faults,
            passes=args.passes,
            latency_gap=args.latency_gap,
        )

        def log(text: str) -> None:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

        run = SizesRun(config, log)
        run.run()
        result = run.result
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(result)
    if not args.check:
        sys.stdout.write(text + "\n")
    if args.markdown:
        try:
            return rewrite(args.markdown, text, (START, END), args.check, args.load)
        except ValueError as exc:
            parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
