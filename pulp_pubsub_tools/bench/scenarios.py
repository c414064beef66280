"""The six measurements. Each returns a plain dict for the JSON report.

Backend scenarios take the run's :class:`~.runner.BackendRun`, whose fleet of
idle subscribers is started once per backend: connections, idle and fanout use
all N of them, then commit shrinks it to 100 and to 0.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import BenchError, roles
from .agents import Fleet
from .board import Board
from .stats import quantiles_ms, ratio, summary_ms

if TYPE_CHECKING:
    from .runner import BackendRun, Context

#: The channel idle subscribers listen on; writers publish on another one.
WAKE = "pubsub_bench_wake"
#: The targeted scenario's channel and the group the fleet joins on it.
WORK, WORK_GROUP = "pubsub_bench_work", "bench"
COMMIT = "pubsub_bench_commit"
#: Round trips before measuring (connections warm, code paths hot), then blocks that
#: alternate layer and raw, so a change in the machine's load hits both alike.
WARMUP, BLOCKS = 50, 20
#: Seconds for one reply from every agent before the round counts what it has.
ROUND_WAIT = 15.0


def _channel(kind: str) -> str:
    return f"pubsub_bench_{kind}_{uuid.uuid4().hex[:8]}"


def fixed(role: roles.Role) -> Callable[[int], roles.Role]:
    """The same role for every agent of a spawn."""
    return lambda index: role


def wait_ready(
    fleet: Fleet,
    ctx: Context,
    label: str,
    agents: list[Any] | None = None,
    timeout: float | None = None,
) -> None:
    agents = fleet.agents if agents is None else agents
    wait = ctx.connect_wait if timeout is None else timeout
    with ctx.progress.step(label, len(agents), "agents") as step:
        got = fleet.gather(wait, lambda m: "ready" in m, agents, step.update)
    failed = [agents[i].name for i, m in got.items() if not m["ready"]]
    missing = [agent.name for i, agent in enumerate(agents) if i not in got]
    if failed or missing:
        errors = {str(m["last_error"]) for m in got.values() if m.get("last_error")}
        raise BenchError(
            f"{label}: {len(failed) + len(missing)} of {len(agents)} agents did not connect"
            f" ({'; '.join(sorted(errors)) or 'no reply'})."
        )


# -- 1. latency ---------------------------------------------------------------------


def latency(ctx: Context, run: BackendRun) -> dict[str, Any]:
    target, fleet = run.target, Fleet()
    kinds: dict[str, tuple[roles.Role, roles.Role]] = {}
    ping, pong = _channel("ping"), _channel("pong")
    kinds["layer"] = (
        roles.echo(target.settings_for("echo"), ping, pong),
        roles.pinger(target.settings_for("pinger"), ping, pong),
    )
    if target.raw is not None:
        rping, rpong = _channel("rawping"), _channel("rawpong")
        kinds["raw"] = (
            roles.raw_echo(target.raw, rping, rpong),
            roles.raw_pinger(target.raw, rping, rpong),
        )
    pingers = {}
    try:
        for kind, (echo, pinger) in kinds.items():
            fleet.spawn(
                1,
                f"{kind}-echo",
                fixed(echo),
                in_process=target.in_process,
                setup=run.setup("echo"),
            )
            pingers[kind] = fleet.spawn(
                1,
                f"{kind}-pinger",
                fixed(pinger),
                in_process=target.in_process,
                setup=run.setup("pinger"),
            )
        wait_ready(fleet, ctx, f"latency {target.name}: connecting")
        rtts: dict[str, list[float]] = {kind: [] for kind in kinds}
        lost = dict.fromkeys(kinds, 0)
        per_block = max(1, ctx.params.pings // BLOCKS)
        with ctx.progress.step(
            f"latency {target.name}", per_block * BLOCKS * len(kinds), "round trips"
        ) as step:
            for block in range(-1, BLOCKS):
                for kind, agents in pingers.items():
                    rounds = WARMUP if block < 0 else per_block
                    fleet.send({"rounds": rounds, "block": block}, agents)
                    wait = rounds * roles.PONG_WAIT + ROUND_WAIT
                    [reply] = fleet.gather(wait, lambda m: "rtts" in m, agents).values()
                    if block >= 0:
                        rtts[kind] += reply["rtts"]
                        lost[kind] += reply["lost"]
                        step.update(rounds)
    finally:
        fleet.close()
        ctx.wait_gone("echo", "pinger")
    result: dict[str, Any] = {
        kind: {**summary_ms(rtts[kind]), "lost": lost[kind]} for kind in kinds
    }
    result["raw_client"] = target.raw_label
    if "raw" in result:
        result["ratio_p50"] = ratio(result["layer"].get("p50"), result["raw"].get("p50"))
        result["ratio_p99"] = ratio(result["layer"].get("p99"), result["raw"].get("p99"))
    return result


# -- 2. fanout ----------------------------------------------------------------------


def fanout(ctx: Context, run: BackendRun) -> dict[str, Any]:
    n, target = ctx.params.subscribers, run.target
    run.grow(n)
    publisher = roles.publisher(target.settings_for("publisher"))
    pub = Fleet()
    pub.spawn(
        1,
        "publisher",
        fixed(publisher),
        in_process=target.in_process,
        setup=run.setup("publisher"),
    )
    per_subscriber: list[float] = []
    first: list[float] = []
    last: list[float] = []
    lost = 0
    resyncs = run.board.resyncs(n)
    switches: list[dict[int, Any]] = []
    try:
        wait_ready(pub, ctx, f"fanout {target.name}: publisher")
        switches.append(_switches(run.fleet))
        with ctx.progress.step(f"fanout {target.name} to {n}", ctx.params.rounds, "rounds") as step:
            for _ in range(ctx.params.rounds):
                round_ = run.next_round()
                pub.send({"publish": str(round_), "channel": WAKE})
                [sent] = pub.gather(ROUND_WAIT, lambda m: "t0" in m).values()
                got = [t for t in run.board.collect(round_, n, ROUND_WAIT) if t is not None]
                lost += n - len(got)
                times = [t - sent["t0"] for t in got]
                if times:
                    per_subscriber += times
                    first.append(min(times))
                    last.append(max(times))
                step.update(1)
                time.sleep(0.02)  # let the last woken subscribers go back to sleep
        switches.append(_switches(run.fleet))
    finally:
        pub.close()
        ctx.wait_gone("publisher")
    result: dict[str, Any] = {
        "subscribers": n,
        "rounds": ctx.params.rounds,
        "lost": lost,
        "resyncs": run.board.resyncs(n) - resyncs,
        "last": summary_ms(last),
        "first": summary_ms(first),
        "per_subscriber": summary_ms(per_subscriber),
        "per_subscriber_cdf": quantiles_ms(per_subscriber),
        "wakeups_per_message": _per_message(switches, ctx.params.rounds),
    }
    if target.raw is not None:
        result["raw"] = raw_fanout(ctx, run)
        result["raw_client"] = target.raw_label
        result["ratio_last_p50"] = ratio(
            result["last"].get("p50"), result["raw"]["last"].get("p50")
        )
    return result


def raw_fanout(ctx: Context, run: BackendRun) -> dict[str, Any]:
    """The same fanout from the bare client to N bare subscribers: the yardstick.

    Run after the layer's, with the layer's fleet idle beside it, so the
    machine carries the same processes for both.
    """
    n, target = ctx.params.subscribers, run.target
    assert target.raw is not None
    board, fleet, pub = Board(n), Fleet(), Fleet()
    channel = _channel("rawwake")
    last: list[float] = []
    per_subscriber: list[float] = []
    lost = 0
    try:
        fleet.spawn(
            n,
            "raw-subscriber",
            roles.raw_subscriber(target.raw, channel, board),
            in_process=False,
            setup=None,
        )
        wait_ready(fleet, ctx, f"fanout {target.name}: raw subscribers")
        pub.spawn(
            1, "raw-publisher", fixed(roles.raw_publisher(target.raw)), in_process=False, setup=None
        )
        wait_ready(pub, ctx, f"fanout {target.name}: raw publisher")
        switches = [_switches(fleet)]
        with ctx.progress.step(
            f"raw fanout {target.name} to {n}", ctx.params.rounds, "rounds"
        ) as step:
            for round_ in range(1, ctx.params.rounds + 1):
                pub.send({"publish": str(round_), "channel": channel})
                [sent] = pub.gather(ROUND_WAIT, lambda m: "t0" in m).values()
                got = [t for t in board.collect(round_, n, ROUND_WAIT) if t is not None]
                lost += n - len(got)
                times = [t - sent["t0"] for t in got]
                if times:
                    per_subscriber += times
                    last.append(max(times))
                step.update(1)
                time.sleep(0.02)  # as the layer's rounds
        switches.append(_switches(fleet))
    finally:
        pub.close()
        fleet.close()
        board.close()
        ctx.wait_gone("raw-publisher", "raw-subscriber")
    return {
        "lost": lost,
        "last": summary_ms(last),
        "per_subscriber": summary_ms(per_subscriber),
        "wakeups_per_message": _per_message(switches, ctx.params.rounds),
    }


def _switches(fleet: Fleet) -> dict[int, Any]:
    """Each subscriber's voluntary context switches so far (see roles.voluntary_switches)."""
    fleet.send({"cmd": "switches"})
    replies = fleet.gather(ROUND_WAIT, lambda m: "switches" in m)
    return {i: m["switches"] for i, m in replies.items()}


