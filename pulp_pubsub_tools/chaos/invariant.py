"""What a chaos run recorded, and the checks made on it afterwards (no I/O here).

The definitions are in the docstring of :mod:`pulp_pubsub_tools.chaos`; this module is kept free of
servers and threads so that the checks themselves are unit-tested on hand-made records.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Publish:
    """One ``publish()`` call of the publisher."""

    seq: int
    channel: str
    started: float
    ended: float
    ok: bool
    error: str | None = None
    #: The exception was not a ``PubSubError``: publish() broke its contract.
    foreign: bool = False
    #: The targeted-delivery group it was published to (None: a broadcast). A targeted
    #: message is owed to the group, not to each member: see :func:`check_targeted`.
    group: str | None = None


@dataclass
class AgentLog:
    """What one subscriber process reported."""

    name: str
    subscribed_at: float | None = None
    #: (channel, seq) -> received_at of its first delivery.
    delivered: dict[tuple[str, int], float] = field(default_factory=dict)
    duplicates: int = 0
    #: channel -> (received_at, since) of every resync, in the order they came; ``since`` is
    #: the subscriber's last proof of hearing before the loss (None: it had never heard).
    resyncs: dict[str, list[tuple[float, float | None]]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    max_seq: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    exit_code: int | None = None
    close_hung: bool = False
    #: (channel, seq) of the messages a mutation (see :mod:`.mutations`) dropped on purpose.
    dropped: set[tuple[str, int]] = field(default_factory=set)
    #: channel -> received_at of each resync delivered while the subscriber said it was
    #: degraded (its server unreachable: degraded mode's periodic resyncs).
    degraded: dict[str, list[float]] = field(default_factory=dict)

    def add_message(self, channel: str, seq: int, at: float) -> None:
        key = (channel, seq)
        if key in self.delivered:
            self.duplicates += 1
            return
        self.delivered[key] = at
        self.max_seq = max(self.max_seq, seq)

    def add_resync(
        self, channel: str, at: float, since: float | None = None, degraded: bool = False
    ) -> None:
        self.resyncs.setdefault(channel, []).append((at, since))
        if degraded:
            self.degraded.setdefault(channel, []).append(at)

    def degraded_count(self) -> int:
        return sum(len(times) for times in self.degraded.values())

    def resync_times(self) -> list[float]:
        return sorted(at for times in self.resyncs.values() for at, _ in times)

    def resync_count(self) -> int:
        return sum(len(times) for times in self.resyncs.values())


@dataclass
class Fault:
    """One injected fault and the live view of its recovery."""

    kind: str
    detail: str
    started: float
    healed: float
    #: The first sequence number whose publish started after ``healed``.
    heal_seq: int
    recovered: bool = False
    #: When the injector saw every subscriber hear again: a fault-free stretch begins.
    recovered_at: float | None = None
    #: Filled in afterwards from the records (see :func:`recovery_times`).
    recovery: float | None = None


@dataclass
class AgentVerdict:
    name: str
    expected: int = 0
    delivered: int = 0
    covered_by_resync: int = 0
    missing: list[tuple[str, int]] = field(default_factory=list)
    #: The longest window a resync covered (received_at minus since, plus the margin).
    widest_window: float = 0.0


def covers(resync: tuple[float, float | None], publish: Publish, margin: float) -> bool:
    """Whether a resync excuses the loss of ``publish``: the bounded resync window.

    A resync received at ``at``, whose subscriber last proved that it heard at ``since``,
    covers the messages that could have been in flight on the lost connection: those whose
    publish returned after ``since - margin`` (the server had them after the subscriber's
    last proof) and started before ``at`` (the new connection's LISTEN/SUBSCRIBE was
    confirmed before the resync was queued). ``margin`` allows for a message the server had
    taken but not yet passed on when the subscriber last read.
    """
    at, since = resync
    return publish.started < at and (since is None or publish.ended > since - margin)


def check_invariant(publishes: list[Publish], agent: AgentLog, margin: float) -> AgentVerdict:
    """Every succeeded publish after ``agent`` subscribed: delivered, or inside a resync window."""
    verdict = AgentVerdict(agent.name)
    if agent.subscribed_at is None:
        return verdict
    resyncs = {
        channel: sorted(times, key=lambda resync: resync[0])
        for channel, times in agent.resyncs.items()
    }
    arrivals = {channel: [at for at, _ in times] for channel, times in resyncs.items()}
    for times in resyncs.values():
        for at, since in times:
            if since is not None:
                verdict.widest_window = max(verdict.widest_window, at - since + margin)
    for publish in publishes:
        if not publish.ok or publish.started < agent.subscribed_at or publish.group is not None:
            continue
        verdict.expected += 1
        if (publish.channel, publish.seq) in agent.delivered:
            verdict.delivered += 1
            continue
        times = resyncs.get(publish.channel, [])
        # Only resyncs received after the publish started can cover it.
        later = times[bisect.bisect_right(arrivals.get(publish.channel, []), publish.started) :]
        if any(covers(resync, publish, margin) for resync in later):
            verdict.covered_by_resync += 1
        else:
            verdict.missing.append((publish.channel, publish.seq))
    return verdict


@dataclass
class QuietVerdict:
    """The fault-free stretches: every message delivered, no resync at all."""

    expected: int = 0
    delivered: int = 0
    missing: list[tuple[str, str, int]] = field(default_factory=list)
    #: (subscriber, channel, received_at) of each resync received inside a stretch.
    resyncs: list[tuple[str, str, float]] = field(default_factory=list)


def check_quiet(
    publishes: list[Publish],
    agents: list[AgentLog],
    stretches: list[tuple[float, float]],
    margin: float,
) -> QuietVerdict:
    """Inside each (start, end) stretch no fault is going on, so nothing may be lost.

    A message counts when its publish succeeded, started at or after ``start`` and returned
    ``margin`` before ``end`` (the next fault may take one still on its way). A resync for a
    loss that began in a stretch is a failure of its own: nothing was broken.
    """
    verdict = QuietVerdict()
    for start, end in stretches:
        inside = [
            p
            for p in publishes
            if p.ok and p.group is None and p.started >= start and p.ended <= end - margin
        ]
        for agent in agents:
            if agent.subscribed_at is None:
                continue
            for publish in inside:
                if publish.started < agent.subscribed_at:
                    continue
                verdict.expected += 1
                if (publish.channel, publish.seq) in agent.delivered:
                    verdict.delivered += 1
                else:
                    verdict.missing.append((agent.name, publish.channel, publish.seq))
            for channel, times in agent.resyncs.items():
                # A resync whose loss began inside the stretch: the subscriber lost its
                # connection (or queue room) while nothing was broken. One that arrives in the
                # stretch for a loss that began in the fault before it is that fault's.
                verdict.resyncs.extend(
                    (agent.name, channel, at)
                    for at, since in times
                    if start <= at <= end and (since is None or since >= start)
                )
    return verdict


def delivered_despite_failure(publishes: list[Publish], agent: AgentLog) -> int:
    """Messages whose publish raised but that arrived anyway: a timeout after the server got it.

    Not a violation (the publisher was told "maybe"), but worth seeing in the report.
    """
    return sum(1 for p in publishes if not p.ok and (p.channel, p.seq) in agent.delivered)


class _FirstArrival:
    """For a sequence number n, the earliest arrival of any message numbered n or later."""

    def __init__(self, agent: AgentLog) -> None:
        pairs = sorted((seq, at) for (_, seq), at in agent.delivered.items())
        self.seqs = [seq for seq, _ in pairs]
        self.suffix_min = [at for _, at in pairs]
        for i in range(len(pairs) - 2, -1, -1):
            self.suffix_min[i] = min(self.suffix_min[i], self.suffix_min[i + 1])

    def at_or_after(self, seq: int) -> float | None:
        i = bisect.bisect_left(self.seqs, seq)
        return self.suffix_min[i] if i < len(self.seqs) else None


def recovery_times(faults: list[Fault], agents: list[AgentLog]) -> None:
    """Fill ``Fault.recovery``: healed until the last subscriber got a message sent after it."""
    arrivals = [_FirstArrival(agent) for agent in agents if agent.subscribed_at is not None]
    for fault in faults:
        firsts = [arrival.at_or_after(fault.heal_seq) for arrival in arrivals]
        if not fault.recovered or any(first is None for first in firsts):
            fault.recovery = None
            continue
        fault.recovery = max(0.0, max(f for f in firsts if f is not None) - fault.healed)


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize_recovery(faults: list[Fault]) -> dict[str, Any]:
    times = [f.recovery for f in faults if f.recovery is not None]
    by_kind: dict[str, dict[str, Any]] = {}
    for fault in faults:
        entry = by_kind.setdefault(fault.kind, {"count": 0, "unrecovered": 0, "max": None})
        entry["count"] += 1
        if fault.recovery is None:
            entry["unrecovered"] += 1
        else:
            entry["max"] = max(entry["max"] or 0.0, fault.recovery)
    return {
        "p50": percentile(times, 50),
        "p99": percentile(times, 99),
        "max": max(times) if times else None,
        "by_kind": by_kind,
    }


def leaking_lines(texts: list[str], secrets: list[str]) -> list[str]:
    """The lines of ``texts`` that contain any of ``secrets`` (empty secrets are ignored)."""
    secrets = [s for s in secrets if s]
    found = []
    for text in texts:
        for line in text.splitlines():
            if any(secret in line for secret in secrets):
                found.append(line)
    return found
