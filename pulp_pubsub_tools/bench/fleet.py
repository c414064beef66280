"""The ``fleet`` scenario: what each backend costs as a fleet of workers grows.

One backend at a time, a fleet of subscribers grows through ``--fleet-sizes``
(250, 500, 1,000 and 2,000 by default), several to an agent process, each with
its own connection and listener thread, as workers have. At each size:

- **idle**: over ``--window`` seconds, the CPU and memory (PSS) of the backend's
  own servers, of the agents per subscriber, the liveness probes sent, and the
  connections each server holds (from /proc/net/tcp);
- **targeted**: ``--rounds`` timed publishes to the fleet's work-queue group (the
  first receiver's latency), then a burst whose server CPU per publish is read
  from /proc before and after, less what the server burns idle meanwhile;
- **broadcast**: ``--rounds`` publishes to every subscriber (each and last
  receiver), then the same from the bare client to as many bare subscribers,
  started beside the idle fleet and stopped again.

A backend stops growing where it cannot hold the next size (a refused
connection, or the memory the last size's figures say the next would need) and
the result says why.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

from pulp_pubsub.backends.base import COMMON_OPTIONS
from pulp_pubsub.conf import PubSubSettings

from . import BenchError
from .adapters import Adapter, Target, adapter_for
from .agents import Fleet
from .board import Board
from .fleet_report import fans_out
from .fleet_roles import members, raw_members
from .monitor import established
from .progress import Progress
from .roles import publisher, raw_publisher
from .runner import Context, Params, finish_meta, new_meta
from .scenarios import ROUND_WAIT, fixed, wait_ready
from .servers import ServerSet
from .stats import ratio, summary_ms

WAKE, WORK, GROUP = "pubsub_fleet_wake", "pubsub_fleet_work", "fleet"
RAW_WAKE = "pubsub_fleet_rawwake"
#: Memory left alone for the rest of the machine when deciding whether the next size fits.
MEMORY_RESERVE_KB = 3 * 2**20
#: Seconds the bench waits for agents' answers beyond what they wait themselves.
GATHER_SLACK = 15.0


@dataclass
class FleetParams:
    sizes: tuple[int, ...] = (250, 500, 1000, 2000)
    #: Subscribers per agent process (the last size need not be a multiple).
    per_agent: int = 25
    #: Timed targeted publishes, and as many broadcasts, per size.
    rounds: int = 30
    #: Targeted publishes whose server CPU is measured; fewer where they fan out.
    burst: int = 2000
    #: A burst that fans out stops at about this many deliveries.
    deliveries: int = 20000
    window: float = 10.0
    #: Seconds between the fleet's last subscriber starting and the idle window.
    settle: float = 3.0
    #: The subscribers' liveness probe period: shorter than the layer's 30 s, so each
    #: subscriber probes in every short idle window (probe traffic is what is measured).
    probe_interval: float = 5.0
    #: Seconds a subscriber may take to connect before its size counts as not held.
    connect_wait: float = 30.0
    #: And more for each agent a size adds: agents start one after another, and a server
    #: that forks a process per connection (PostgreSQL) takes its time with a thousand new
    #: ones on a loaded machine, so a size is given up for the server, not for the clock.
    agent_wait: float = 1.5

    def check(self) -> None:
        if not self.sizes or any(n < 1 for n in self.sizes):
            raise BenchError("--fleet-sizes must name sizes of at least 1.")
        if list(self.sizes) != sorted(set(self.sizes)):
            raise BenchError("--fleet-sizes must grow: 250,500,1000,2000.")
        if self.per_agent < 1 or self.rounds < 1 or self.burst < 1:
            raise BenchError("--per-agent, --rounds and --burst must be at least 1.")
        if self.window <= 0 or self.probe_interval <= 0:
            raise BenchError("--window and the probe interval must be positive.")
        for n in self.sizes[:-1]:
            if n % self.per_agent:
                raise BenchError(
                    f"Each fleet size but the last must be a multiple of --per-agent "
                    f"{self.per_agent} (a grown fleet keeps its agents): {n} is not."
                )


QUICK_FLEET = FleetParams(
    sizes=(4, 8),
    per_agent=2,
    rounds=3,
    burst=5,
    deliveries=50,
    window=1.0,
    settle=0.2,
    probe_interval=0.5,
    connect_wait=2.0,
    agent_wait=0.0,
)


def server_kinds(adapter: Adapter) -> tuple[str, ...]:
    """The servers whose CPU, memory and connections are the backend's cost."""
    kinds = [adapter.server or "postgres"]
    if adapter.extra_sessions:  # the relay's own PostgreSQL session
        kinds.append("postgres")
    return tuple(dict.fromkeys(kinds))


def mem_available_kb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    return 0


