"""pulpcore's own functional tasking tests against a real Pulp, in several configurations.

    python -m pulp_pubsub_tools.e2e.functional \\
        --configs stock,redis,patched,patched_redis,redis_worker \\
        --json docs/figures/pulpcore_functional_tasking.json

pulpcore ships its functional tests and their pytest plugin in its wheel
(``pulpcore/tests/functional/api/test_tasking.py``, ``pulpcore/pytest_plugin.py``).
They drive a running Pulp through its REST API (``pulpcore-client``) and
dispatch tasks with ``pulpcore-manager shell`` in the test process's own
environment, so the test process is configured exactly as the Pulp processes
are: the same ``PULP_*`` variables, the same ``PYTHONPATH``.

Each configuration gets a fresh copy of one migrated database, its own
``pulpcore-api``, ``pulpcore-content`` and three ``pulpcore-worker``
processes from the cached virtualenv of :mod:`.site`, and one pytest run;
the tests that failed are run once more on the same Pulp. The test process
runs in a small virtualenv of its own (pytest, pytest-timeout and the client
bindings of the same pulpcore release) that sees the cached virtualenv's
packages through a ``.pth`` file, so the cached one is never changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulp_pubsub_tools import upstream

from . import functional_results as results
from .operator import pulp_environment, responds
from .site import Site, default_venv, ensure_venv

MODULE = "pulpcore.tests.functional.api.test_tasking"
WORKERS = 3
#: pytest-timeout's limit per test. pulpcore's plugin skips its ``long_running`` tests
#: (a missing worker's cleanup, up to 600 s) below 600, in every configuration alike.
TEST_TIMEOUT = 300
#: How long a whole pytest run may take on a loaded 2-core machine.
RUN_TIMEOUT = 3000
WAIT = 120.0
TEST_PACKAGES = ("pytest>=8", "pytest-timeout>=2")


@dataclass(frozen=True)
class Configuration:
    name: str
    description: str
    patched: bool = False
    pubsub: bool = False
    redis_worker: bool = False
    #: The configuration whose passing tests this one must keep passing.
    baseline: str | None = "stock"


CONFIGURATIONS = {
    c.name: c
    for c in (
        Configuration("stock", 'stock pulpcore, WORKER_TYPE="pulpcore"', baseline=None),
        Configuration("redis", "pulpcore + pulp-pubsub on Redis (rebinding)", pubsub=True),
        Configuration("patched", "pulpcore with the seam patch, alone", patched=True),
        Configuration(
            "patched_redis", "patched pulpcore + pulp-pubsub on Redis", patched=True, pubsub=True
        ),
        Configuration(
            "redis_worker", 'stock pulpcore, WORKER_TYPE="redis"', redis_worker=True, baseline=None
        ),
        Configuration(
            "redis_worker_pubsub",
            'pulpcore + pulp-pubsub on Redis, WORKER_TYPE="redis"',
            pubsub=True,
            redis_worker=True,
            baseline="redis_worker",
        ),
        Configuration(
            "patched_redis_worker",
            'pulpcore with the seam patch, alone, WORKER_TYPE="redis"',
            patched=True,
            redis_worker=True,
            baseline="redis_worker",
        ),
        Configuration(
            "patched_redis_redis_worker",
            'patched pulpcore + pulp-pubsub on Redis, WORKER_TYPE="redis"',
            patched=True,
            pubsub=True,
            redis_worker=True,
            baseline="redis_worker",
        ),
    )
}


def ensure_test_venv(pulp_venv: Path, log: Callable[[str], None] = lambda _: None) -> Path:
    """The test process's virtualenv beside ``pulp_venv``; made once per pulpcore release."""
    site_packages = next(pulp_venv.glob("lib/python*/site-packages"))
    version = next(site_packages.glob("pulpcore-*.dist-info")).name[len("pulpcore-") : -10]
    path = pulp_venv.with_name(f"{pulp_venv.name}-functests")
    wanted = " ".join(
        (*TEST_PACKAGES, f"pulpcore-client=={version}", f"pulp-file-client=={version}")
    )
    marker = path / ".pulp-pubsub-functests"
    if marker.exists() and marker.read_text() == f"{site_packages}\n{wanted}":
        return path
    log(f"making {path} with {wanted}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    own = next(path.glob("lib/python*/site-packages"))
    # Appended to sys.path after the virtualenv's own packages: pulpcore and its
    # dependencies come from the cached virtualenv, only what it lacks is installed here.
    (own / "pulp-pubsub-pulpcore.pth").write_text(f"{site_packages}\n")
    python = str(path / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted.split()],
        check=True,
    )
    marker.write_text(f"{site_packages}\n{wanted}")
    return path


