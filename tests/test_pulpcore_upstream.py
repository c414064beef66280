"""The patch for pulpcore (pulp_pubsub_tools/upstream, docs/upstream.md), and the integration on it.

The patch must apply with no fuzz to the newest pulpcore release the
integration supports, leave no LISTEN/NOTIFY in pulpcore's tasking code
outside its pub/sub module, and be described by the diffstat in the docs. On
a pulpcore so patched, setup() names the adapter in pulpcore's setting and
replaces nothing in ``pulpcore.tasking``; on stock pulpcore the same
comparison shows the three names the rebinding integration replaces, so it
can tell the two apart.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pulp_pubsub.contrib.pulpcore.compat import E2E_SERIES, SUPPORTED, pubsub_sites
from pulp_pubsub.contrib.pulpcore.seam import PATH
from pulp_pubsub_tools import upstream
from pulp_pubsub_tools.e2e.site import default_venv, ensure_venv

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


def run_setup(venv: Path, pythonpath: list[Path], tmp_path: Path) -> dict[str, object]:
    """What setup() changed, in a Pulp process of ``venv`` (tests/pulpcore_seam_child.py)."""
    key = tmp_path / "database_fields.symmetric.key"
    key.write_bytes(base64.urlsafe_b64encode(os.urandom(32)))  # a Fernet key, unused
    settings = tmp_path / "settings.py"
    settings.write_text(
        "\n".join(
            [
                "SECRET_KEY = 'not-secret'",
                "DATABASES = {'default': {'ENGINE': 'django.db.backends.postgresql',"
                " 'NAME': 'unused', 'HOST': '127.0.0.1'}}",
                "INSTALLED_APPS = ['dynaconf_merge', 'pulp_pubsub']",
                "PUBSUB_BACKEND = 'memory'",
                "PUBSUB_PULPCORE_INTEGRATION = False",
                f"DEPLOY_ROOT = {str(tmp_path)!r}",
                f"MEDIA_ROOT = {str(tmp_path / 'media')!r}",
                f"STATIC_ROOT = {str(tmp_path / 'assets')!r}",
                f"WORKING_DIRECTORY = {str(tmp_path / 'tmp')!r}",
                f"DB_ENCRYPTION_KEY = {str(key)!r}",
                "",
            ]
        )
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PULP_", "PUBSUB_", "DJANGO_"))
    }
    env.update(
        PULP_SETTINGS=str(settings),
        DJANGO_SETTINGS_MODULE="pulpcore.app.settings",
        PYTHONPATH=os.pathsep.join(map(str, [*pythonpath, ROOT])),
        PYTHONDONTWRITEBYTECODE="1",  # the cached virtualenv stays as it is
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(CHILD)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def pulpcore_venv() -> Iterator[Path]:
    yield ensure_venv(default_venv(upstream.SERIES), upstream.SERIES)


@pytest.mark.pulp
@pytest.mark.long
def test_on_patched_pulpcore_setup_names_the_adapter_and_replaces_nothing(pulpcore_venv, tmp_path):
    overlay = upstream.patched_copy(site_packages(pulpcore_venv), tmp_path / "overlay")
    result = run_setup(pulpcore_venv, [overlay], tmp_path)
    assert result["changed"] == []
    assert (result["installed"], result["seam"], result["problems"]) == (True, True, [])
    assert result["setting"] == result["backend"] == PATH


@pytest.mark.pulp
@pytest.mark.long
def test_on_stock_pulpcore_the_same_comparison_shows_the_rebinding(pulpcore_venv, tmp_path):
    result = run_setup(pulpcore_venv, [], tmp_path)
    assert result["changed"] == [
        "pulpcore.tasking.tasks.connection",
        "pulpcore.tasking.worker.PulpcoreWorker",
        "pulpcore.tasking.worker.select",
    ]
    assert (result["installed"], result["seam"], result["setting"]) == (True, False, None)
