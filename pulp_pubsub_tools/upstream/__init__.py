"""The patch that gives pulpcore a pub/sub interface of its own (docs/upstream.md).

Kept here, beside the tooling rather than in the runtime: it is for pulpcore's
maintainers and for the tests that check it still applies to the newest
supported release, not for an install. With it applied, the integration
names its adapter in pulpcore's setting and rebinds nothing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

#: The pulpcore release the patch is made against: the newest the integration supports.
SERIES = "3.123"
RELEASE = "3.123.1"
PATCH = Path(__file__).with_name(f"pulpcore-{SERIES}-pubsub-seam.patch")


def apply(root: Path, dry_run: bool = False) -> str:
    """Apply the patch below ``root`` (a pulpcore checkout, or the site-packages holding
    ``pulpcore/``) with no fuzz; returns what ``patch`` said, raises when it did not apply."""
    argv = ["patch", "--batch", "--forward", "--fuzz=0", "-p1", "-d", str(root)]
    if dry_run:
        argv.append("--dry-run")
    done = subprocess.run(
        argv, input=PATCH.read_bytes(), capture_output=True, check=False, timeout=60
    )
    said = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"{PATCH.name} does not apply to {root}:\n{said}")
    return said


def patched_copy(site_packages: Path, into: Path) -> Path:
    """A copy of the ``pulpcore`` package in ``site_packages``, patched, in ``into``.

    Put ``into`` first on ``PYTHONPATH`` and the virtualenv runs the patched
    pulpcore; the virtualenv itself is left as it was.
    """
    shutil.copytree(
        site_packages / "pulpcore", into / "pulpcore", ignore=shutil.ignore_patterns("__pycache__")
    )
    apply(into)
    return into
