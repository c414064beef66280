"""pulpcore's own functional tasking tests on a real Pulp, stock and with pulp-pubsub.

In the long tier (marked ``pulp`` and ``long``),
:func:`test_pulpcores_tasking_tests_pass_with_pulp_pubsub_on_redis` runs
``pulpcore/tests/functional/api/test_tasking.py`` from pulpcore's wheel against
real ``pulpcore-api``, ``pulpcore-content`` and three ``pulpcore-worker``
processes, first stock and then with pulp-pubsub on Redis, and holds the
verdict: nothing that passes on stock fails with pulp-pubsub. The other tests
hold the verdict's rules, the reading of pytest's report and the generated table
in docs/pulp.md, with no Pulp.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pulp_pubsub_tools.e2e import functional, functional_docs
from pulp_pubsub_tools.e2e import functional_results as results

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures" / "pulpcore_functional_tasking.json"


def outcomes(**tests: str) -> dict[str, dict[str, Any]]:
    """``name="failed"`` or ``name="failed/passed"`` (first run / rerun)."""
    made: dict[str, dict[str, Any]] = {}
    for name, said in tests.items():
        first, _, again = said.partition("/")
        made[name] = {"outcome": first, **({"rerun": again} if again else {})}
    return made


def test_a_test_that_passes_on_the_baseline_and_fails_here_is_a_regression() -> None:
    base = outcomes(a="passed", b="passed", c="skipped")
    here = outcomes(a="passed", b="failed/failed", c="skipped")
    found = results.verdict(here, base)
    assert found["regressions"] == ["b"]
    assert found["ok"] is False


def test_a_test_that_passes_on_its_rerun_is_flaky_not_a_regression() -> None:
    base = outcomes(a="passed", b="passed")
    here = outcomes(a="passed", b="failed/passed")
    found = results.verdict(here, base)
    assert found == {
        "ok": True,
        "regressions": [],
        "newly_skipped": [],
        "flaky": ["b"],
        "gained": [],
    }
    assert results.counts(here)["passed"] == 2
    assert results.counts(here)["flaky"] == 1


def test_a_test_skipped_here_that_ran_on_the_baseline_fails_the_verdict() -> None:
    base = outcomes(a="passed", b="failed", gone="passed")
    here = outcomes(a="skipped", b="passed")
    found = results.verdict(here, base)
    assert found["newly_skipped"] == ["a", "gone"]
    assert found["gained"] == ["b"]
    assert found["ok"] is False


def test_a_test_that_fails_on_the_baseline_too_is_not_held_against_a_configuration() -> None:
    base = outcomes(a="failed/failed", b="error")
    here = outcomes(a="failed/failed", b="error/error")
    assert results.verdict(here, base)["ok"] is True


def test_a_configuration_without_its_baseline_in_the_run_fails() -> None:
    report: dict[str, Any] = {"configs": {"redis": {"baseline": "stock", "tests": {}}}}
    results.judge(report)
    assert report["configs"]["redis"]["verdict"] == {"ok": False, "missing_baseline": "stock"}


def test_pytests_own_report_is_read_test_by_test(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='needs a plugin')\n"
        "def test_skipped(): pass\n"
        "class TestGroup:\n"
        "    def test_inner(self): pass\n"
        "@pytest.fixture\n"
        "def broken():\n"
        "    yield\n"
        "    raise RuntimeError('teardown broke')\n"
        "def test_teardown(broken): pass\n"
    )
    junit = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    quiet = ("-p", "no:django", "-p", "no:cacheprovider", "-q")
    subprocess.run(
        [sys.executable, "-m", "pytest", *quiet, f"--junitxml={junit}", "test_sample.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=False,
    )
    tests = results.parse_junit(junit, "test_sample")
    assert {name: t["outcome"] for name, t in tests.items()} == {
        "test_ok": "passed",
        "test_bad": "failed",
        "test_skipped": "skipped",
        "TestGroup::test_inner": "passed",
        "test_teardown": "error",
    }
    assert "one is not two" in tests["test_bad"]["detail"]
    assert results.skip_reasons(tests) == {"test_skipped": "needs a plugin"}
    assert results.failing(tests) == ["test_bad", "test_teardown"]


def test_the_functional_table_in_the_docs_is_generated_from_the_committed_json() -> None:
    page = (ROOT / functional_docs.DOC).read_text()
    assert page.count(functional_docs.START) == 1
    assert functional_docs.main([str(FIGURES), "--root", str(ROOT), "--check"]) == 0


def test_the_committed_run_keeps_every_verdict() -> None:
    import json

    # The integrated Redis-type workers were run apart, against their own baseline.
    configs: dict[str, dict[str, Any]] = {}
    for path in (FIGURES, FIGURES.with_name("pulpcore_functional_tasking_redis_type.json")):
        for name, outcome in json.loads(path.read_text())["configs"].items():
            configs.setdefault(name, outcome)
    assert set(configs) == set(functional.CONFIGURATIONS)
    failed = {name: o["verdict"] for name, o in configs.items() if not o["verdict"]["ok"]}
    assert not failed, failed


@pytest.mark.pulp
@pytest.mark.long
@pytest.mark.backend
@pytest.mark.timeout(3000)
def test_pulpcores_tasking_tests_pass_with_pulp_pubsub_on_redis(
    request: pytest.FixtureRequest,
) -> None:
    lines: list[str] = []
    report = functional.FunctionalRun(["stock", "redis"], lines.append, None).run()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + "\n".join(results.summary(report)))  # the figures are the point
    stock, redis = report["configs"]["stock"], report["configs"]["redis"]
    # The run means something only if pulpcore's tests ran on stock at all.
    assert stock["counts"]["passed"] >= 20, stock["counts"]
    assert redis["verdict"]["ok"], redis["verdict"]
    assert results.skip_reasons(redis["tests"]) == results.skip_reasons(stock["tests"])
    assert not stock["processes_exited"] and not redis["processes_exited"]
    # pulp-pubsub was in the path: its messages (broadcast or targeted) went through Redis.
    sent = {"publish", "xadd"}
    assert sent & set(redis["redis_commands"]), redis["redis_commands"]
    assert not sent & set(stock["redis_commands"]), stock["redis_commands"]
