"""The figures of a run: a table for people, verdicts for the test."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from .scenarios import Outcome, Report

#: The targets of issue #5.
LATENCY_RATIO = 1.25
CANCEL_SECONDS = 1.0


@dataclass
class Verdict:
    name: str
    ok: bool
    figure: str


#: Idle integrated workers' transactions against stock's on the pulpcore type: stock's are
#: heartbeats; the integrated ones add a safety look per worker per WORKER_TTL (two
#: transactions each), so a short window holds up to about twice as many.
IDLE_RATIO = 2


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def table(report: Report) -> str:
    rows = [
        (
            "scenario",
            "workers",
            "worker DB path",
            "tasks done",
            "created->started p50",
            "p95",
            "cancel",
            "idle xact/s",
            "NOTIFYs on PG",
        )
    ]
    for outcome in report.outcomes.values():
        waits = outcome.waits("latency") or outcome.waits()
        rows.append(
            (
                outcome.name,
                str(outcome.workers),
                outcome.db_path,
                f"{outcome.finished}/{len(outcome.tasks)}" if outcome.tasks else "-",
                _ms(_p(waits, 50)),
                _ms(_p(waits, 95)),
                _cancel(outcome),
                "-" if outcome.idle_rate is None else f"{outcome.idle_rate:.2f}",
                "-"
                if outcome.stray_notifies is None
                else str(sum(outcome.stray_notifies.values())),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _cancel(outcome: Outcome) -> str:
    if outcome.cancel is None:
        return "-"
    if outcome.cancel.get("latency") is None:
        if outcome.cancel.get("state") == "canceling":
            return "not reached in 10 s"
        return f"task never ran ({outcome.cancel.get('state')})"
    return f"{_ms(outcome.cancel['latency'])} ({outcome.cancel['state']})"


def verdicts(report: Report) -> list[Verdict]:
    out: list[Verdict] = []
    failed = [name for name, c in report.contract.items() if not c["ok"]]
    if "contract" in report.config.scenarios:  # a run of other scenarios only has no verdict
        out.append(
            Verdict(
                "worker contract on pulpcore's classes",
                bool(report.contract) and not failed,
                f"{len(report.contract) - len(failed)}/{len(report.contract)} checks"
                + (f"; failed: {failed}" if failed else ""),
            )
        )
    out += operator_verdicts(report)
    out += nats_outage_verdicts(report)
    out += failure_verdicts(report)
    stock, ours = report.outcomes.get("stock_direct"), report.outcomes.get("pubsub_redis")
    if ours is not None:
        out.append(
            Verdict(
                "pubsub-redis: every task starts and finishes",
                bool(ours.tasks) and ours.finished == len(ours.tasks),
                f"{ours.finished}/{len(ours.tasks)}",
            )
        )
        latency = ours.cancel_latency
        out.append(
            Verdict(
                f"pubsub-redis: cancel reaches its running task within {CANCEL_SECONDS:.0f} s",
                latency is not None and latency < CANCEL_SECONDS,
                _cancel(ours),
            )
        )
        waiting = ours.cancel_waiting or {}
        out.append(
            Verdict(
                "pubsub-redis: cancel of a queued task",
                waiting.get("second") == "canceled",
                str(waiting),
            )
        )
        stray = sum((ours.stray_notifies or {}).values())
        out.append(Verdict("pubsub-redis: no NOTIFY reaches PostgreSQL", stray == 0, str(stray)))
    if ours is not None and stock is not None:
        ratio = latency_ratio(report)
        out.append(
            Verdict(
                f"pubsub-redis: created->started p50 <= {LATENCY_RATIO} x stock-direct",
                ratio is not None and ratio <= LATENCY_RATIO,
                f"{_ms(ours.p50())} vs {_ms(stock.p50())}: ratio "
                + ("-" if ratio is None else f"{ratio:.2f}"),
            )
        )
        out.append(
            Verdict(
                f"pubsub-redis: idle DB xact/s at the heartbeat level (<= {IDLE_RATIO} x "
                "stock-direct: heartbeats, and a safety look per worker per WORKER_TTL)",
                ours.idle_rate is not None
                and stock.idle_rate is not None
                and ours.idle_rate <= IDLE_RATIO * stock.idle_rate,
                f"{_rate(ours)} vs {_rate(stock)}",
            )
        )
    for name, what in (("mixed", "stock and PostgreSQL-backend"), ("rollout", "bridge")):
        mixed = report.outcomes.get(name)
        if mixed is not None:
            cancels = [note for note in mixed.notes if note.startswith("cancel")]
            out.append(
                Verdict(
                    f"{name} fleet ({what}): every task starts and finishes, cancels arrive",
                    bool(mixed.tasks)
                    and mixed.finished == len(mixed.tasks)
                    and (mixed.cancel or {}).get("state") == "canceled"
                    and all(note.endswith("canceled") for note in cancels),
                    f"{mixed.finished}/{len(mixed.tasks)}; ran on {mixed.workers_used}"
                    + (f"; {'; '.join(cancels)}" if cancels else ""),
                )
            )
    from .redistype import redis_type_verdicts
    from .relayfleet import relay_verdicts
    from .zkfleet import zookeeper_verdicts

    out += relay_verdicts(report)
    out += redis_type_verdicts(report)
    out += zookeeper_verdicts(report)
    return out


def operator_verdicts(report: Report) -> list[Verdict]:
    op = report.operator
    if op is None:
        return []
    out = [
        Verdict(
            "operator: admin commands exit 0 with the integration on",
            bool(op.admin) and not any(op.admin.values()) and op.ping == 0,
            ", ".join(f"{k} {v}" for k, v in op.admin.items())
            + f", pubsub_ping --expect-subscribers {op.ping}"
            + (f"; {op.problems}" if op.problems else ""),
        ),
        Verdict(
            "operator: pulpcore-api and pulpcore-content serve (PULP_* environment only)",
            bool(op.serving) and all(op.serving.values()),
            str(op.serving),
        ),
    ]
    rest = op.rest_cancel or {}
    out.append(
        Verdict(
            f"operator: PATCH cancel of a running task within {CANCEL_SECONDS:.0f} s",
            rest.get("http") == 200
            and rest.get("state") == "canceled"
            and rest.get("latency") is not None
            and rest["latency"] < CANCEL_SECONDS,
            f"HTTP {rest.get('http')} (answered in {_ms(rest.get('http_seconds'))}), "
            f"{rest.get('state')} {_ms(rest.get('latency'))} after the request",
        )
    )
    forged = op.forged_cancel or {}
    out.append(
        Verdict(
            "operator: a forged cancel on Redis leaves the task running",
            forged.get("receivers", 0) > 0
            and forged.get("refused") is True
            and forged.get("state") == "completed",
            f"heard by {forged.get('receivers')} worker(s), refused by the one running it; "
            f"task {forged.get('state')}",
        )
    )
    out.append(outage_verdict(op, "Redis"))
    return out


def outage_verdict(op: Any, server: str) -> Verdict:
    """The pub/sub server down: every task dispatched meanwhile starts, a cancel lands."""
    outage = op.outage or {}
    delays = outage.get("start_delays") or []
    p50 = statistics.median(delays) if delays else None
    cancel = outage.get("cancel") or {}
    return Verdict(
        f"operator: {server} down, the API accepts every task and each starts during the "
        "outage (degraded mode)",
        bool(outage)
        and outage["accepted"] == outage["requests"]
        and outage["completed"] == outage["requests"]
        and outage.get("started_during") == outage["requests"]
        and op.serving.get("after_outage", False)
        and cancel.get("state") == "canceled"
        and cancel.get("during") is True,
        f"down {outage.get('seconds_down', 0):.0f} s: {outage.get('accepted')}/"
        f"{outage.get('requests')} accepted, {outage.get('started_during')} started during "
        f"it (dispatch to start p50 {_ms(p50)}, largest "
        f"{_ms(max(delays, default=None))}; one at a time: orphan cleanup's lock), "
        f"{outage.get('completed')} completed; a running task's PATCH cancel during it: "
        f"{cancel.get('state')} {_ms(cancel.get('latency'))} after the request",
    )


def nats_outage_verdicts(report: Report) -> list[Verdict]:
    """The same outage on the nats backend (the ``operator_nats`` scenario), when run."""
    op = report.operator_nats
    return [] if op is None else [outage_verdict(op, "NATS")]


def failure_verdicts(report: Report) -> list[Verdict]:
    """The pooler and fail-closed scenarios (:mod:`.failures`)."""
    out = []
    pooler = report.pooler
    if pooler is not None:
        hear = pooler.hear or {}
        seconds = pooler.seconds_to_error
        out.append(
            Verdict(
                "pooler: the PostgreSQL backend behind PgBouncer fails loudly, not silently",
                seconds is not None
                and pooler.names_pooler
                and pooler.names_pubsub_url
                and pooler.ping not in (None, 0)
                and "PUBSUB_URL" in pooler.ping_says
                and hear.get("heard") == 0
                and hear.get("deaf") is True
                and pooler.worker_alive
                and pooler.api_serves,
                f"worker log names the pooler and PUBSUB_URL "
                f"{'-' if seconds is None else f'{seconds:.1f} s'} after pulpcore-worker started; "
                f"pubsub_ping --expect-subscribers 1 exits {pooler.ping}; a subscriber heard "
                f"{hear.get('heard')} of {hear.get('sent')} direct pg_notify and was found deaf "
                f"in {_seconds(hear.get('deaf_after'))}",
            )
        )
    closed = report.fail_closed
    if closed is not None:
        refused = closed.refused
        stock = closed.postgres_worker
        out.append(
            Verdict(
                "fail closed: a moved seam on Redis: worker, API and content refuse to start",
                len(refused) == 3
                and all(
                    r["exit"] not in (None, 0) and r["refuses"] and r["way_out"]
                    for r in refused.values()
                )
                and closed.check not in (None, 0)
                and closed.check_names_seam,
                ", ".join(
                    f"{name} exit {r['exit']}"
                    + ("" if r["refuses"] and r["way_out"] else " (no refusal or way out shown)")
                    for name, r in refused.items()
                )
                + f"; pulpcore-manager check exits {closed.check}",
            )
        )
        out.append(
            Verdict(
                "fail closed: on PostgreSQL the worker runs stock Pulp with a WARNING",
                bool(stock.get("running")) and bool(stock.get("warning")),
                f"running {stock.get('running')}, WARNING {stock.get('warning')}",
            )
        )
    return out


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _rate(outcome: Outcome) -> str:
    rate = outcome.idle_rate
    return (
        "-"
        if rate is None
        else f"{rate:.2f}/s ({outcome.idle_xacts} in {outcome.idle_seconds:.0f} s)"
    )


def latency_ratio(report: Report) -> float | None:
    stock, ours = report.outcomes.get("stock_direct"), report.outcomes.get("pubsub_redis")
    if stock is None or ours is None:
        return None
    a, b = ours.p50(), stock.p50()
    return None if a is None or not b else a / b


def contrast(report: Report) -> list[str]:
    """What goes wrong for stock pulpcore behind PgBouncer, in numbers."""
    outcome = report.outcomes.get("stock_pgbouncer")
    if outcome is None:
        return []
    lines = [
        f"stock-pgbouncer: {outcome.started} of {len(outcome.tasks)} tasks started, "
        f"{outcome.finished} finished ({'; '.join(outcome.notes)})",
    ]
    if outcome.cancel is not None:
        lines.append(f"stock-pgbouncer: cancel {_cancel(outcome)}")
    return lines


def as_dict(report: Report) -> dict[str, Any]:
    return {
        "pulpcore": report.pulpcore,
        "config": {k: str(v) for k, v in vars(report.config).items()},
        "operator": None if report.operator is None else vars(report.operator),
        "operator_nats": None if report.operator_nats is None else vars(report.operator_nats),
        "pooler": None if report.pooler is None else vars(report.pooler),
        "fail_closed": None if report.fail_closed is None else vars(report.fail_closed),
        "seconds": report.seconds,
        "total_seconds": report.total_seconds,
        "contract": report.contract,
        "outcomes": {
            name: {
                "description": o.description,
                "workers": o.workers,
                "db_path": o.db_path,
                "tasks": len(o.tasks),
                "started": o.started,
                "finished": o.finished,
                "wait_p50": o.p50(),
                "wait_p95": _p(o.waits("latency"), 95),
                "waits": {p: o.waits(p) for p in ("warmup", "latency", "async", "burst")},
                "cancel": o.cancel,
                "cancel_waiting": o.cancel_waiting,
                "idle_xacts": o.idle_xacts,
                "idle_seconds": o.idle_seconds,
                "idle_rate": o.idle_rate,
                "stray_notifies": o.stray_notifies,
                "workers_used": o.workers_used,
                "integration": o.integration,
                "notes": o.notes,
                "faults": o.faults,
            }
            for name, o in report.outcomes.items()
        },
        "latency_ratio": latency_ratio(report),
        "verdicts": [vars(v) for v in verdicts(report)],
    }


#: The top-level figures of the JSON each scenario writes, besides its outcomes.
_SCENARIO_KEYS = {
    "contract": ("contract",),
    "operator": ("operator",),
    "pooler": ("pooler",),
    "fail_closed": ("fail_closed",),
    "head_to_head": ("latency_ratio",),
}


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` (a run's JSON) with the scenarios of ``new`` put in: one scenario run again,
    or one added, without running the rest.

    Both must come from the same pulpcore release. What ``new`` ran replaces what ``old``
    has of it (outcomes, verdicts of the same name, seconds, the scenario's own figures);
    everything else of ``old`` stays. Neither argument is changed.
    """
    if old.get("pulpcore") != new.get("pulpcore"):
        raise ValueError(
            f"cannot merge a run of pulpcore {new.get('pulpcore')} into one of "
            f"{old.get('pulpcore')}: run every scenario again"
        )
    ran = _scenarios(new)
    out = json.loads(json.dumps(old))
    out["outcomes"].update(new["outcomes"])
    for name in ran:
        for key in _SCENARIO_KEYS.get(name, ()):
            out[key] = new.get(key)
        if name in new["seconds"]:
            out["seconds"][name] = new["seconds"][name]
    replaced = {v["name"] for v in new["verdicts"]}
    out["verdicts"] = [v for v in out["verdicts"] if v["name"] not in replaced]
    out["verdicts"] += new["verdicts"]
    out["merged_scenarios"] = [
        *(s for s in old.get("merged_scenarios", []) if s not in ran),
        *ran,
    ]
    return out


def _scenarios(run: dict[str, Any]) -> list[str]:
    """The scenarios a run's JSON says it ran (its config holds the tuple as text)."""
    text = str(run.get("config", {}).get("scenarios", ""))
    return [name.strip(" '\"") for name in text.strip("()").split(",") if name.strip(" '\"")]