def _per_message(switches: list[dict[int, Any]], rounds: int) -> float | None:
    """The median subscriber's thread wake-ups per message over the rounds.

    It counts the two control commands that read the counts too (and a probe that fell in
    the rounds): about 2/rounds more than the messages alone cost, the same for every row.
    """
    if len(switches) != 2 or not rounds:
        return None
    before, after = switches
    per = [
        (after[i] - before[i]) / rounds
        for i in after
        if before.get(i) is not None and after[i] is not None
    ]
    return round(statistics.median(per), 2) if per else None


# -- 2b. targeted ---------------------------------------------------------------------


def targeted(ctx: Context, run: BackendRun) -> dict[str, Any]:
    """Work-queue delivery against broadcast to the same N subscribers.

    Every subscriber joins the group ``bench`` on a channel of its own; each
    round publishes one targeted message there, then one broadcast. Targeted:
    how many subscribers handle each message (one, where the backend targets)
    and how soon the first has it; broadcast: every subscriber handles every
    message, and the last has it when the fanout's last does.
    """
    n, target = ctx.params.subscribers, run.target
    run.grow(n)
    run.fleet.send({"join": WORK, "group": WORK_GROUP})
    joined = run.fleet.gather(ctx.connect_wait, lambda m: "joined" in m)
    if len(joined) < len(run.fleet):
        raise BenchError(f"targeted {target.name}: {n - len(joined)} subscribers did not join.")
    pub = Fleet()
    pub.spawn(
        1,
        "publisher",
        fixed(roles.publisher(target.settings_for("publisher"))),
        in_process=target.in_process,
        setup=run.setup("publisher"),
    )
    modes: dict[str, dict[str, Any]] = {}
    delivery = "broadcast"
    try:
        wait_ready(pub, ctx, f"targeted {target.name}: publisher")
        for mode, group in (("targeted", WORK_GROUP), ("broadcast", None)):
            handled: dict[int, int] = {}
            deliveries: list[int] = []
            first: list[float] = []
            lost = 0
            label = f"{mode} {target.name} to {n}"
            with ctx.progress.step(label, ctx.params.rounds, "rounds") as step:
                for _ in range(ctx.params.rounds):
                    round_ = run.next_round()
                    pub.send({"publish": str(round_), "channel": WORK, "group": group})
                    [sent] = pub.gather(ROUND_WAIT, lambda m: "t0" in m).values()
                    if group is not None:
                        delivery = sent["delivery"]
                    got = run.board.collect_any(round_, n, ROUND_WAIT, linger=0.2)
                    if not got:
                        lost += 1
                    deliveries.append(len(got))
                    for slot, _ in got:
                        handled[slot] = handled.get(slot, 0) + 1
                    if got:
                        first.append(min(t for _, t in got) - sent["t0"])
                    step.update(1)
            rounds = ctx.params.rounds
            modes[mode] = {
                "deliveries_per_message": round(sum(deliveries) / rounds, 2),
                "messages_handled_per_subscriber": round(sum(deliveries) / n, 2),
                "most_handled_by_one": max(handled.values(), default=0),
                "subscribers_used": len(handled),
                "lost": lost,
                "first": summary_ms(first),
            }
    finally:
        pub.close()
        ctx.wait_gone("publisher")
    return {
        "subscribers": n,
        "rounds": ctx.params.rounds,
        "delivery": delivery,
        **modes,
    }