class FunctionalRun:
    def __init__(self, configs: list[str], log: Callable[[str], None], keep_logs: Path | None):
        unknown = [name for name in configs if name not in CONFIGURATIONS]
        if unknown:
            raise ValueError(f"unknown configurations: {', '.join(unknown)}")
        self.configs = [CONFIGURATIONS[name] for name in configs]
        self.log = log
        self.keep_logs = keep_logs

    def run(self) -> dict[str, Any]:
        from pulp_pubsub_tools.testing import PostgresServer, RedisServer

        began = time.monotonic()
        self.venv = ensure_venv(default_venv(upstream.SERIES), upstream.SERIES, self.log)
        self.test_venv = ensure_test_venv(self.venv, self.log)
        postgres, self.redis_server = PostgresServer(), RedisServer()
        sites: list[Site] = []
        report: dict[str, Any] = {"module": MODULE, "workers": WORKERS, "configs": {}}
        try:
            postgres.start()
            self.redis_server.start()
            stock = Site(self.venv, postgres)
            sites.append(stock)
            report["pulpcore"] = stock.pulpcore_version()
            self.log("migrating a throwaway database")
            stock.migrate_template()
            patched: Site | None = None
            with tempfile.TemporaryDirectory(prefix="pulpcore-patched-") as tmp:
                for config in self.configs:
                    if config.patched and patched is None:
                        patched = self.patched_site(postgres, Path(tmp))
                        sites.append(patched)
                    site = patched if config.patched and patched else stock
                    started = time.monotonic()
                    try:
                        outcome = self.run_config(site, config)
                    finally:  # the logs of a configuration that broke are the ones to read
                        site.stop_all()
                        if self.keep_logs is not None:
                            self.copy_logs(site, config.name)
                    outcome["seconds"] = round(time.monotonic() - started, 1)
                    report["configs"][config.name] = outcome
                    self.log(f"{config.name}: {outcome['counts']}")
        finally:
            for site in sites:
                site.cleanup()
            self.redis_server.cleanup()
            postgres.cleanup()
        results.judge(report)
        report["seconds"] = round(time.monotonic() - began, 1)
        return report

    def patched_site(self, postgres: Any, into: Path) -> Site:
        site_packages = next(self.venv.glob("lib/python*/site-packages"))
        upstream.patched_copy(site_packages, into)
        site = Site(self.venv, postgres)
        (site.pythonpath / "pulpcore").symlink_to(into / "pulpcore", target_is_directory=True)
        found = self.import_path(site, "pulpcore.tasking.pubsub")
        if not Path(found).resolve().is_relative_to(into.resolve()):
            raise RuntimeError(f"the patched configurations would import pulpcore from {found}")
        return site

    def import_path(self, site: Site, module: str) -> str:
        """Where a Pulp process finds ``module``, without importing it (the test module
        imports pytest and the client bindings, which Pulp's virtualenv lacks)."""
        done = subprocess.run(
            [
                site.bin("python"),
                "-c",
                f"import importlib.util as u; print(u.find_spec({module!r}).origin)",
            ],
            env={**os.environ, "PYTHONPATH": str(site.pythonpath)},
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()

    def environment(self, site: Site, config: Configuration, db: str) -> dict[str, str]:
        env = pulp_environment(site, db, site.postgres, self.content_port)
        if config.pubsub:
            env.update(
                PULP_PUBSUB_BACKEND="redis",
                PULP_PUBSUB_URL=self.redis_server.url,
                PULP_PUBSUB_CHANNEL_PREFIX=f"{config.name}.",
            )
        else:
            del env["PULP_INSTALLED_APPS"]
        if config.redis_worker:
            env.update(PULP_WORKER_TYPE="redis", PULP_REDIS_URL=self.redis_server.url)
        return env

    def run_config(self, site: Site, config: Configuration) -> dict[str, Any]:
        from pulp_pubsub_tools.testing import free_port

        self.log(f"{config.name}: {config.description}")
        db = f"functional_{config.name}"
        with self.redis() as client:
            client.flushall()  # Pulp's redis worker type keeps its locks there
            client.config_resetstat()
        site.create_database(db)
        self.api_port, self.content_port = free_port(), free_port()
        env = self.environment(site, config, db)
        site.manage(env, "migrate", "--noinput")
        password = os.urandom(12).hex()
        site.manage(env, "reset-admin-password", f"--password={password}")
        for i in range(WORKERS):
            name = f"{config.name}-worker{i}"
            site.start_worker(name, env, "--name-template", f"ft{i}@{config.name}")
        bind = ["--workers", "2", "--bind"]
        site.start(
            f"{config.name}-api",
            env,
            [site.bin("pulpcore-api"), *bind, f"127.0.0.1:{self.api_port}"],
        )
        site.start(
            f"{config.name}-content",
            env,
            [site.bin("pulpcore-content"), *bind, f"127.0.0.1:{self.content_port}"],
        )
        site.wait(lambda: site.workers_registered(db) == WORKERS, WAIT, f"{config.name} workers")
        if config.pubsub:
            channel = f"{config.name}.pulp_worker_wakeup"
            site.wait(lambda: self.subscribers(channel) == WORKERS, WAIT, "workers subscribed")
        api = f"http://127.0.0.1:{self.api_port}"
        site.wait(lambda: responds(f"{api}/pulp/api/v3/status/"), WAIT, "pulpcore-api")
        site.wait(
            lambda: responds(f"http://127.0.0.1:{self.content_port}/pulp/content/"),
            WAIT,
            "pulpcore-content",
        )
        test_file = Path(self.import_path(site, MODULE))
        pytest_env = site.env(
            env,
            API_PROTOCOL="http",
            API_HOST="127.0.0.1",
            API_PORT=str(self.api_port),
            ADMIN_USERNAME="admin",
            ADMIN_PASSWORD=password,
            # pulpcore's dispatch_task fixture runs ``pulpcore-manager`` from PATH.
            PATH=f"{self.venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        tests = self.pytest(site, config.name, test_file, pytest_env, [str(test_file)])
        again = results.failing(tests)
        if again:
            self.log(f"{config.name}: running again {', '.join(again)}")
            ids = [f"{test_file}::{name}" for name in again]
            rerun = self.pytest(site, f"{config.name}-rerun", test_file, pytest_env, ids)
            tests = results.with_rerun(tests, rerun)
        crashed = [p.name for p in site.processes if p.popen.poll() is not None]
        with self.redis() as client:
            stats = client.info("commandstats")
        return {
            "description": config.description,
            "baseline": config.baseline,
            "settings": {k: v for k, v in env.items() if k in SHOWN_SETTINGS},
            "pulpcore_from": "patched copy" if config.patched else "virtualenv",
            "tasking_pubsub_backend": self.pubsub_setting(site, env),
            "processes_exited": crashed,
            # What reached Redis: PUBLISH and XADD carry pulp-pubsub's messages (broadcast,
            # targeted); Pulp's redis worker type keeps its locks in keys.
            "redis_commands": {
                name.removeprefix("cmdstat_"): int(v["calls"])
                for name, v in sorted(stats.items())
                if name.startswith("cmdstat_") and name not in REDIS_HOUSEKEEPING
            },
            "counts": results.counts(tests),
            "tests": tests,
        }

    def pytest(
        self, site: Site, name: str, test_file: Path, env: dict[str, str], args: list[str]
    ) -> dict[str, dict[str, Any]]:
        junit = site.root / "logs" / f"{name}.xml"
        argv = [
            str(self.test_venv / "bin" / "python"),
            "-m",
            "pytest",
            *args,
            "--rootdir",
            str(test_file.parents[4]),
            "-p",
            "no:cacheprovider",
            "--timeout",
            str(TEST_TIMEOUT),
            "--junitxml",
            str(junit),
            "-rs",
            "-v",
        ]
        with open(site.root / "logs" / f"{name}-pytest.log", "wb") as out:
            subprocess.run(
                argv,
                env=env,
                cwd=site.root / "tmp",
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=RUN_TIMEOUT,
                check=False,
            )
        if not junit.exists():
            tail = (site.root / "logs" / f"{name}-pytest.log").read_text(errors="replace")
            raise RuntimeError(f"pytest wrote no report for {name}:\n{tail[-3000:]}")
        return results.parse_junit(junit, MODULE)

    def pubsub_setting(self, site: Site, env: dict[str, str]) -> str | None:
        """pulpcore's ``TASKING_PUBSUB_BACKEND`` as a Pulp process sees it once set up (the
        patch adds it; with pulp-pubsub on, the integration names its adapter there)."""
        code = "from django.conf import settings as s; print(getattr(s, %r, None))"
        said = site.manage(env, "shell", "-c", code % "TASKING_PUBSUB_BACKEND").strip()
        return None if said == "None" else said.splitlines()[-1]

    @contextlib.contextmanager
    def redis(self) -> Iterator[Any]:
        import redis

        client = redis.Redis.from_url(self.redis_server.url, decode_responses=True)
        try:
            yield client
        finally:
            client.close()

    def subscribers(self, channel: str) -> int:
        with self.redis() as client:
            return int(dict(client.pubsub_numsub(channel)).get(channel, 0))

    def copy_logs(self, site: Site, name: str) -> None:
        import shutil

        assert self.keep_logs is not None
        where = self.keep_logs / name
        where.mkdir(parents=True, exist_ok=True)
        for path in (site.root / "logs").glob(f"{name}*"):
            shutil.copy(path, where / path.name)


#: The runner's own Redis commands, left out of a configuration's figures.
REDIS_HOUSEKEEPING = (
    "cmdstat_info",
    "cmdstat_flushall",
    "cmdstat_config|resetstat",
    "cmdstat_pubsub|numsub",
)

#: The settings that make a configuration what it is (no secrets, no throwaway paths).
SHOWN_SETTINGS = (
    "PULP_INSTALLED_APPS",
    "PULP_PUBSUB_BACKEND",
    "PULP_PUBSUB_CHANNEL_PREFIX",
    "PULP_WORKER_TYPE",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pulp_pubsub_tools.e2e.functional")
    parser.add_argument(
        "--configs",
        default="stock,redis,patched,patched_redis,redis_worker",
        help=f"comma-separated, from: {','.join(CONFIGURATIONS)}",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the logs here")
    args = parser.parse_args(argv)
    names = [name for name in args.configs.split(",") if name]
    if any(name not in CONFIGURATIONS for name in names):
        parser.error(f"configurations are from: {', '.join(CONFIGURATIONS)}")

    def log(text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    report = FunctionalRun(names, log, args.keep_logs).run()
    report["command"] = f"python -m pulp_pubsub_tools.e2e.functional --configs {','.join(names)}"
    if args.json:
        report["command"] += f" --json {args.json}"
        args.json.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    sys.stdout.write("\n".join(results.summary(report)) + "\n")
    return 0 if all(o["verdict"]["ok"] for o in report["configs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
