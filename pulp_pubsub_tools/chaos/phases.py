"""The checks of targeted traffic and of the outage phase (no I/O here, like :mod:`.invariant`).

**Targeted traffic.** On a backend that targets, one channel of the run is declared for
targeted delivery: every subscriber joins its group, and each message published to the group
is owed to the group, not to each member. The rule: every targeted publish that succeeded
once every member had subscribed reaches at least one member, or a resync on that channel
whose window covers it (see :func:`.invariant.covers`) reaches at least one member; one that
arrives does so within ``claim_timeout`` (the time a member that died holding it keeps it from
the others) of its publish returning, or of the end of a fault that went on meanwhile (a
frozen server hands nothing out), unless a resync covered it; and in a fault-free stretch
every one arrives.

**The outage.** Near the end of the faults, the server is stopped for ``outage`` seconds. The
rule: every subscriber says it is degraded, and each delivers degraded mode's resyncs on each
of its channels at about ``outage_interval``: the first within an interval of noticing the
loss (which may take up to the probe's detection time), then no gap between two longer than
an interval plus the longer of some slack and ``opening`` (a connection attempt, which the
listener bounds by ``connect_timeout``, holds the next resync back until it gives up: a
ZooKeeper client waits that long on a server that is down), and so at least as many as the
outage leaves room for.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .invariant import AgentLog, Publish, covers

#: Seconds of scheduling slack on top of an interval (processes on a loaded 2-core machine).
SLACK = 1.0


@dataclass
class TargetedVerdict:
    expected: int = 0
    delivered: int = 0
    covered_by_resync: int = 0
    #: (channel, seq): reached no member, and no member got a resync covering it.
    missing: list[tuple[str, int]] = field(default_factory=list)
    #: (channel, seq, seconds): reached a member later than claim_timeout, uncovered.
    late: list[tuple[str, int, float]] = field(default_factory=list)
    #: (channel, seq): published and returned inside a fault-free stretch, reached no member.
    lost_while_fault_free: list[tuple[str, int]] = field(default_factory=list)
    #: Handed to more than one member (a member's connection died before its ack).
    redelivered: int = 0
    worst_latency: float | None = None

    @property
    def failures(self) -> int:
        return len(self.missing) + len(self.late) + len(self.lost_while_fault_free)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failures": self.failures}


def check_targeted(
    publishes: list[Publish],
    agents: list[AgentLog],
    margin: float,
    claim_timeout: float,
    stretches: list[tuple[float, float]],
    faults: list[tuple[float, float]] | None = None,
) -> TargetedVerdict:
    """The targeted publishes, owed to the group (see the module doc).

    ``faults``: (started, healed) of each fault, the outage's included.
    """
    verdict = TargetedVerdict()
    joined = [agent.subscribed_at for agent in agents if agent.subscribed_at is not None]
    if not joined or len(joined) < len(agents):
        return verdict
    everyone = max(joined)
    for publish in publishes:
        if publish.group is None or not publish.ok or publish.started < everyone:
            continue
        verdict.expected += 1
        key = (publish.channel, publish.seq)
        arrivals = [agent.delivered[key] for agent in agents if key in agent.delivered]
        covered = any(
            covers(resync, publish, margin)
            for agent in agents
            for resync in agent.resyncs.get(publish.channel, [])
            if resync[0] > publish.started
        )
        quiet = any(
            start <= publish.started and publish.ended <= end - margin for start, end in stretches
        )
        if not arrivals:
            if covered:
                verdict.covered_by_resync += 1
            else:
                verdict.missing.append(key)
            if quiet:
                verdict.lost_while_fault_free.append(key)
            continue
        verdict.delivered += 1
        verdict.redelivered += len(arrivals) > 1
        first = min(arrivals)
        latency = max(0.0, first - publish.ended)
        verdict.worst_latency = max(verdict.worst_latency or 0.0, latency)
        # Due from its publish, or from the end of a fault between its publish and arrival.
        due = max([publish.ended] + [h for s, h in faults or [] if s < first and h > publish.ended])
        if first - due > claim_timeout + SLACK and not covered:
            verdict.late.append((*key, round(latency, 3)))
    return verdict


@dataclass
class OutageVerdict:
    seconds: float
    interval: float
    agents: int = 0
    #: Subscribers that delivered at least one resync while saying they were degraded.
    degraded_agents: int = 0
    #: Per subscriber and channel, the fewest degraded-mode resyncs inside the outage.
    fewest_resyncs: int = 0
    at_least: int = 0
    #: The longest wait, on one channel, from the outage's start to the first resync.
    first_wait: float = 0.0
    first_limit: float = 0.0
    #: The longest gap between two degraded-mode resyncs on one channel, or from the last
    #: to the server's start.
    widest_gap: float = 0.0
    gap_limit: float = 0.0
    #: "subscriber:channel" of those that fell short.
    short: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.agents > 0
            and self.degraded_agents == self.agents
            and not self.short
            and self.first_wait <= self.first_limit
            and self.widest_gap <= self.gap_limit
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def check_outage(
    agents: list[AgentLog],
    channels: list[str],
    began: float,
    ended: float,
    interval: float,
    notice: float,
    opening: float = 0.0,
) -> OutageVerdict:
    """Degraded mode while the server was down, from ``began`` until it was started again
    at ``ended`` (see the module doc).

    ``notice``: how long a subscriber may take to notice that its server is gone.
    """
    seconds = ended - began
    verdict = OutageVerdict(round(seconds, 3), interval)
    verdict.first_limit = interval + notice + SLACK
    verdict.gap_limit = interval + max(SLACK, opening)
    # The first comes one interval after the loss is noticed (jittered down by up to a
    # quarter), then one an interval apart: at least as many as the limits leave room for.
    room = (seconds - verdict.first_limit) / verdict.gap_limit
    verdict.at_least = max(1, math.floor(room) + 1)
    fewest = None
    for agent in agents:
        if agent.subscribed_at is None:
            continue
        verdict.agents += 1
        verdict.degraded_agents += any(
            began <= at <= ended for times in agent.degraded.values() for at in times
        )
        for channel in channels:
            times = sorted(at for at in agent.degraded.get(channel, []) if began <= at <= ended)
            fewest = len(times) if fewest is None else min(fewest, len(times))
            if len(times) < verdict.at_least:
                verdict.short.append(f"{agent.name}:{channel}")
            if times:
                verdict.first_wait = round(max(verdict.first_wait, times[0] - began), 3)
            # Up to the server's start: until then the resyncs must go on.
            gaps = [b - a for a, b in itertools.pairwise([*times, ended])] if times else []
            verdict.widest_gap = round(max([verdict.widest_gap, *gaps]), 3)
    verdict.fewest_resyncs = fewest or 0
    return verdict
