"""The end-to-end figures in the docs, generated from the committed JSON of a run.

``python -m pulp_pubsub_tools.e2e.docs docs/e2e-3.105.json docs/e2e-3.123.json``
rewrites the part of ``docs/pulp.md`` between the markers below;
``--check`` only says whether they are up to date (the test suite runs that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

START = "<!-- e2e figures: start (generated from docs/e2e-*.json by e2e.docs) -->"
END = "<!-- e2e figures: end -->"
DOCS = ("docs/pulp.md",)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _cancel(cancel: dict[str, Any] | None) -> str:
    if not cancel:
        return "-"
    if cancel.get("latency") is None:
        return "not reached" if cancel.get("state") == "canceling" else str(cancel.get("state"))
    return f"{_ms(cancel['latency'])} ({cancel.get('state')})"


def _waits(o: dict[str, Any]) -> tuple[float | None, float | None]:
    """p50 and p95 of the latency tasks, or of every task where there were none (as the
    run's own table does)."""
    if o["wait_p50"] is not None:
        return o["wait_p50"], o["wait_p95"]
    waits = sorted(w for phase in o["waits"].values() for w in phase)
    if not waits:
        return None, None
    if len(waits) == 1:
        return waits[0], waits[0]
    return statistics.median(waits), statistics.quantiles(waits, n=100, method="inclusive")[94]


def render(runs: list[dict[str, Any]]) -> str:
    """Markdown for the runs, newest series last."""
    head = (
        "| pulpcore | scenario | worker DB path | tasks done | created->started p50 | p95 "
        "| cancel | idle xact/s | NOTIFYs on PG |"
    )
    lines = [head, "|" + "---|" * 9]
    for run in runs:
        for name, o in run["outcomes"].items():
            tasks = f"{o['finished']}/{o['tasks']}" if o["tasks"] else "-"
            idle = "-" if o["idle_rate"] is None else f"{o['idle_rate']:.2f}"
            stray = "-" if o["stray_notifies"] is None else str(sum(o["stray_notifies"].values()))
            p50, p95 = _waits(o)
            lines.append(
                f"| {run['pulpcore']} | {name} | {o['db_path']} | {tasks} | "
                f"{_ms(p50)} | {_ms(p95)} | {_cancel(o['cancel'])} | "
                f"{idle} | {stray} |"
            )
    lines += ["", "| pulpcore | check | result | figure |", "|---|---|---|---|"]
    for run in runs:
        for verdict in run["verdicts"]:
            figure = str(verdict["figure"]).replace("|", "\\|")
            ok = "pass" if verdict["ok"] else "**FAIL**"
            lines.append(f"| {run['pulpcore']} | {verdict['name']} | {ok} | {figure} |")
    return "\n".join(lines)


def load(paths: list[Path]) -> list[dict[str, Any]]:
    runs = [json.loads(path.read_text()) for path in paths]
    return sorted(runs, key=lambda r: tuple(int(p) for p in str(r["pulpcore"]).split(".")[:3]))


def splice(text: str, block: str, where: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{where} has no {START!r} ... {END!r} markers")
    return text[: start + len(START)] + "\n" + block + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pulp_pubsub_tools.e2e.docs")
    parser.add_argument("json", nargs="+", type=Path, help="the runs' JSON (--json of e2e)")
    parser.add_argument("--root", type=Path, default=Path("."), help="the checkout")
    parser.add_argument("--check", action="store_true", help="only report stale docs")
    args = parser.parse_args(argv)
    block = render(load(args.json))
    stale = []
    for name in DOCS:
        path = args.root / name
        text = path.read_text()
        updated = splice(text, block, name)
        if updated != text:
            stale.append(name)
            if not args.check:
                path.write_text(updated)
    if args.check and stale:
        sys.stderr.write(f"out of date with the JSON: {', '.join(stale)}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