class FleetRun:
    """One backend's growing fleet, its publisher, and what each size measured."""

    def __init__(self, ctx: Context, params: FleetParams, target: Target) -> None:
        self.ctx, self.params, self.target = ctx, params, target
        self.kinds = server_kinds(target.adapter)
        self.board = Board(params.sizes[-1])
        self.fleet, self.pub = Fleet(), Fleet()
        self.size = 0
        self._round = 0
        self.uses_database = target.adapter.server == "postgres" or bool(
            target.adapter.extra_sessions
        )

    def settings(self, role: str) -> PubSubSettings:
        settings = self.target.settings_for(role)
        options = {**settings.options, "probe_interval": self.params.probe_interval}
        options["probe_timeout"] = min(self.params.probe_interval, COMMON_OPTIONS["probe_timeout"])
        return replace(settings, options=options)

    def setup(self, role: str) -> Any:
        """The bench PostgreSQL as the agent's Django ``default``, where the backend uses one
        (the relay's backend builds its NOTIFY publisher in every process)."""
        return self.ctx.agent_setup(role) if self.uses_database else None

    def next_round(self, count: int = 1) -> int:
        first = self._round + 1
        self._round += count
        return first

    def start(self) -> None:
        role = publisher(self.settings("publisher"))
        self.pub.spawn(
            1, "fleet-publisher", fixed(role), in_process=False, setup=self.setup("publisher")
        )
        wait_ready(self.pub, self.ctx, f"fleet {self.target.name}: publisher")

    def grow(self, n: int) -> float:
        per = self.params.per_agent
        agents = math.ceil(n / per) - len(self.fleet)
        started = time.monotonic()
        settings = self.settings("subscriber")
        wait = self.params.connect_wait + self.params.agent_wait * agents
        make = members(settings, WAKE, WORK, GROUP, self.board, per, n, wait)
        new = self.fleet.spawn(
            agents, "fleet-subscriber", make, in_process=False, setup=self.setup("subscriber")
        )
        label = f"fleet {self.target.name}: growing to {n}"
        wait_ready(self.fleet, self.ctx, label, new, timeout=wait + GATHER_SLACK)
        self.size = n
        return time.monotonic() - started

    def reports(self) -> list[dict[str, Any]]:
        self.fleet.send({"cmd": "report"})
        got = self.fleet.gather(ROUND_WAIT, lambda m: "cpu" in m)
        if len(got) < len(self.fleet):
            raise BenchError(f"{len(self.fleet) - len(got)} agents did not report.")
        return list(got.values())

    def server_cpu(self) -> float:
        return sum(self.ctx.servers.cpu_seconds(kind) or 0.0 for kind in self.kinds)

    def close(self) -> None:
        self.pub.close()
        self.fleet.close()
        self.board.close()
        self.ctx.wait_gone("subscriber", "publisher")

    # -- one size ----------------------------------------------------------------------

    def idle(self) -> dict[str, Any]:
        n, servers = self.size, self.ctx.servers
        time.sleep(self.params.settle)
        before, cpu0, t0 = self.reports(), self.server_cpu(), time.monotonic()
        by_kind0 = {kind: servers.cpu_seconds(kind) for kind in self.kinds}
        with self.ctx.progress.step(f"fleet {self.target.name} {n}: idle", 1, "windows") as step:
            time.sleep(self.params.window)
            step.update(1)
        after, cpu1, elapsed = self.reports(), self.server_cpu(), time.monotonic() - t0
        agent_cpu = sum(r["cpu"] for r in after) - sum(r["cpu"] for r in before)
        probes = sum(r["probes"] for r in after) - sum(r["probes"] for r in before)
        per_kind = {}
        for kind, start in by_kind0.items():
            end = servers.cpu_seconds(kind)
            if start is not None and end is not None:
                per_kind[kind] = round(100 * (end - start) / elapsed, 3)
        pss = {kind: servers.pss_kb(kind) for kind in self.kinds}
        ports = {kind: servers.port(kind) for kind in self.kinds}
        return {
            "window_s": round(elapsed, 2),
            "server_cpu_rate": (cpu1 - cpu0) / elapsed,
            "server_cpu_pct": round(100 * (cpu1 - cpu0) / elapsed, 3),
            "server_cpu_pct_by_kind": per_kind,
            "server_pss_mb": round(sum(v or 0 for v in pss.values()) / 1024, 1),
            "server_pss_mb_by_kind": {k: round(v / 1024, 1) for k, v in pss.items() if v},
            "subscriber_cpu_pct": round(100 * agent_cpu / elapsed, 3),
            "cpu_us_per_s_per_subscriber": round(1e6 * agent_cpu / elapsed / n, 3),
            "pss_kb_per_subscriber": round(sum(r["pss_kb"] for r in after) / n, 1),
            "rss_kb_per_subscriber": round(sum(r["rss_kb"] for r in after) / n, 1),
            "probes_per_s": round(probes / elapsed, 3),
            "probes_per_subscriber_per_min": round(60 * probes / elapsed / n, 4),
            "connections": {k: established(p) for k, p in ports.items() if p is not None},
        }

    def targeted(self) -> dict[str, Any]:
        n, board = self.size, self.board
        first: list[float] = []
        receivers: list[int] = []
        delivery, lost = "broadcast", 0
        label = f"fleet {self.target.name} {n}: targeted"
        with self.ctx.progress.step(label, self.params.rounds, "rounds") as step:
            for _ in range(self.params.rounds):
                round_ = self.next_round()
                self.pub.send({"publish": str(round_), "channel": WORK, "group": GROUP})
                [sent] = self.pub.gather(ROUND_WAIT, lambda m: "t0" in m).values()
                delivery = sent["delivery"]
                if delivery == "targeted":
                    got = board.collect_any(round_, n, ROUND_WAIT, linger=0.02)
                else:  # a broadcast: let it reach everyone before the next round
                    times = board.collect(round_, n, ROUND_WAIT)
                    got = [(s, t) for s, t in enumerate(times) if t is not None]
                if got:
                    first.append(min(t for _, t in got) - sent["t0"])
                else:
                    lost += 1
                receivers.append(len(got))
                step.update(1)
        return {
            "delivery": delivery,
            "rounds": self.params.rounds,
            "lost": lost,
            "receivers_per_message": round(sum(receivers) / len(receivers), 2),
            "first": summary_ms(first),
        }

    def publish_cpu(self, receivers: float, idle_rate: float) -> dict[str, Any]:
        """Server CPU per targeted publish: a burst, less the idle burn over the same time."""
        p = self.params
        count = p.burst
        if fans_out(receivers):
            count = max(5, min(p.burst, p.deliveries // max(1, self.size)))
        expected = round(count * max(1.0, receivers))
        start = self.next_round(count)
        self.board.drain()
        cpu0, t0 = self.server_cpu(), time.monotonic()
        self.pub.send({"burst": count, "start": start, "channel": WORK, "group": GROUP})
        self.pub.gather(ROUND_WAIT + count, lambda m: "sent" in m)
        got = self.board.count_posts(expected, ROUND_WAIT + count * 0.05)
        time.sleep(0.2)  # the acks and turns that follow the last handling
        cpu1, elapsed = self.server_cpu(), time.monotonic() - t0
        net = max(0.0, cpu1 - cpu0 - idle_rate * elapsed)
        return {
            "publishes": count,
            "deliveries": got,
            "deliveries_expected": expected,
            "elapsed_s": round(elapsed, 3),
            "server_cpu_s": round(cpu1 - cpu0, 3),
            "idle_cpu_s": round(idle_rate * elapsed, 3),
            "server_cpu_us_per_publish": round(1e6 * net / count, 1),
        }

    def broadcast(self) -> dict[str, Any]:
        n = self.size
        rounds = []
        for _ in range(self.params.rounds):
            round_ = self.next_round()
            rounds.append((round_, {"publish": str(round_), "channel": WAKE}, self.pub, self.board))
        return _fanout(self.ctx, f"fleet {self.target.name} {n}: broadcast", n, rounds)

    def raw_broadcast(self) -> dict[str, Any] | None:
        target, n, p = self.target, self.size, self.params
        if target.raw is None:
            return None
        board, fleet, pub = Board(n), Fleet(), Fleet()
        try:
            fleet.spawn(
                math.ceil(n / p.per_agent),
                "fleet-raw",
                raw_members(target.raw, RAW_WAKE, board, p.per_agent, n),
                in_process=False,
                setup=None,
            )
            wait_ready(fleet, self.ctx, f"fleet {target.name} {n}: bare subscribers")
            pub.spawn(1, "fleet-raw-publisher", fixed(raw_publisher(target.raw)), in_process=False)
            wait_ready(pub, self.ctx, f"fleet {target.name} {n}: bare publisher")
            rounds = [
                (r, {"publish": str(r), "channel": RAW_WAKE}, pub, board)
                for r in range(1, p.rounds + 1)
            ]
            return _fanout(self.ctx, f"fleet {target.name} {n}: bare broadcast", n, rounds)
        finally:
            pub.close()
            fleet.close()
            board.close()

    def level(self) -> dict[str, Any]:
        idle = self.idle()
        idle_rate = idle.pop("server_cpu_rate")
        targeted = self.targeted()
        cpu = self.publish_cpu(targeted["receivers_per_message"], idle_rate)
        broadcast = self.broadcast()
        raw = self.raw_broadcast()
        row: dict[str, Any] = {
            "subscribers": self.size,
            "agents": len(self.fleet),
            "idle": idle,
            "targeted": targeted,
            "publish_cpu": cpu,
            "broadcast": broadcast,
            "raw": raw,
        }
        if raw is not None:
            row["ratio_last_p50"] = ratio(broadcast["last"].get("p50"), raw["last"].get("p50"))
            row["ratio_each_p50"] = ratio(
                broadcast["per_subscriber"].get("p50"), raw["per_subscriber"].get("p50")
            )
        return row

    def room_for(self, n: int, last: dict[str, Any] | None) -> None:
        """Refuse a size the machine's memory cannot hold, by the last size's own figures."""
        if last is None:
            return
        idle = last["idle"]
        per = idle["pss_kb_per_subscriber"] + 1024 * idle["server_pss_mb"] / last["subscribers"]
        # The layer's new subscribers, and as many bare ones beside them for a moment.
        need = per * (n - self.size) + per * n
        free = mem_available_kb() - MEMORY_RESERVE_KB
        if need > free:
            raise BenchError(
                f"{n} subscribers would need about {need / 2**20:.1f} GB more memory "
                f"({per / 1024:.1f} MB each, server included, at {last['subscribers']}); "
                f"{max(0, free) / 2**20:.1f} GB are free."
            )


def _fanout(
    ctx: Context, label: str, n: int, rounds: list[tuple[int, dict[str, Any], Fleet, Board]]
) -> dict[str, Any]:
    first: list[float] = []
    last: list[float] = []
    each: list[float] = []
    lost = 0
    with ctx.progress.step(label, len(rounds), "rounds") as step:
        for round_, command, pub, board in rounds:
            pub.send(command)
            answered = list(pub.gather(ROUND_WAIT, lambda m: "t0" in m).values())
            if not answered:
                # Starved or stuck (a 2-core machine at N = 2,000): a stop, not a crash.
                raise BenchError(f"{label}: the publisher did not answer within {ROUND_WAIT} s")
            [sent] = answered
            got = [t for t in board.collect(round_, n, ROUND_WAIT) if t is not None]
            lost += n - len(got)
            times = [t - sent["t0"] for t in got]
            if times:
                each += times
                first.append(min(times))
                last.append(max(times))
            step.update(1)
            time.sleep(0.02)  # let the last woken subscribers go back to sleep
    return {
        "rounds": len(rounds),
        "lost": lost,
        "first": summary_ms(first),
        "last": summary_ms(last),
        "per_subscriber": summary_ms(each),
    }


def run_backend(ctx: Context, params: FleetParams, adapter: Adapter) -> dict[str, Any]:
    run = FleetRun(ctx, params, adapter.target(ctx.servers))
    levels: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "servers": list(run.kinds),
        "raw_client": run.target.raw_label,
        "levels": levels,
    }
    try:
        run.start()
        for n in params.sizes:
            try:
                run.room_for(n, levels[-1] if levels else None)
                grown = run.grow(n)
                row = run.level()
            except BenchError as exc:
                result["stopped"] = {"at": n, "reason": str(exc)}
                ctx.progress.write(f"fleet {adapter.name}: stopped before {n}: {exc}")
                break
            row["grow_s"] = round(grown, 1)
            row["mem_available_gb"] = round(mem_available_kb() / 2**20, 1)
            levels.append(row)
    finally:
        run.close()
    return result


def run_fleet(
    params: FleetParams,
    backends: list[str],
    servers: ServerSet,
    progress: Progress,
    command: str,
) -> dict[str, Any]:
    from .fleet_report import evaluate_goals, project

    params.check()
    adapters = [adapter_for(name) for name in backends]
    for adapter in adapters:
        if adapter.in_process:
            raise BenchError(
                f"The fleet scenario needs a backend with a server, not {adapter.name}."
            )
    top = params.sizes[-1]
    # Every layer subscriber on PostgreSQL holds a session, and so does each bare one.
    servers.max_connections = max(100, 2 * top + 100)
    # A server given by URL must hold the smallest size; a larger one it cannot hold
    # ends that backend's run there, and the result says so.
    ctx = Context(Params(subscribers=2 * params.sizes[0], writers=0), servers, progress)
    ctx.connect_wait = params.connect_wait + GATHER_SLACK
    started = time.monotonic()
    meta = new_meta(command, backends, {**params.__dict__, "sizes": list(params.sizes)})
    meta["scenario"] = "fleet"
    result: dict[str, Any] = {"meta": meta, "fleet": {}}
    try:
        for adapter in adapters:
            result["fleet"][adapter.name] = run_backend(ctx, params, adapter)
        meta["servers"] = servers.describe()
    finally:
        ctx.close()
    finish_meta(meta, started)
    result["projection"] = project(result)
    result["goals"] = evaluate_goals(result)
    return result
