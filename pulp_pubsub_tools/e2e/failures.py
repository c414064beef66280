"""The scenarios where Pulp must fail, and fail loudly, with real Pulp processes.

``pooler``: the PostgreSQL backend with every process's Django database behind
PgBouncer in transaction pooling and no ``PUBSUB_URL``. LISTEN cannot work
through the pooler; a worker must say so in its log (naming the pooler and
``PUBSUB_URL``) rather than sit deaf, and ``pubsub_ping`` must exit non-zero.

``fail_closed``: an integration that cannot install (a pulpcore whose seam moved,
made by :mod:`.moved_seam` without touching the installed pulpcore). On Redis,
``pulpcore-worker``, ``pulpcore-api`` and ``pulpcore-content`` must refuse to start
with the check's message and the way out; on PostgreSQL a worker runs stock Pulp
with a WARNING.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pulp_pubsub_tools.testing import free_port

from .operator import WAIT, pulp_environment, responds

#: What the worker's log must say behind the pooler (postgres.PostgresTransport.deaf).
DEAF = "The PostgreSQL subscriber is deaf"
#: What a serving process that fails closed prints (pulp_pubsub.contrib.pulpcore.fail_closed).
REFUSES = "so it refuses to start"
E102 = "pulp_pubsub.E102"
#: A piece of the way out (checks.WAY_OUT), printed with the refusal.
WAY_OUT = "PUBSUB_PULPCORE_INTEGRATION = False"
#: The moved seam's own words in the check (compat.wakeup_reason_problem).
MOVED = "e2e-moved-seam"
NOTIFIES = 10


@dataclass
class PoolerOutcome:
    #: Seconds from starting pulpcore-worker to its log naming the pooler and PUBSUB_URL.
    seconds_to_error: float | None = None
    error: str | None = None
    names_pooler: bool = False
    names_pubsub_url: bool = False
    worker_alive: bool = False
    api_serves: bool = False
    ping: int | None = None
    ping_says: str = ""
    #: A subscriber of the same configuration, sent direct pg_notify wake-ups.
    hear: dict[str, Any] = field(default_factory=dict)


@dataclass
class FailClosedOutcome:
    check: int | None = None
    check_names_seam: bool = False
    #: Per program: exit code (None: still running), refusal and way out in its output.
    refused: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: pulpcore-worker on the postgres backend: running stock, with a WARNING.
    postgres_worker: dict[str, Any] = field(default_factory=dict)


def _first_line(text: str, needle: str) -> str | None:
    return next((line.strip() for line in text.splitlines() if needle in line), None)


class Pooler:
    def __init__(self, run: Any) -> None:
        self.run, self.site, self.db = run, run.site, "pooler"

    def __call__(self) -> PoolerOutcome:
        site, out = self.site, PoolerOutcome()
        api_port, content_port = free_port(), free_port()
        site.create_database(self.db)
        # No PULP_PUBSUB_URL: the listener takes Django's connection, through the pooler.
        env = pulp_environment(
            site, self.db, self.run.bouncer, content_port, PULP_PUBSUB_BACKEND="postgres"
        )
        started = time.monotonic()
        worker = site.start_worker("pooler-worker", env, "--name-template", "pooler@pooler")
        api = site.start(
            "pooler-api",
            env,
            [site.bin("pulpcore-api"), "--bind", f"127.0.0.1:{api_port}", "--workers", "1"],
        )
        site.wait(lambda: DEAF in worker.log_tail(400), WAIT, "the worker to report deafness")
        out.seconds_to_error = time.monotonic() - started
        text = worker.log_tail(400)
        out.error = _first_line(text, DEAF)
        out.names_pooler = "PgBouncer" in (out.error or "")
        out.names_pubsub_url = "PUBSUB_URL" in (out.error or "")
        status = f"http://127.0.0.1:{api_port}/pulp/api/v3/status/"
        site.wait(lambda: responds(status), WAIT, "pulpcore-api")
        out.api_serves = api.popen.poll() is None
        ping = site.manage_run(env, "pubsub_ping", "--expect-subscribers", "1")
        out.ping = ping.returncode
        out.ping_says = (ping.stderr.strip().splitlines() or [""])[-1][-600:]
        out.hear = site.agent(
            env, "hear", {"direct_dsn": site.dsn(self.db), "notifies": NOTIFIES, "timeout": WAIT}
        )
        out.worker_alive = worker.popen.poll() is None
        site.stop_all()
        return out


class FailClosed:
    def __init__(self, run: Any) -> None:
        self.run, self.site, self.db = run, run.site, "fail_closed"

    def __call__(self) -> FailClosedOutcome:
        site, out = self.site, FailClosedOutcome()
        site.create_database(self.db)
        shim = site.root / "moved-seam"
        shim.mkdir(exist_ok=True)
        shutil.copy(Path(__file__).with_name("moved_seam.py"), shim / "sitecustomize.py")
        path = {"PYTHONPATH": f"{shim}:{site.pythonpath}"}
        content_port = free_port()
        redis = pulp_environment(
            site,
            self.db,
            self.run.bouncer,
            content_port,
            PULP_PUBSUB_BACKEND="redis",
            PULP_PUBSUB_URL=self.run.redis_url,
            PULP_PUBSUB_CHANNEL_PREFIX="fail_closed.",
        )
        check = site.manage_run(redis, "check", **path)
        out.check = check.returncode
        out.check_names_seam = E102 in check.stderr and MOVED in check.stderr

        programs = {
            "pulpcore-worker": [site.bin("pulpcore-worker")],
            "pulpcore-api": [
                site.bin("pulpcore-api"),
                "--bind",
                f"127.0.0.1:{free_port()}",
                "--workers",
                "1",
            ],
            "pulpcore-content": [
                site.bin("pulpcore-content"),
                "--bind",
                f"127.0.0.1:{content_port}",
                "--workers",
                "1",
            ],
        }
        started = time.monotonic()
        processes = {
            name: site.start(f"fail_closed-{name}", redis, argv, **path)
            for name, argv in programs.items()
        }
        exited: dict[str, float] = {}

        def all_exited() -> bool:
            for name, process in processes.items():
                if name not in exited and process.popen.poll() is not None:
                    exited[name] = time.monotonic() - started
            return len(exited) == len(processes)

        site.wait(all_exited, WAIT, "the serving programs to refuse to start")
        for name, process in processes.items():
            text = process.log_tail(400)
            out.refused[name] = {
                "exit": process.popen.returncode,
                "refuses": REFUSES in text and MOVED in text,
                "way_out": WAY_OUT in text,
                "seconds": exited[name],
                "says": _first_line(text, REFUSES),
            }
        site.stop_all()

        # The same wire as stock: the worker runs stock Pulp, with a WARNING. Its LISTEN
        # is pulpcore's own, so its database connection is direct.
        postgres = pulp_environment(
            site, self.db, site.postgres, content_port, PULP_PUBSUB_BACKEND="postgres"
        )
        worker = site.start_worker(
            "fail_closed-postgres-worker", postgres, "--name-template", "stock@fail_closed", **path
        )
        site.wait(lambda: site.workers_registered(self.db) == 1, WAIT, "the stock worker")
        text = worker.log_tail(400)
        warning = _first_line(text, E102)
        out.postgres_worker = {
            "running": worker.popen.poll() is None,
            "warning": warning is not None and "WARNING" in warning,
            "says": warning,
        }
        site.stop_all()
        return out
