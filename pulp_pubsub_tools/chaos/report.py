"""The verdict of a chaos run: its figures, whether it passed, and how to print it."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .invariant import (
    AgentLog,
    Fault,
    Publish,
    QuietVerdict,
    check_invariant,
    check_quiet,
    delivered_despite_failure,
    leaking_lines,
    recovery_times,
    summarize_recovery,
)
from .phases import check_outage, check_targeted

if TYPE_CHECKING:
    from .engine import ChaosConfig

MISSING_LISTED = 2000
MISSING_SHOWN = 20


def _quiet(part: dict[str, Any], name: str) -> str:
    if not part:
        return f"{name} -"
    delivered, expected = part["delivered"], part["expected"]
    share = f"{delivered / expected:.1%}" if expected else "-"
    return f"{name} {delivered}/{expected} delivered ({share}), {len(part['resyncs'])} resyncs"


def _quiet_part(verdict: QuietVerdict, stretches: list[tuple[float, float]]) -> dict[str, Any]:
    return {
        "stretches": len(stretches),
        "seconds": round(sum(min(end, start + 1e6) - start for start, end in stretches), 3),
        "expected": verdict.expected,
        "delivered": verdict.delivered,
        "missing": [list(m) for m in verdict.missing[:MISSING_LISTED]],
        "resyncs": [list(r) for r in verdict.resyncs[:MISSING_LISTED]],
    }


@dataclass
class ChaosReport:
    backend: str
    seconds: float
    subscribers: int
    channels: int
    rate: float
    seed: int | None
    faults: int
    faults_by_kind: dict[str, dict[str, Any]]
    published: int
    publish_failed: int
    publish_max_seconds: float
    publish_limit: float
    #: Publishes slower than ``publish_limit``, or that raised a non-PubSubError.
    hung_publishes: int
    foreign_publish_errors: int
    #: Failed publishes by exception type: PublishError is the only one the contract allows.
    publish_errors: dict[str, int]
    #: Messages each subscriber had to get (summed over subscribers), and how they were met.
    expected: int
    delivered: int
    covered_by_resync: int
    missing: int
    duplicates: int
    unexpected_payloads: int
    delivered_after_publish_error: int
    resyncs: int
    reconnects: int
    stuck: list[str]
    unrecovered_faults: int
    recovery_p50: float | None
    recovery_p99: float | None
    recovery_max: float | None
    leaks: int
    agent_failures: list[str]
    notes: list[str] = field(default_factory=list)
    missing_examples: list[str] = field(default_factory=list)
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    workdir: str = ""
    #: The bounded resync window (see invariant.covers): its margin and the widest one used.
    resync_margin: float = 0.0
    widest_resync_window: float = 0.0
    #: Fault-free stretches between faults, and the final fault-free phase: expected,
    #: delivered, missing and resyncs received (both must be 0), and their count/length.
    quiet_between: dict[str, Any] = field(default_factory=dict)
    quiet_final: dict[str, Any] = field(default_factory=dict)
    #: The mutation the run was broken with, if any, and how many messages it dropped.
    mutation: str | None = None
    dropped_by_mutation: int = 0
    dropped_messages: list[str] = field(default_factory=list)
    #: Every missing message, "subscriber:channel#seq" (at most MISSING_LISTED of them).
    missing_messages: list[str] = field(default_factory=list)
    publish_path: str = ""
    #: Resyncs delivered while the subscriber said it was degraded (part of ``resyncs``).
    degraded_resyncs: int = 0
    #: Resyncs the subscribers' backends counted for publishes waiting to be stored (part
    #: of ``resyncs`` unless folded into another one waiting; NATS with JetStream).
    unstored_resyncs: int = 0
    #: Messages the subscribers' backends delivered before the stream stored them, sent
    #: along by a publisher waiting to store them (part of ``delivered``; NATS JetStream).
    unstored_deliveries: int = 0
    #: Targeted traffic's verdict (see chaos.phases); empty when the run had none.
    targeted: dict[str, Any] = field(default_factory=dict)
    #: The outage phase's verdict (see chaos.phases); empty when the run had none.
    outage: dict[str, Any] = field(default_factory=dict)

    @property
    def quiet_failures(self) -> int:
        return sum(
            len(part.get("missing", [])) + len(part.get("resyncs", []))
            for part in (self.quiet_between, self.quiet_final)
        )

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.quiet_failures
            or not self.quiet_final.get("expected")
            or self.stuck
            or self.unrecovered_faults
            or self.hung_publishes
            or self.leaks
            or self.agent_failures
            or self.unexpected_payloads
            or self.published == 0
            or set(self.publish_errors) - {"PublishError"}
            or self.targeted.get("failures")
            or (self.outage and not self.outage.get("ok"))
        )

    @property
    def share_covered(self) -> float:
        return self.covered_by_resync / self.expected if self.expected else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "share_covered": self.share_covered}

    def format(self) -> str:
        def secs(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        kinds = ", ".join(
            f"{kind} {entry['count']}"
            + (f" ({entry['unrecovered']} unrecovered)" if entry["unrecovered"] else "")
            for kind, entry in self.faults_by_kind.items()
        )
        errors = ", ".join(f"{n} {kind}" for kind, n in self.publish_errors.items()) or "none"
        lines = [
            f"chaos run on {self.backend}: {'PASSED' if self.ok else 'FAILED'}",
            f"  {self.seconds:.0f} s, {self.subscribers} subscribers, {self.channels} channels, "
            f"{self.rate:g} messages/s, seed {self.seed}"
            + (f", publishing through {self.publish_path}" if self.publish_path else ""),
            f"  faults injected:     {self.faults} ({kinds})",
            f"  messages published:  {self.published} ({self.publish_failed} publishes failed: "
            f"{errors}; slowest publish {self.publish_max_seconds:.2f} s, "
            f"limit {self.publish_limit:.1f} s, {self.hung_publishes} over it)",
            f"  messages delivered:  {self.delivered} of {self.expected} owed "
            f"({self.covered_by_resync} covered by a later resync, {self.missing} missing"
            + (
                f"; {self.unstored_deliveries} sent along by a publisher waiting to store)"
                if self.unstored_deliveries
                else ")"
            ),
            f"  resync windows:      margin {self.resync_margin:g} s, widest "
            f"{self.widest_resync_window:.2f} s; {self.share_covered:.1%} of the owed messages "
            "covered by a resync",
            f"  fault-free:          {_quiet(self.quiet_between, 'between faults')}; "
            f"{_quiet(self.quiet_final, 'final phase')}",
            f"  resyncs received:    {self.resyncs} (after {self.reconnects} reconnects"
            + (
                f"; {self.unstored_resyncs} asked for by a publisher waiting to store)"
                if self.unstored_resyncs
                else ")"
            ),
            f"  stuck subscribers:   {len(self.stuck)}" + (f" {self.stuck}" if self.stuck else ""),
            f"  recovery time:       p50 {secs(self.recovery_p50)}, p99 {secs(self.recovery_p99)}, "
            f"max {secs(self.recovery_max)} ({self.unrecovered_faults} unrecovered)",
            f"  password in output:  {self.leaks} lines",
        ]
        if self.targeted:
            t = self.targeted
            lines.append(
                f"  targeted:            {t['delivered']} of {t['expected']} reached a member "
                f"({t['covered_by_resync']} covered by a resync, {len(t['missing'])} missing, "
                f"{len(t['late'])} late, {len(t['lost_while_fault_free'])} lost while "
                f"fault-free; {t['redelivered']} handed to two members; slowest "
                f"{secs(t['worst_latency'])})"
            )
        if self.outage:
            o = self.outage
            lines.append(
                f"  outage:              down {o['seconds']:.1f} s, {o['degraded_agents']}/"
                f"{o['agents']} subscribers degraded, fewest resyncs on a channel "
                f"{o['fewest_resyncs']} (at least {o['at_least']}), first after "
                f"{o['first_wait']:.2f} s (limit {o['first_limit']:.1f} s), widest gap "
                f"{o['widest_gap']:.2f} s (limit {o['gap_limit']:.1f} s)"
                + (f"; short: {', '.join(o['short'][:MISSING_SHOWN])}" if o["short"] else "")
            )
        if self.duplicates or self.delivered_after_publish_error:
            lines.append(
                f"  also: {self.duplicates} duplicate deliveries, "
                f"{self.delivered_after_publish_error} messages arrived although their "
                "publish raised (it timed out after the server had it)"
            )
        if self.mutation:
            lines.append(
                f"  mutation:            {self.mutation}, {self.dropped_by_mutation} dropped"
            )
        if self.missing_messages:
            shown = self.missing_messages[:MISSING_SHOWN]
            more = len(self.missing_messages) - len(shown)
            lines.append(
                f"  missing:             {', '.join(shown)}" + (f" and {more} more" if more else "")
            )
        for part, name in ((self.quiet_between, "between faults"), (self.quiet_final, "final")):
            for agent, channel, seq in part.get("missing", [])[:MISSING_SHOWN]:
                lines.append(f"  lost while fault-free ({name}): {agent}:{channel}#{seq}")
            for agent, channel, at in part.get("resyncs", [])[:MISSING_SHOWN]:
                lines.append(
                    f"  resync while fault-free ({name}): {agent} on {channel} at {at:.3f}"
                )
        for failure in self.agent_failures:
            lines.append(f"  subscriber failure: {failure}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.workdir:
            lines.append(f"  logs and report.json: {self.workdir}")
        return "\n".join(lines)


def build_report(
    *,
    config: ChaosConfig,
    kinds: tuple[str, ...],
    publishes: list[Publish],
    agents: list[AgentLog],
    faults: list[Fault],
    elapsed: float,
    texts: list[str],
    secrets: list[str],
    notes: list[str],
    workdir: str,
    publish_limit: float,
    final_seq: int | None,
    quiet_start: float | None = None,
    publish_path: str = "",
    channels: list[str] | None = None,
    outage: tuple[float, float] | None = None,
) -> ChaosReport:
    margin = config.resync_margin
    verdicts = [check_invariant(publishes, agent, margin) for agent in agents]
    between = [
        (fault.recovered_at, after.started)
        for fault, after in itertools.pairwise(faults)
        if fault.recovered_at is not None and after.started > fault.recovered_at
    ]
    ends = [p.ended for p in publishes]
    final = [] if quiet_start is None else [(quiet_start, max(ends, default=quiet_start) + margin)]
    quiet_between = check_quiet(publishes, agents, between, margin)
    quiet_final = check_quiet(publishes, agents, final, margin)
    targeted = None
    if any(p.group is not None for p in publishes):
        claim = float(config.options.get("claim_timeout", 4.0))
        windows = [(fault.started, fault.healed) for fault in faults]
        targeted = check_targeted(publishes, agents, margin, claim, between + final, windows)
    checked_outage = None
    if outage is not None:
        interval = float(config.options.get("outage_interval", 5.0))
        opening = float(config.options.get("connect_timeout", 0.0))
        checked_outage = check_outage(
            agents, channels or [], *outage, interval, config.detection, opening
        )
    recovery_times(faults, agents)
    recovery = summarize_recovery(faults)
    by_kind = {
        kind: recovery["by_kind"].get(kind, {"count": 0, "unrecovered": 0, "max": None})
        for kind in kinds
    }
    durations = [p.ended - p.started for p in publishes]
    stuck = []
    failures = []
    for agent in agents:
        if (
            agent.subscribed_at is None
            or final_seq is None
            or agent.max_seq < final_seq
            or agent.close_hung
            or agent.exit_code not in (0, None)
        ):
            stuck.append(agent.name)
        if agent.errors or agent.close_hung or agent.exit_code not in (0, None):
            failures.append(
                f"{agent.name}: exit {agent.exit_code}, close hung {agent.close_hung}, "
                f"errors {agent.errors[:3]}"
            )
    missing = [
        f"{verdict.name}:{channel}#{seq}"
        for verdict in verdicts
        for channel, seq in verdict.missing
    ]
    return ChaosReport(
        backend=config.backend,
        seconds=elapsed,
        subscribers=config.subscribers,
        channels=config.channels,
        rate=config.rate,
        seed=config.seed,
        faults=len(faults),
        faults_by_kind=by_kind,
        published=sum(1 for p in publishes if p.ok),
        publish_failed=sum(1 for p in publishes if not p.ok),
        publish_max_seconds=max(durations, default=0.0),
        publish_limit=publish_limit,
        hung_publishes=sum(
            1 for p in publishes if p.ended - p.started > publish_limit or p.foreign
        ),
        foreign_publish_errors=sum(1 for p in publishes if p.foreign),
        publish_errors=dict(Counter(p.error.partition(":")[0] for p in publishes if p.error)),
        expected=sum(v.expected for v in verdicts),
        delivered=sum(v.delivered for v in verdicts),
        covered_by_resync=sum(v.covered_by_resync for v in verdicts),
        missing=len(missing),
        duplicates=sum(agent.duplicates for agent in agents),
        unexpected_payloads=sum(len(agent.unexpected) for agent in agents),
        delivered_after_publish_error=sum(
            delivered_despite_failure(publishes, agent) for agent in agents
        ),
        resyncs=sum(agent.resync_count() for agent in agents),
        degraded_resyncs=sum(agent.degraded_count() for agent in agents),
        unstored_resyncs=sum(agent.stats.get("unstored_resyncs", 0) for agent in agents),
        unstored_deliveries=sum(agent.stats.get("unstored_deliveries", 0) for agent in agents),
        targeted={} if targeted is None else targeted.as_dict(),
        outage={} if checked_outage is None else checked_outage.as_dict(),
        reconnects=sum(agent.stats.get("reconnects", 0) for agent in agents),
        stuck=stuck,
        unrecovered_faults=sum(1 for f in faults if f.recovery is None),
        recovery_p50=recovery["p50"],
        recovery_p99=recovery["p99"],
        recovery_max=recovery["max"],
        leaks=len(leaking_lines(texts, secrets)),
        agent_failures=failures,
        notes=notes + _publish_error_notes(publishes),
        missing_examples=missing[:10],
        missing_messages=missing[:MISSING_LISTED],
        resync_margin=margin,
        widest_resync_window=max((v.widest_window for v in verdicts), default=0.0),
        quiet_between=_quiet_part(quiet_between, between),
        quiet_final=_quiet_part(quiet_final, final),
        mutation=config.mutation,
        publish_path=publish_path,
        dropped_by_mutation=sum(len(agent.dropped) for agent in agents),
        dropped_messages=sorted(
            f"{agent.name}:{channel}#{seq}" for agent in agents for channel, seq in agent.dropped
        )[:MISSING_LISTED],
        fault_log=[
            {
                "kind": f.kind,
                "detail": f.detail,
                "seconds": round(f.healed - f.started, 3),
                "recovery": None if f.recovery is None else round(f.recovery, 3),
            }
            for f in faults
        ],
        workdir=workdir,
    )


def _publish_error_notes(publishes: list[Any]) -> list[str]:
    """The most frequent publish errors, worded: a run that fails for them says why."""
    errors = Counter(p.error for p in publishes if p.error)
    return [f"publish error x{n}: {text}" for text, n in errors.most_common(3)]
