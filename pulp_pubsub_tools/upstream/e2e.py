"""The end-to-end scenarios on a pulpcore with the patch applied.

    python -m pulp_pubsub_tools.upstream.e2e [--scenarios head_to_head,pooler]

The run is pulp_pubsub_tools.e2e's, on the cached virtualenv of the patch's
series, with one difference: every Pulp process finds a patched copy of
pulpcore first on its ``PYTHONPATH`` (the virtualenv is left as it is). So
the "stock" fleet of ``head_to_head`` is pulpcore with the patch alone (its
PostgreSQL default), and the integrated fleets use the adapter through
``TASKING_PUBSUB_BACKEND`` instead of the rebinding. The ``contract``
scenario checks the rebinding itself and does not apply here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pulp_pubsub_tools.e2e import site as e2e_site
from pulp_pubsub_tools.e2e.figures import table, verdicts
from pulp_pubsub_tools.e2e.scenarios import Config, Run

from . import SERIES, patched_copy


def with_patched_pulpcore(overlay: Path) -> None:
    """Make every Site link the patched pulpcore into the PYTHONPATH its processes get."""
    original = e2e_site.Site.__post_init__

    def post_init(self: e2e_site.Site) -> None:
        original(self)
        link = self.pythonpath / "pulpcore"
        if not link.exists():
            link.symlink_to(overlay / "pulpcore", target_is_directory=True)
        # What every Pulp process of the run will import (it needs no settings to say).
        found = subprocess.run(
            [self.bin("python"), "-c", "import pulpcore.tasking.pubsub as m; print(m.__file__)"],
            env={**os.environ, "PYTHONPATH": str(self.pythonpath)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not Path(found).resolve().is_relative_to(overlay.resolve()):
            raise RuntimeError(f"the Pulp processes would import pulpcore from {found}")
        print(f"Pulp processes import the patched pulpcore: {found}")

    e2e_site.Site.__post_init__ = post_init  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pulp_pubsub_tools.upstream.e2e")
    parser.add_argument("--scenarios", default="head_to_head,pooler")
    parser.add_argument("--workers", type=int, default=Config.workers)
    args = parser.parse_args(argv)
    venv = e2e_site.ensure_venv(e2e_site.default_venv(SERIES), SERIES, print)
    with tempfile.TemporaryDirectory(prefix="pulpcore-patched-") as tmp:
        site_packages = next(venv.glob("lib/python*/site-packages"))
        with_patched_pulpcore(patched_copy(site_packages, Path(tmp)))
        config = Config(
            series=SERIES, scenarios=tuple(args.scenarios.split(",")), workers=args.workers
        )
        report = Run(config, print).run()
    print(table(report))
    results = verdicts(report)
    for verdict in results:
        print(f"{'PASS' if verdict.ok else 'FAIL'}  {verdict.name}: {verdict.figure}")
    return 0 if all(v.ok for v in results) else 1


if __name__ == "__main__":
    sys.exit(main())