# -- 3. connections -----------------------------------------------------------------


def connections(ctx: Context, run: BackendRun) -> dict[str, Any]:
    n = ctx.params.subscribers
    run.grow(n)
    by_name = ctx.monitor().sessions()
    held = sum(by_name.get(name, 0) for name in run.session_names())
    result: dict[str, Any] = {"subscribers": n, "pg_sessions": held, "pg_sessions_by_name": by_name}
    if run.target.settings.backend == "redis":  # for the record: what it holds instead
        result["redis_clients"] = ctx.redis_monitor().clients()
    if run.target.settings.backend == "etcd":
        result["etcd_watchers"] = etcd_watchers(ctx.servers.url("etcd"))
    return result


def etcd_watchers(url: str) -> int | None:
    """Watches open on an etcd member, from its /metrics (None when it cannot tell)."""
    import urllib.request

    from pulp_pubsub.backends.etcd.backend import parse_url

    (host, port), *_ = parse_url(url)[0]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("etcd_debugging_mvcc_watcher_total "):
                    return int(float(line.split()[1]))
    except OSError:
        return None
    return None


# -- 4. idle ------------------------------------------------------------------------


def measure_idle(
    ctx: Context,
    fleet: Fleet,
    in_process: bool,
    label: str,
    servers: tuple[str, ...],
    settle: float,
) -> dict[str, Any]:
    """CPU of the fleet (and of throwaway ``servers``) and the database's transactions
    over one window of doing nothing, ``settle`` seconds or more after the fleet started."""
    monitor = ctx.monitor()
    wait = settle - (time.monotonic() - fleet.grown_at)
    if wait > 0:
        with ctx.progress.step(f"{label}: settling", round(wait), "s") as step:
            _sleep(wait, step.update)
    cpu0, started = _cpu(fleet, in_process), time.monotonic()
    server0 = {kind: ctx.servers.cpu_seconds(kind) for kind in servers}
    mark = monitor.xact_mark()
    window = ctx.params.window
    with ctx.progress.step(label, round(window), "s") as step:
        _sleep(window, step.update)
    xacts, elapsed = monitor.xacts_since(mark)
    server_pct = {}
    for kind, before in server0.items():
        after = ctx.servers.cpu_seconds(kind)
        if before is not None and after is not None:
            server_pct[kind] = round(100 * (after - before) / elapsed, 2)
    cpu = _cpu(fleet, in_process) - cpu0
    cpu_elapsed = time.monotonic() - started
    return {
        "agents": len(fleet),
        "window_s": round(elapsed, 3),
        "cpu_s": round(cpu, 4),
        "cpu_pct_of_core": round(100 * cpu / cpu_elapsed, 3),
        "pg_xacts": xacts,
        "pg_xact_per_s": round(xacts / elapsed, 3),
        # Throwaway servers only (their processes are ours to look at), % of one core.
        "server_cpu_pct": server_pct,
    }


