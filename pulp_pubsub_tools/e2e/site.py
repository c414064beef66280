"""A throwaway Pulp: a virtualenv with pulpcore, settings files, workers and the agent.

Nothing here imports pulpcore: it runs in the test environment and drives
Pulp's own programs (``pulpcore-manager``, ``pulpcore-worker``) and
:mod:`.agent` in the virtualenv, each a child process of ours that we stop
by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pulp_pubsub
from pulp_pubsub.contrib.pulpcore.compat import E2E_SERIES

#: What the virtualenv needs besides pulpcore (which brings psycopg and redis).
EXTRA_PACKAGES = ("hiredis>=2.0",)
#: The client libraries of the backends whose scenarios the long tier runs, as requirement
#: and module: kept out of the virtualenv's marker, they are added to a cached virtualenv
#: that lacks them (:func:`ensure_package`) rather than making it again.
BACKEND_PACKAGES = (("websockets>=13", "websockets"), ("kazoo>=2.9", "kazoo"))
VENV_ENV = "PULP_PUBSUB_E2E_VENV"
RESULT_MARK = "E2E-RESULT "
TEMPLATE_DB = "pulp_template"
#: The PostgreSQL settings the transaction counter needs: every statement is
#: logged with its database and virtual transaction id.
#: log_timezone is set because initdb takes it from $TZ, which Django sets.
LOG_CONF = {"log_statement": "all", "log_line_prefix": "%m|%d|%v|", "log_timezone": "UTC"}
_LOG_LINE = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) UTC\|([^|]*)\|(\d+/\d+)\|LOG:  "
    r"(?:statement|execute [^:]*): (.{0,40})"
)
#: PgBouncer's own health check of a pooled server connection (its default
#: ``server_check_query``): the pooler's transaction, not the workers'.
POOLER_CHECK = "select 1"


def pulpcore_spec(series: str) -> str:
    """``pulpcore>=3.105,<3.106`` for ``"3.105"``: the newest release of a series."""
    match = re.fullmatch(r"(\d+)\.(\d+)", series)
    if match is None:
        raise ValueError(f"a pulpcore series is MAJOR.MINOR, like 3.123, not {series!r}")
    major, minor = int(match[1]), int(match[2])
    return f"pulpcore>={major}.{minor},<{major}.{minor + 1}"


def default_venv(series: str = E2E_SERIES[-1]) -> Path:
    """Where the virtualenv of ``series`` is cached (``$PULP_PUBSUB_E2E_VENV`` is a directory
    holding one per series)."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    base = Path(os.environ.get(VENV_ENV) or Path.home() / ".cache" / "pulp-pubsub")
    return base / f"e2e-pulpcore-{series}-{tag}"


def ensure_venv(
    path: Path, series: str = E2E_SERIES[-1], log: Callable[[str], None] = lambda _: None
) -> Path:
    """A virtualenv with pulpcore of ``series`` from PyPI; made once, then reused."""
    marker = path / ".pulp-pubsub-e2e"
    wanted = " ".join((pulpcore_spec(series), *EXTRA_PACKAGES))
    if not marker.exists() or marker.read_text() != wanted:
        log(f"making {path} with {wanted} (about a minute, once)")
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        subprocess.run(
            [
                str(path / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                pulpcore_spec(series),
                *EXTRA_PACKAGES,
            ],
            check=True,
        )
        marker.write_text(wanted)
    for requirement, module in BACKEND_PACKAGES:
        ensure_package(path, requirement, module, log)
    return path


def ensure_package(
    venv: Path, requirement: str, module: str, log: Callable[[str], None] = lambda _: None
) -> None:
    """``requirement`` in the virtualenv unless ``module`` imports there already.

    For what one scenario alone needs (nats-py, for the outage on the nats backend): added
    to the cached virtualenv, whose marker (and so whose reuse) stays as it was.
    """
    python = str(venv / "bin" / "python")
    if subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode:
        log(f"installing {requirement} into {venv}")
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement],
            check=True,
        )


#: A settings file, or the ``PULP_*`` environment variables that replace one.
Settings = Path | dict[str, str]


def _py(value: Any) -> str:
    return repr(value)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            # Its own process group: the worker and the task process it forked.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        return ""


