"""What the sdist and the wheel carry: the licence, the typing marker, and no test tooling
in a runtime install.

Builds both from a copy of the tracked files (so the checkout gets no ``build/`` or
``*.egg-info``), without build isolation: ``setuptools`` and ``wheel`` come from the
test environment (the ``dev`` extra), so no index is needed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPL_FIRST_LINES = ("GNU GENERAL PUBLIC LICENSE", "Version 2, June 1991")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.fail("the packaging check builds from a git checkout")
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, tracked):
        path = Path(name.decode())
        if (ROOT / path).is_file():
            (source / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, source / path)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--no-isolation", "--outdir", out],
        cwd=source,
        check=True,
        capture_output=True,
    )
    return out


def only(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_the_repository_has_pulps_licence_text():
    text = (ROOT / "LICENSE").read_text()
    assert all(line in text for line in GPL_FIRST_LINES)
    assert "or (at your option) any later version" in " ".join(text.split())


def test_the_sdist_carries_the_licence_docs_tests_and_the_end_to_end_run(dist: Path):
    with tarfile.open(only(dist, "*.tar.gz")) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        licence = sdist.extractfile(
            next(m for m in sdist.getmembers() if m.name.endswith("/LICENSE"))
        )
        assert licence is not None and GPL_FIRST_LINES[0] in licence.read().decode()
    for needed in (
        "LICENSE",
        "README.md",
        "CHANGES.rst",
        "docs/pulp.md",
        "pulp_pubsub/py.typed",
        "pulp_pubsub_tools/e2e/scenarios.py",
        "tests/test_pulpcore_e2e.py",
    ):
        assert needed in names, needed


def test_the_wheel_carries_the_licence_and_no_test_tooling(dist: Path):
    with zipfile.ZipFile(only(dist, "*.whl")) as wheel:
        names = set(wheel.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = wheel.read(metadata).decode()
    assert any(n.endswith(".dist-info/LICENSE") for n in names), sorted(names)
    assert "License: GPL-2.0-or-later" in meta
    for needed in (
        "pulp_pubsub/py.typed",
        "pulp_pubsub/backends/redis/backend.py",
        "pulp_pubsub/contrib/pulpcore/worker.py",
        "pulp_pubsub/management/commands/pubsub_ping.py",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "demo/"))]


TOOLING_COMMANDS = ("pubsub_bench", "pubsub_chaos", "pubsub_demo")


def test_the_wheel_carries_the_runtime_and_nothing_that_measures_or_tests_it(dist: Path):
    with zipfile.ZipFile(only(dist, "*.whl")) as wheel:
        names = [n for n in wheel.namelist() if ".dist-info/" not in n]
    outside = [n for n in names if not n.startswith("pulp_pubsub/")]
    assert not outside, outside
    tooling = [
        n
        for n in names
        if n.split("/")[1] in ("bench", "chaos", "testing")
        or "/e2e/" in n
        or any(f"/{command}.py" in n for command in TOOLING_COMMANDS)
    ]
    assert not tooling, tooling
    # The tooling exists in the checkout: the check above would pass vacuously otherwise.
    assert (ROOT / "pulp_pubsub_tools" / "bench").is_dir()
    assert (ROOT / "pulp_pubsub_tools" / "management" / "commands" / "pubsub_bench.py").exists()


def test_the_e2e_tables_in_the_docs_are_generated_from_the_committed_json():
    from pulp_pubsub_tools.e2e import docs

    runs = sorted((ROOT / "docs").glob("e2e-*.json"))
    assert [p.name for p in runs] == [
        "e2e-3.105.json",
        "e2e-3.123.json",
        "e2e-redis-3.108.json",
        "e2e-redis-3.123.json",
    ]
    assert docs.main([*map(str, runs), "--root", str(ROOT), "--check"]) == 0


def test_the_outage_table_in_the_docs_is_generated_from_the_committed_json():
    from pulp_pubsub_tools.e2e import outage_docs

    result = ROOT / "docs" / "figures" / "e2e-3.123-outages.json"
    assert (ROOT / outage_docs.PAGE).read_text().count(outage_docs.START) == 1
    assert outage_docs.main([str(result), "--root", str(ROOT), "--check"]) == 0


def test_the_herd_tables_in_the_docs_are_generated_from_the_committed_json():
    from pulp_pubsub_tools.e2e import herd

    result, page = ROOT / "docs" / "figures" / "herd.json", ROOT / "docs" / "pulp.md"
    assert page.read_text().count(herd.START) == 1
    assert herd.main(["--load", str(result), "--markdown", str(page), "--check"]) == 0


def test_the_redis_type_sizes_tables_in_the_docs_are_generated_from_the_committed_json():
    from pulp_pubsub_tools.e2e import redistype_sizes

    result = ROOT / "docs" / "figures" / "redis_type_sizes.json"
    page = ROOT / "docs" / "pulp.md"
    assert page.read_text().count(redistype_sizes.START) == 1
    assert json.loads(result.read_text())["config"]["sizes"] == [4, 16, 32]
    args = ["--load", str(result), "--markdown", str(page), "--check"]
    assert redistype_sizes.main(args) == 0