def _sleep(seconds: float, tick: Callable[[int], None]) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        tick(1)


def _cpu(fleet: Fleet, in_process: bool) -> float:
    if in_process:  # threads of this process: its own clock covers them
        return time.process_time()
    fleet.send({"cmd": "cpu"})
    got = fleet.gather(ROUND_WAIT, lambda m: "cpu" in m)
    if len(got) < len(fleet):
        raise BenchError(f"{len(fleet) - len(got)} agents did not report their CPU time.")
    return float(sum(m["cpu"] for m in got.values()))


def idle(ctx: Context, run: BackendRun) -> dict[str, Any]:
    run.grow(ctx.params.subscribers)
    servers = tuple(dict.fromkeys(("postgres", run.target.adapter.server or "postgres")))
    settle = ctx.params.settle
    if ctx.params.steady:
        settle = max(settle, run.probe_interval + 1)
    label = f"idle {run.target.name}"
    result = measure_idle(ctx, run.fleet, run.target.in_process, label, servers, settle)
    result["subscribers"] = result.pop("agents")
    result["probe_interval_s"] = run.probe_interval
    return result


# -- 5. commit ----------------------------------------------------------------------


def commit(ctx: Context, run: BackendRun) -> dict[str, Any]:
    """Commit rate of W writers with N, 100 and 0 idle subscribers (the fleet shrinks).

    With ``--repeats R`` each level measures R times with a wake-up and R times
    without, in turn (the order flips every time), and reports the medians and
    ``share``, the median of each pair's ratio: a 2-core machine drifts by a few
    percent over minutes, and a ratio of two runs seconds apart does not see it.

    Each row also has the CPU per commit of the writers (every thread) and of
    each throwaway server, medians over the runs: what a wake-up costs shows as
    the difference with and without one, which drifts far less than a rate.
    """
    params, target, writers = ctx.params, run.target, run.writers
    kinds = tuple(dict.fromkeys(("postgres", target.adapter.server or "postgres")))
    levels = []
    for level in params.commit_levels:
        run.shrink(level)
        run.grow(level)
        row: dict[str, Any] = {"subscribers": level, "errors": 0, "plain_errors": 0}
        samples: dict[bool, list[float]] = {True: [], False: []}
        cpu: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for repeat in range(params.repeats):
            for publish in (True, False) if repeat % 2 == 0 else (False, True):
                label = f"commit {target.name}, {level} idle subscribers" + (
                    "" if publish else ", no publish"
                )
                before = {kind: ctx.servers.cpu_seconds(kind) for kind in kinds}
                with ctx.progress.step(label, 1, "runs") as step:
                    writers.send({"run": params.duration, "publish": publish})
                    got = writers.gather(params.duration + 60, lambda m: "commits" in m)
                    step.update(1)
                commits = sum(m["commits"] for m in got.values())
                used = {"writers": sum(m["cpu"] for m in got.values())}
                for kind, start in before.items():
                    end = ctx.servers.cpu_seconds(kind)
                    if start is not None and end is not None:
                        used[kind] = end - start
                if commits:
                    cpu[publish].append({k: v * 1e6 / commits for k, v in used.items()})
                elapsed = max(m["elapsed"] for m in got.values())
                samples[publish].append(round(commits / elapsed, 1))
                row["errors" if publish else "plain_errors"] += sum(
                    m["errors"] for m in got.values()
                )
                errors = [m["first_error"] for m in got.values() if m["first_error"]]
                if errors:
                    row.setdefault("first_error", errors[0])
        row["commits_per_s"] = round(statistics.median(samples[True]), 1)
        row["plain_commits_per_s"] = round(statistics.median(samples[False]), 1)
        pairs = [a / b for a, b in zip(samples[True], samples[False], strict=True) if b]
        row["share"] = round(statistics.median(pairs), 4) if pairs else None
        row["cpu_us_per_commit"] = _median_each(cpu[True])
        row["plain_cpu_us_per_commit"] = _median_each(cpu[False])
        if params.repeats > 1:
            row["samples"], row["plain_samples"] = samples[True], samples[False]
        levels.append(row)
    return {
        "writers": params.writers,
        "duration_s": params.duration,
        "repeats": params.repeats,
        "levels": levels[::-1],
    }


