"""The two test tiers stay what the README promises.

``python -m pytest`` is the newcomer's tier: short, yet every backend's contract, fault and
chaos tests against real servers. ``python -m pytest -m long`` holds the long runs (pulpcore
end to end and herd, the long chaos and bench runs, soaks, clusters). A test moved, renamed or
newly parametrised must not slip out of both, and a backend must not vanish from the default
tier because its only tests became long. The collection runs in a subprocess, with the
project's own settings (setup.cfg's ``addopts``), as a newcomer's command would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HARNESSES = sorted(path.stem.removeprefix("harness_") for path in ROOT.glob("tests/harness_*.py"))
#: Modules whose tests every backend must have in the default tier.
PER_BACKEND = ("tests/test_contract.py", "tests/test_reliability.py")


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What a plain ``python -m pytest`` collects, and what it keeps."""
    out = tmp_path_factory.mktemp("tiers") / "report.json"
    env = {key: value for key, value in os.environ.items() if key != "PUBSUB_TEST_BACKENDS"}
    env["TIER_REPORT"] = str(out)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "tests.tier_report"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    report["default"] = set(report["selected"])
    report["long"] = {
        node for node, seen in report["collected"].items() if "long" in seen["markers"]
    }
    return report


def test_the_default_command_leaves_out_exactly_the_long_tier(collection):
    everything = set(collection["collected"])
    assert collection["default"] and collection["long"]
    assert collection["default"] == everything - collection["long"]


def test_every_pulpcore_run_is_in_the_long_tier(collection):
    pulp = {node for node, seen in collection["collected"].items() if "pulp" in seen["markers"]}
    assert pulp, "no test is marked pulp"
    assert pulp <= collection["long"]


def test_the_retired_slow_marker_is_not_used(collection):
    slow = [node for node, seen in collection["collected"].items() if "slow" in seen["markers"]]
    assert slow == []


def test_every_backend_harness_has_contract_and_fault_tests_in_the_default_tier(collection):
    assert {"memory", "postgres", "redis", "nats", "natsjs", "etcd", "relay"} <= set(HARNESSES)
    for module in PER_BACKEND:
        covered = {
            seen["backend"]
            for node, seen in collection["collected"].items()
            if node in collection["default"] and node.startswith(module + "::")
        }
        assert set(HARNESSES) <= covered, f"{module} lacks {set(HARNESSES) - covered}"


def test_every_backend_with_a_long_chaos_run_has_a_short_one_by_default(collection):
    def backends(nodes: set[str]) -> set[str]:
        return {
            collection["collected"][node]["backend"]
            for node in nodes
            if node.startswith("tests/test_chaos.py::") and "chaos_run" in node
        }

    long_runs = backends(collection["long"])
    assert long_runs and long_runs <= backends(collection["default"])


def test_ci_runs_the_readme_command_and_the_long_tier():
    script = (ROOT / ".ci" / "run").read_text()
    assert 'python -m pytest -rs --junitxml="$report"\n' in script
    assert "python -m pytest -m long " in script
