"""The patch for pulpcore (pulp_pubsub_tools/upstream, docs/upstream.md).

The patch must apply with no fuzz to the newest pulpcore release the
integration supports, leave no LISTEN/NOTIFY in pulpcore's tasking code
outside its pub/sub module, and be described by the diffstat in the docs.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pulp_pubsub.contrib.pulpcore.compat import E2E_SERIES, SUPPORTED, pubsub_sites
from pulp_pubsub_tools import upstream
from pulp_pubsub_tools.e2e.site import default_venv

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "upstream.md"
CHILD = Path(__file__).with_name("pulpcore_seam_child.py")


def site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


@pytest.fixture(scope="module")
def pulpcore_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pulpcore's released source: the cached end-to-end virtualenv's, or the wheel's."""
    venv = default_venv(upstream.SERIES)
    if venv.exists():
        found = site_packages(venv)
        if (found / f"pulpcore-{upstream.RELEASE}.dist-info").is_dir():
            return found
    into = tmp_path_factory.mktemp("pulpcore-wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--dest",
            str(into),
            f"pulpcore=={upstream.RELEASE}",
        ],
        check=True,
        timeout=300,
    )
    with zipfile.ZipFile(next(into.glob("pulpcore-*.whl"))) as wheel:
        wheel.extractall(into / "src")
    return into / "src"


def test_the_patch_is_made_against_the_newest_supported_series():
    assert upstream.SERIES == E2E_SERIES[-1] == ".".join(map(str, SUPPORTED[-1]))
    assert upstream.RELEASE.startswith(upstream.SERIES + ".")
    assert upstream.PATCH.exists()


def test_the_patch_applies_cleanly_to_the_release(pulpcore_source):
    said = upstream.apply(pulpcore_source, dry_run=True)
    assert "offset" not in said and "fuzz" not in said.lower(), said
    # git's own check agrees, and reads the patch the way a maintainer's `git am` would.
    subprocess.run(
        ["git", "apply", "--check", str(upstream.PATCH)],
        check=True,
        cwd=pulpcore_source,
        timeout=60,
    )


def test_the_patched_tasking_code_sends_and_listens_only_through_its_pubsub_module(
    pulpcore_source, tmp_path
):
    patched = upstream.patched_copy(pulpcore_source, tmp_path)
    stock = pubsub_sites(pulpcore_source / "pulpcore" / "tasking")
    assert {module for module, _, _ in stock} == {"tasks", "worker"}
    sites = pubsub_sites(patched / "pulpcore" / "tasking")
    assert sites and {module for module, _, _ in sites} == {"pubsub"}
    assert (patched / "CHANGES" / "6805.feature").exists()


def test_the_docs_show_the_patchs_diffstat():
    stat = subprocess.run(
        ["git", "apply", "--stat", str(upstream.PATCH)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    ).stdout
    text = DOCS.read_text()
    for line in stat.splitlines():
        assert line.strip() in text, f"docs/upstream.md lacks the diffstat line {line.strip()!r}"
