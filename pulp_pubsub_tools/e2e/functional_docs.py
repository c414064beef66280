"""The table of pulpcore's own functional tasking tests in the docs, from the committed JSON.

``python -m pulp_pubsub_tools.e2e.functional_docs docs/figures/pulpcore_functional_tasking.json``
rewrites the part of ``docs/pulp.md`` between the markers below; ``--check``
only says whether it is up to date (the test suite runs that).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import functional_results as results
from .marked import rewrite

START = (
    "<!-- pulpcore functional tasking: start "
    "(generated from docs/figures/pulpcore_functional_tasking.json by e2e.functional_docs) -->"
)
END = "<!-- pulpcore functional tasking: end -->"
DOC = "docs/pulp.md"
#: The Redis commands that carry pulp-pubsub's messages (broadcast, targeted).
REDIS_SENDS = ("publish", "xadd")
SHOWN = {
    results.PASSED: "pass",
    results.FAILED: "**FAIL**",
    results.ERROR: "**ERROR**",
    results.SKIPPED: "skip",
}


def _cell(test: dict[str, Any] | None) -> str:
    if test is None:
        return "-"
    shown = SHOWN[results.final(test)]
    if test["outcome"] != results.final(test):
        shown += " (flaky: failed, passed on rerun)"
    return shown


def render(report: dict[str, Any]) -> str:
    configs = report["configs"]
    names = list(configs)
    lines = [
        f"pulpcore {report['pulpcore']}, `{report['module']}`, {report['workers']} workers, "
        f"made by `{report['command']}`.",
        "",
        "| configuration | settings | pulpcore's pub/sub class | messages through Redis "
        "| passed | failed | skipped | flaky | against | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, o in configs.items():
        c, v = o["counts"], o["verdict"]
        settings = ", ".join(f"`{k}={val}`" for k, val in o["settings"].items()) or "(defaults)"
        against = o["baseline"] or "(baseline)"
        ok = "pass" if v["ok"] else "**FAIL**"
        seam = o["tasking_pubsub_backend"]
        seam = f"`{seam.rsplit('.', 1)[-1]}`" if seam else "(no such setting)"
        sent = sum(o["redis_commands"].get(command, 0) for command in REDIS_SENDS)
        lines.append(
            f"| {name}: {o['description']} | {settings} | {seam} | {sent} | {c['passed']} | "
            f"{c['failed'] + c['error']} | {c['skipped']} | {c['flaky']} | {against} | {ok} |"
        )
    lines += ["", "| test | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    everything: dict[str, None] = {}
    for o in configs.values():
        everything.update(dict.fromkeys(o["tests"]))
    for test in everything:
        cells = " | ".join(_cell(configs[n]["tests"].get(test)) for n in names)
        lines.append(f"| `{test}` | {cells} |")
    reasons: dict[str, set[str]] = {}
    for name, o in configs.items():
        for test, reason in results.skip_reasons(o["tests"]).items():
            reasons.setdefault(f"`{test}`: {reason.strip()}", set()).add(name)
    if reasons:
        lines += ["", "Skipped, and why (pulpcore's own markers):", ""]
        for reason, where in reasons.items():
            which = "every configuration" if len(where) == len(names) else ", ".join(sorted(where))
            lines.append(f"- {reason} ({which})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pulp_pubsub_tools.e2e.functional_docs")
    parser.add_argument("json", type=Path, help="the run's JSON (--json of e2e.functional)")
    parser.add_argument("--root", type=Path, default=Path("."), help="the checkout")
    parser.add_argument("--check", action="store_true", help="only report a stale page")
    args = parser.parse_args(argv)
    block = render(json.loads(args.json.read_text()))
    return rewrite(args.root / DOC, block, (START, END), args.check, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
