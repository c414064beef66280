"""``python -m pulp_pubsub_tools.e2e``: run the scenarios, print the figures.

Run it from a checkout (it starts throwaway servers with :mod:`pulp_pubsub_tools.testing`).
Exits 1 when a verdict fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pulp_pubsub.contrib.pulpcore.compat import E2E_SERIES

from .figures import as_dict, contrast, merge, table, verdicts
from .scenarios import OPTIONAL_SCENARIOS, Config, Run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pulp_pubsub_tools.e2e")
    defaults = Config()
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size)
    parser.add_argument("--latency-tasks", type=int, default=defaults.latency_tasks)
    parser.add_argument("--idle-seconds", type=float, default=defaults.idle_seconds)
    parser.add_argument(
        "--scenarios",
        default=",".join(defaults.scenarios),
        help=f"comma-separated, from: {','.join((*defaults.scenarios, *OPTIONAL_SCENARIOS))}",
    )
    parser.add_argument(
        "--series",
        default=defaults.series,
        help=f"the pulpcore series from PyPI, MAJOR.MINOR (end-to-end: {', '.join(E2E_SERIES)})",
    )
    parser.add_argument("--outage-seconds", type=float, default=defaults.outage_seconds)
    parser.add_argument("--venv", type=Path, default=None, help="the pulpcore virtualenv")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --json: put this run's scenarios into the run already in that file "
        "(same pulpcore release), keeping its other scenarios",
    )
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the logs here")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - {*defaults.scenarios, *OPTIONAL_SCENARIOS}
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.merge and (args.json is None or not args.json.exists()):
        parser.error("--merge needs --json naming an existing run's JSON")
    config = Config(
        workers=args.workers,
        pool_size=args.pool_size,
        latency_tasks=args.latency_tasks,
        idle_seconds=args.idle_seconds,
        scenarios=tuple(name for name in args.scenarios.split(",") if name),
        series=args.series,
        outage_seconds=args.outage_seconds,
        venv=args.venv,
        keep_logs=args.keep_logs,
    )

    def log(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    report = Run(config, log).run()
    out = sys.stdout
    out.write(f"pulpcore {report.pulpcore}\n")
    out.write(table(report) + "\n\n")
    for line in contrast(report):
        out.write(line + "\n")
    out.write("\n")
    results = verdicts(report)
    for verdict in results:
        out.write(f"[{'PASS' if verdict.ok else 'FAIL'}] {verdict.name}: {verdict.figure}\n")
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in report.seconds.items())
    out.write(f"\ntotal {report.total_seconds:.0f} s ({steps})\n")
    if args.json:
        figures = json.loads(json.dumps(as_dict(report), default=str))
        if args.merge:
            try:
                figures = merge(json.loads(args.json.read_text()), figures)
            except ValueError as exc:
                sys.stderr.write(f"{args.json} left as it was: {exc}\n")
                return 2
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if all(v.ok for v in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