def _median_each(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = set().union(*runs) if runs else set()
    return {k: round(statistics.median(r[k] for r in runs if k in r), 1) for k in sorted(keys)}


# -- 6. poll baseline ---------------------------------------------------------------


def poll(ctx: Context) -> dict[str, Any]:
    """Pulp's polling worker model, with N workers each sleeping N x 10 ms between looks."""
    n = ctx.params.subscribers
    period = n * 0.01
    monitor = ctx.monitor()
    fleet, board = Fleet(), Board(n)
    per_worker: list[float] = []
    first: list[float] = []
    last: list[float] = []
    lost = 0
    try:
        fleet.spawn(
            n,
            "poller",
            roles.poller(period, board),
            in_process=False,
            setup=ctx.agent_setup("poller"),
        )
        wait_ready(fleet, ctx, f"poll: starting {n} workers")
        sessions = monitor.sessions().get(ctx.application_name("poller"), 0)
        label = f"poll: {n} idle workers"
        idle_result = measure_idle(ctx, fleet, False, label, ("postgres",), ctx.params.settle)
        with ctx.progress.step(
            f"poll: wake-ups, {n} workers", ctx.params.poll_rounds, "rounds"
        ) as step:
            for _ in range(ctx.params.poll_rounds):
                started = time.monotonic()
                task = monitor.insert_task()
                got = [t for t in board.collect(task, n, period * 2 + ROUND_WAIT) if t is not None]
                lost += n - len(got)
                times = [t - started for t in got]
                if times:
                    per_worker += times
                    first.append(min(times))
                    last.append(max(times))
                step.update(1)
    finally:
        fleet.close()
        board.close()
        ctx.wait_gone("poller")
    return {
        "workers": n,
        "period_ms": round(period * 1000, 1),
        "rounds": ctx.params.poll_rounds,
        "lost": lost,
        "pg_sessions": sessions,
        "idle": idle_result,
        "last": summary_ms(last),
        "first": summary_ms(first),
        "per_worker": summary_ms(per_worker),
        "per_worker_cdf": quantiles_ms(per_worker),
    }