@dataclass
class Site:
    """One Pulp deployment's files, beside a throwaway PostgreSQL."""

    venv: Path
    postgres: Any  # pulp_pubsub_tools.testing.PostgresServer, started with LOG_CONF
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pulp-e2e-")))
    processes: list[Process] = field(default_factory=list)
    _log: StatementLog | None = None

    def __post_init__(self) -> None:
        for sub in ("media", "tmp", "assets", "certs", "logs", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # pulp_pubsub from this checkout, and the agents' tooling beside it (no tests/, demo/).
        self.pythonpath = self.root / "pythonpath"
        self.pythonpath.mkdir(exist_ok=True)
        for package in (Path(pulp_pubsub.__file__).parent, Path(__file__).parents[1]):
            link = self.pythonpath / package.name
            if not link.exists():
                link.symlink_to(package, target_is_directory=True)
        self.key = self.root / "certs" / "database_fields.symmetric.key"
        if not self.key.exists():
            self.run_python(
                "from cryptography.fernet import Fernet; import sys;"
                "open(sys.argv[1], 'wb').write(Fernet.generate_key())",
                str(self.key),
            )

    # -- files and environment -------------------------------------------------

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def pulpcore_version(self) -> str:
        done = subprocess.run(
            [
                self.bin("python"),
                "-c",
                "from importlib import metadata as m; print(m.version('pulpcore'))",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return done.stdout.strip()

    def run_python(self, code: str, *args: str) -> None:
        subprocess.run([self.bin("python"), "-c", code, *args], check=True)

    def settings(self, name: str, database: dict[str, Any], **values: Any) -> Path:
        """Write a settings file for ``PULP_SETTINGS``; ``values`` are Pulp settings."""
        base: dict[str, Any] = {
            "SECRET_KEY": "pulp-pubsub-e2e-not-secret",
            "CONTENT_ORIGIN": "http://127.0.0.1:24816",
            "ANALYTICS": False,
            "DATABASES": {"default": database},
            "DEPLOY_ROOT": str(self.root),
            "MEDIA_ROOT": str(self.root / "media"),
            "STATIC_ROOT": str(self.root / "assets"),
            "WORKING_DIRECTORY": str(self.root / "tmp"),
            "FILE_UPLOAD_TEMP_DIR": str(self.root / "tmp"),
            "DB_ENCRYPTION_KEY": str(self.key),
        }
        base.update(values)
        path = self.root / "run" / f"{name}.py"
        path.write_text("".join(f"{key} = {_py(value)}\n" for key, value in base.items()))
        return path

    def env(self, settings: Settings, **extra: str) -> dict[str, str]:
        """A process's environment: a settings file, or ``PULP_*`` variables alone.

        With a dict, ``PULP_SETTINGS`` names a file that does not exist, so
        the process is configured through the environment only, as an
        operator of a container image configures Pulp.
        """
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PULP_", "PUBSUB_", "DJANGO_"))
        }
        if isinstance(settings, dict):
            env.update(settings)
            settings = self.root / "run" / "no-settings-file.py"
        env.update(
            PULP_SETTINGS=str(settings),
            DJANGO_SETTINGS_MODULE="pulpcore.app.settings",
            PYTHONPATH=str(self.pythonpath),
            # OpenTelemetry stays on this machine and all but silent.
            OTEL_METRIC_EXPORT_INTERVAL="3600000",
            OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
        )
        env.update(extra)
        return env

    # -- programs ----------------------------------------------------------------

    def manage(self, settings: Settings, *args: str, timeout: float = 300) -> str:
        done = self.manage_run(settings, *args, timeout=timeout)
        if done.returncode:
            # The command line without values of secret options (an admin password).
            shown = " ".join(
                "--password=***" if arg.startswith("--password=") else arg for arg in args
            )
            raise RuntimeError(f"pulpcore-manager {shown} failed:\n{done.stderr[-3000:]}")
        return done.stdout

    def manage_run(
        self, settings: Settings, *args: str, timeout: float = 300, **env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.bin("pulpcore-manager"), *args],
            env=self.env(settings, **env),
            cwd=self.root / "tmp",
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def agent(
        self,
        settings: Settings,
        command: str,
        opts: dict[str, Any],
        timeout: float = 240,
        **env: str,
    ) -> dict[str, Any]:
        done = subprocess.run(
            [
                self.bin("python"),
                "-m",
                "pulp_pubsub_tools.e2e.agent",
                command,
                json.dumps(opts),
            ],
            env=self.env(settings, **env),
            cwd=self.root / "tmp",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        for line in reversed(done.stdout.splitlines()):
            if line.startswith(RESULT_MARK):
                result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
                return result
        raise RuntimeError(
            f"agent {command} gave no result (exit {done.returncode}):\n"
            f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )

    def start_worker(self, name: str, settings: Settings, *args: str, **env: str) -> Process:
        return self.start(name, settings, [self.bin("pulpcore-worker"), *args], **env)

    def start_bridge(self, name: str, settings: Path, postgres_url: str) -> Process:
        module = "pulp_pubsub.contrib.pulpcore.bridge"
        argv = [self.bin("python"), "-m", module, "--postgres-url", postgres_url]
        return self.start(name, settings, argv)

    def start(self, name: str, settings: Settings, argv: list[str], **env: str) -> Process:
        log_path = self.root / "logs" / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv,
                env=self.env(settings, **env),
                cwd=self.root / "tmp",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        threads = [threading.Thread(target=p.stop) for p in self.processes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.processes.clear()

    def cleanup(self) -> None:
        self.stop_all()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- the database ------------------------------------------------------------

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(self.dsn(dbname), autocommit=True)

    def dsn(self, dbname: str) -> str:
        pg = self.postgres
        return f"postgresql://{pg.user}@{pg.host}:{pg.port}/{dbname}"

    def database(self, dbname: str, via: Any = None) -> dict[str, Any]:
        """Django's DATABASES entry for ``dbname``, direct or through a PgBouncer."""
        server = via or self.postgres
        entry: dict[str, Any] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": dbname,
            "USER": self.postgres.user,
            "PASSWORD": "",
            "HOST": server.host,
            "PORT": str(server.port),
        }
        if via is not None:
            entry["DISABLE_SERVER_SIDE_CURSORS"] = True  # transaction pooling needs it
        return entry

    def migrate_template(self) -> float:
        """Create and migrate the database every scenario copies; returns seconds taken."""
        with self.connect() as conn:
            conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
        started = time.monotonic()
        settings = self.settings("migrate", self.database(TEMPLATE_DB))
        self.manage(settings, "migrate", "--noinput")
        return time.monotonic() - started

    def create_database(self, name: str) -> None:
        with self.connect() as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while not predicate():
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name}\n{p.log_tail(15)}" for p in self.processes)
                raise RuntimeError(f"timed out after {timeout} s waiting for {what}\n{tails}")
            pause.wait(0.02)

    def workers_registered(self, dbname: str) -> int:
        with self.connect(dbname) as conn:
            row = conn.execute(
                "SELECT count(*) FROM core_appstatus WHERE app_type = 'worker'"
            ).fetchone()
        return int(row[0]) if row else 0

    def listener_sessions(self, application_name: str, dbname: str) -> int:
        """Sessions of ``dbname`` by that name (a shared PgBouncer keeps other scenarios'
        server connections, with the name their last client gave, in its pool)."""
        with self.connect() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND datname = %s",
                [application_name, dbname],
            ).fetchone()
        return int(row[0]) if row else 0

    def transactions(self, dbname: str, start: float, end: float) -> int:
        """Transactions in ``dbname`` between two ``time.time()`` stamps, from the server log.

        Exact and without the up-to-10-second lag of pg_stat_database: every
        statement is logged with its virtual transaction id.
        """
        statements: dict[str, set[str]] = {}
        for stamp, vxid, text in self.log.read(dbname):
            if start <= stamp < end:
                statements.setdefault(vxid, set()).add(text.strip())
        return sum(1 for texts in statements.values() if texts != {POOLER_CHECK})

    def wait_quiet(self, dbname: str, quiet: float = 1.0, timeout: float = 15.0) -> None:
        """Wait until ``dbname`` has seen no statement for ``quiet`` seconds."""

        def is_quiet() -> bool:
            entries = self.log.read(dbname)
            return not entries or time.time() - entries[-1][0] >= quiet

        self.wait(is_quiet, timeout, f"{dbname} to go quiet")

    @property
    def log(self) -> StatementLog:
        if self._log is None:
            self._log = StatementLog(self.postgres.log_path)
        return self._log


class StatementLog:
    """The server log's statements, per database, read as it grows."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.entries: dict[str, list[tuple[float, str, str]]] = {}

    def read(self, dbname: str) -> list[tuple[float, str, str]]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for next time
        self.offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            match = _LOG_LINE.match(line)
            if match:
                stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
                entry = (stamp.timestamp(), match[3], match[4])
                self.entries.setdefault(match[2], []).append(entry)
        return self.entries.get(dbname, [])


@contextlib.contextmanager
def running(site: Site) -> Iterator[Site]:
    try:
        yield site
    finally:
        site.stop_all()
