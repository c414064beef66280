"""The outcomes of pulpcore's own functional tests, per configuration, and their verdicts.

Kept apart from the runner (:mod:`.functional`) so the verdict rules can be
tested with no Pulp at all: a configuration passes when nothing that passes on
its baseline fails on it, and nothing that ran on its baseline is skipped on it.
A test that fails and then passes when run again on the same Pulp is reported
as flaky, not as a regression: the rerun is on the same processes and database,
so only timing can have changed.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

PASSED, FAILED, SKIPPED, ERROR = "passed", "failed", "skipped", "error"
OUTCOMES = (PASSED, FAILED, ERROR, SKIPPED)
#: How much of a failure's text is kept in the JSON: enough to see the assertion.
DETAIL_CHARS = 1500


def test_id(classname: str, name: str, module: str) -> str:
    """``test_x`` or ``TestClass::test_x``: the node id within ``module``'s file."""
    rest = classname[len(module) :].lstrip(".") if classname.startswith(module) else classname
    return f"{rest}::{name}" if rest else name


def parse_junit(path: Path, module: str) -> dict[str, dict[str, Any]]:
    """Each test's outcome in a pytest ``--junitxml`` report, with the skip reason or the
    failure's text; a test whose teardown failed after it passed counts as an error."""
    tests: dict[str, dict[str, Any]] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        key = test_id(case.get("classname", ""), case.get("name", ""), module)
        outcome, detail = PASSED, ""
        for child in case:
            if child.tag in ("failure", FAILED):
                outcome = FAILED
            elif child.tag == ERROR:
                outcome = ERROR
            elif child.tag == SKIPPED:
                outcome = SKIPPED
            else:
                continue
            detail = child.get("message") or ""
            if outcome != SKIPPED:
                detail = f"{detail}\n{child.text or ''}".strip()
            break
        entry: dict[str, Any] = {"outcome": outcome, "seconds": float(case.get("time", 0) or 0)}
        if detail:
            entry["detail"] = detail[-DETAIL_CHARS:] if outcome != SKIPPED else detail
        # A test that failed in its call and again in teardown is listed twice: keep the worst.
        if key not in tests or tests[key]["outcome"] in (PASSED, SKIPPED):
            tests[key] = entry
    return tests


def failing(tests: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, t in tests.items() if t["outcome"] in (FAILED, ERROR)]


def with_rerun(
    tests: dict[str, dict[str, Any]], rerun: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The first run's outcomes, each failed test carrying its rerun's outcome."""
    merged = {name: dict(t) for name, t in tests.items()}
    for name, again in rerun.items():
        if name in merged:
            merged[name]["rerun"] = again["outcome"]
            if again["outcome"] != PASSED and again.get("detail"):
                merged[name]["rerun_detail"] = again["detail"]
    return merged


def final(test: dict[str, Any]) -> str:
    """Passed, failed, error or skipped, with a failure that passed on its rerun as passed."""
    if test["outcome"] in (FAILED, ERROR) and test.get("rerun") == PASSED:
        return PASSED
    return str(test["outcome"])


def counts(tests: dict[str, dict[str, Any]]) -> dict[str, int]:
    found = {outcome: 0 for outcome in OUTCOMES}
    for test in tests.values():
        found[final(test)] += 1
    found["flaky"] = sum(1 for t in tests.values() if t["outcome"] != final(t))
    return found


def verdict(
    tests: dict[str, dict[str, Any]], baseline: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Whether a configuration keeps everything its baseline has.

    ``regressions``: passed on the baseline, fails here (also on its rerun).
    ``newly_skipped``: ran on the baseline, skipped here (or missing).
    ``flaky``: failed here, passed on the rerun.
    ``gained``: fails on the baseline, passes here (shown, never a failure).
    """
    regressions, newly_skipped, gained = [], [], []
    for name, base in baseline.items():
        here = tests.get(name)
        theirs = final(base)
        ours = final(here) if here else SKIPPED
        if theirs == PASSED and ours in (FAILED, ERROR):
            regressions.append(name)
        elif theirs != SKIPPED and ours == SKIPPED:
            newly_skipped.append(name)
        elif theirs in (FAILED, ERROR) and ours == PASSED:
            gained.append(name)
    flaky = [name for name, t in tests.items() if t["outcome"] != final(t)]
    return {
        "ok": not regressions and not newly_skipped,
        "regressions": regressions,
        "newly_skipped": newly_skipped,
        "flaky": flaky,
        "gained": gained,
    }


def skip_reasons(tests: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: str(t.get("detail", "")) for name, t in tests.items() if final(t) == SKIPPED}


def judge(report: dict[str, Any]) -> None:
    """Add each configuration's verdict against its baseline (when that was run too)."""
    configs = report["configs"]
    for outcome in configs.values():
        base = outcome["baseline"]
        if base is None:
            outcome["verdict"] = {"ok": True, "baseline_of_its_kind": True}
        elif base in configs:
            outcome["verdict"] = verdict(outcome["tests"], configs[base]["tests"])
        else:
            outcome["verdict"] = {"ok": False, "missing_baseline": base}


def summary(report: dict[str, Any]) -> list[str]:
    lines = [f"pulpcore {report.get('pulpcore')}: {report['module']}, {report['workers']} workers"]
    for name, o in report["configs"].items():
        c, v = o["counts"], o["verdict"]
        flaky = f", {c['flaky']} flaky" if c["flaky"] else ""
        against = f"against {o['baseline']}" if o["baseline"] else "baseline"
        lines.append(
            f"[{'PASS' if v['ok'] else 'FAIL'}] {name} ({against}): {c['passed']} passed, "
            f"{c['failed'] + c['error']} failed, {c['skipped']} skipped{flaky} "
            f"in {o['seconds']:.0f} s"
        )
        for key in ("regressions", "newly_skipped", "flaky", "gained"):
            if v.get(key):
                lines.append(f"    {key}: {', '.join(v[key])}")
        if o["processes_exited"]:
            lines.append(f"    processes that exited: {', '.join(o['processes_exited'])}")
    return lines
