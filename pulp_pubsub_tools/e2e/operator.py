"""The ``operator`` scenario: Pulp as an operator runs it, configured by ``PULP_*`` alone.

Real ``pulpcore-api``, ``pulpcore-content`` and ``pulpcore-worker`` processes
on the Redis backend, their database connections through PgBouncer in
transaction pooling mode, every setting in the environment. In order:

1. ``admin``: ``pulpcore-manager check``, ``migrate``, ``showmigrations``,
   ``pubsub_channels`` and ``pubsub_ping --expect-subscribers`` (with the
   workers up) exit 0 with the integration on.
2. ``rest_cancel``: a running task canceled with ``PATCH /pulp/api/v3/tasks/<id>/``.
3. ``forged_cancel``: ``PUBLISH pulp_worker_cancel <running task id>`` straight to
   Redis, with no cancel in the database: the task must complete.
4. ``outage``: Redis stopped for ``outage_seconds`` while tasks are dispatched
   through the REST API; every request must be accepted, no process may exit,
   and every task must start during the outage: the workers' subscribers are
   degraded meanwhile, a resync every ``outage_interval``, and look for work on it.
   A task running when the server went is canceled through the REST API during the
   outage, and must end canceled before the server is back.

:class:`NatsOperator` runs that outage again on the ``nats`` backend (the
``operator_nats`` scenario): the same Pulp, a throwaway nats-server stopped instead.
"""

from __future__ import annotations

import base64
import http.cookiejar
import json
import secrets
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from pulp_pubsub_tools.testing import free_port

ADMIN_COMMANDS = (
    ("check",),
    ("migrate", "--noinput"),
    ("showmigrations",),
    ("pubsub_channels",),
)
PREFIX = "operator."
#: How long a step may take on a loaded CI machine before the run gives up (not a figure).
WAIT = 120.0
#: Long enough to be seen running (the dispatching agent's exit takes seconds on a busy
#: machine) and forged at, short enough to wait for.
FORGED_TASK_SECONDS = 15
FINAL = ("completed", "failed", "canceled")


def pulp_environment(
    site: Any, db: str, server: Any, content_port: int, **pubsub: str
) -> dict[str, str]:
    """A Pulp process's whole configuration as ``PULP_*`` variables, the integration on.

    ``server`` is where Django's database connections go (the PostgreSQL server or a
    PgBouncer in front of it); ``pubsub`` adds ``PULP_PUBSUB_*`` variables.
    """
    env = {
        "PULP_SECRET_KEY": secrets.token_urlsafe(32),
        "PULP_CONTENT_ORIGIN": f"http://127.0.0.1:{content_port}",
        "PULP_ANALYTICS": "false",
        "PULP_DATABASES__default__ENGINE": "django.db.backends.postgresql",
        "PULP_DATABASES__default__NAME": db,
        "PULP_DATABASES__default__USER": site.postgres.user,
        "PULP_DATABASES__default__HOST": server.host,
        "PULP_DATABASES__default__PORT": str(server.port),
        "PULP_DEPLOY_ROOT": str(site.root),
        "PULP_MEDIA_ROOT": str(site.root / "media"),
        "PULP_STATIC_ROOT": str(site.root / "assets"),
        "PULP_WORKING_DIRECTORY": str(site.root / "tmp"),
        "PULP_FILE_UPLOAD_TEMP_DIR": str(site.root / "tmp"),
        "PULP_DB_ENCRYPTION_KEY": str(site.key),
        "PULP_INSTALLED_APPS": "@merge pulp_pubsub",
        **pubsub,
    }
    if server is not site.postgres:  # transaction pooling needs it
        env["PULP_DATABASES__default__DISABLE_SERVER_SIDE_CURSORS"] = "true"
    return env


def responds(url: str) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.HTTPError, OSError):
        return False


@dataclass
class OperatorOutcome:
    admin: dict[str, int] = field(default_factory=dict)
    ping: int | None = None
    serving: dict[str, bool] = field(default_factory=dict)
    rest_cancel: dict[str, Any] | None = None
    forged_cancel: dict[str, Any] | None = None
    outage: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)


class Operator:
    #: The backend the scenario configures, and what the verdicts call its server.
    backend = "redis"
    server_name = "Redis"

    def __init__(self, run: Any, workers: int = 2, outage_seconds: float = 60.0) -> None:
        self.run = run
        self.site = run.site
        self.workers = workers
        self.outage_seconds = outage_seconds
        self.db = "operator"
        self.password = secrets.token_urlsafe(24)  # never printed
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.outcome = OperatorOutcome()

    # -- configuration ---------------------------------------------------------------

    def environment(self) -> dict[str, str]:
        return pulp_environment(
            self.site,
            self.db,
            self.run.bouncer,
            self.content_port,
            PULP_PUBSUB_BACKEND=self.backend,
            PULP_PUBSUB_URL=self.server().url,
            PULP_PUBSUB_CHANNEL_PREFIX=PREFIX,
        )

    def server(self) -> Any:
        """The pub/sub server the outage stops."""
        return self.run.redis_server

    # -- HTTP --------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, basic: bool = False
    ) -> tuple[int, Any]:
        """One API call: with the session of :meth:`login`, or with basic authentication.

        Basic authentication hashes the password on every request (Django's PBKDF2,
        most of a second on a busy 2-core machine), so the measured calls use the
        session, as Pulp's web UI does.
        """
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", data=data, method=method
        )
        if basic:
            token = base64.b64encode(f"admin:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        csrf = next((c.value for c in self.cookies if c.name == "csrftoken"), None)
        if csrf and method not in ("GET", "HEAD"):
            request.add_header("X-CSRFToken", csrf)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self.opener.open(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()[:300].decode(errors="replace")
        except OSError as exc:
            return 0, str(exc)

    def login(self) -> int:
        code, _ = self.request("POST", "/pulp/api/v3/login/", {}, basic=True)
        return code

    def responds(self, url: str) -> bool:
        return responds(url)

    # -- the database --------------------------------------------------------------------

    def task(self, pk: str) -> dict[str, Any]:
        with self.site.connect(self.db) as conn:
            row = conn.execute(
                "SELECT state, extract(epoch FROM started_at), extract(epoch FROM finished_at)"
                " FROM core_task WHERE pulp_id = %s",
                [pk],
            ).fetchone()
        if row is None:
            return {"state": None, "started": None, "finished": None}
        started, finished = (None if v is None else float(v) for v in row[1:])
        return {"state": row[0], "started": started, "finished": finished}

    def dispatch_sleep(self, env: dict[str, str], seconds: float) -> str:
        return str(self.site.agent(env, "dispatch", {"seconds": seconds})["task"])

    def wait_state(self, pk: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        self.site.wait(lambda: self.task(pk)["state"] in states, timeout, f"task in {states}")
        return self.task(pk)

    def settled(self, pk: str, timeout: float) -> dict[str, Any]:
        """The task once it is final, or as it is at ``timeout`` (a verdict, not a crash)."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while self.task(pk)["state"] not in FINAL and time.monotonic() < deadline:
            pause.wait(0.2)  # polling the database, which signals nothing
        return self.task(pk)

    # -- the scenario --------------------------------------------------------------------

    def __call__(self) -> OperatorOutcome:
        site, out = self.site, self.outcome
        self.api_port, self.content_port = free_port(), free_port()
        site.create_database(self.db)
        env = self.environment()
        for args in ADMIN_COMMANDS:
            done = site.manage_run(env, *args)
            out.admin[" ".join(args[:1])] = done.returncode
            if done.returncode:
                out.problems.append(f"{args[0]}: {done.stderr[-1500:]}")
        # One argument: a random password may begin with "-", which argparse takes for an option.
        site.manage(env, "reset-admin-password", f"--password={self.password}")

        for i in range(self.workers):
            site.start_worker(f"operator-worker{i}", env, "--name-template", f"op{i}@operator")
        api = site.start(
            "operator-api",
            env,
            [site.bin("pulpcore-api"), "--bind", f"127.0.0.1:{self.api_port}", "--workers", "1"],
        )
        content = site.start(
            "operator-content",
            env,
            [
                site.bin("pulpcore-content"),
                "--bind",
                f"127.0.0.1:{self.content_port}",
                "--workers",
                "1",
            ],
        )
        site.wait(lambda: site.workers_registered(self.db) == self.workers, WAIT, "workers")
        site.wait(
            lambda: self.run.redis_subscribers(f"{PREFIX}pulp_worker_wakeup") == self.workers,
            WAIT,
            "workers subscribed",
        )
        status = f"http://127.0.0.1:{self.api_port}/pulp/api/v3/status/"
        site.wait(lambda: self.responds(status), WAIT, "pulpcore-api")
        site.wait(
            lambda: self.responds(f"http://127.0.0.1:{self.content_port}/pulp/content/"),
            WAIT,
            "pulpcore-content",
        )
        out.serving = {"api": api.popen.poll() is None, "content": content.popen.poll() is None}
        ping = site.manage_run(env, "pubsub_ping", "--expect-subscribers", str(self.workers))
        out.ping = ping.returncode
        if ping.returncode:
            out.problems.append(f"pubsub_ping: {ping.stderr[-800:]}")

        self.rest_cancel(env)
        self.forged_cancel(env)
        self.outage(env)
        out.serving["after_outage"] = all(p.popen.poll() is None for p in site.processes)
        site.stop_all()
        return out

    def rest_cancel(self, env: dict[str, str]) -> None:
        self.outcome.serving["login"] = self.login() == 201
        # The API's first request loads its views: not the cancel's cost.
        self.request("GET", "/pulp/api/v3/tasks/?limit=1")
        pk = self.dispatch_sleep(env, 30)
        self.wait_state(pk, ("running",), WAIT)
        sent = time.time()
        code, _ = self.request("PATCH", f"/pulp/api/v3/tasks/{pk}/", {"state": "canceled"})
        answered = time.time()
        final = self.wait_state(pk, FINAL, WAIT)
        finished = final["finished"]
        self.outcome.rest_cancel = {
            "http": code,
            "state": final["state"],
            "latency": None if finished is None else finished - sent,
            "http_seconds": answered - sent,
        }

    def forged_cancel(self, env: dict[str, str]) -> None:
        import redis

        pk = self.dispatch_sleep(env, FORGED_TASK_SECONDS)
        seen = self.wait_state(pk, ("running", *FINAL), WAIT)["state"]
        if seen != "running":  # the agent's exit outlasted the task: nothing to forge at
            self.outcome.forged_cancel = {"receivers": 0, "state": f"not seen running ({seen})"}
            return
        client = redis.Redis.from_url(self.run.redis_url)
        try:
            receivers = int(client.publish(f"{PREFIX}pulp_worker_cancel", pk))
        finally:
            client.close()
        refused = f"Ignored a cancel message for task {pk}"
        self.site.wait(
            lambda: any(refused in p.log_tail(200) for p in self.site.processes),
            WAIT,
            "a worker to refuse the forged cancel",
        )
        final = self.wait_state(pk, FINAL, WAIT)
        self.outcome.forged_cancel = {
            "receivers": receivers,
            "refused": True,
            "state": final["state"],
        }

    def outage(self, env: dict[str, str], tasks: int = 5) -> None:
        # A task running when the server goes, canceled during the outage.
        running = self.dispatch_sleep(env, 3 * self.outage_seconds + WAIT)
        self.wait_state(running, ("running",), WAIT)
        server = self.server()
        stopped = time.time()
        server.stop()
        codes, hrefs, sent = [], [], []
        for _ in range(tasks):
            asked = time.time()
            code, body = self.request(
                "POST", "/pulp/api/v3/orphans/cleanup/", {"orphan_protection_time": 0}
            )
            codes.append(code)
            if isinstance(body, dict) and body.get("task"):
                hrefs.append(str(body["task"]).rstrip("/").rsplit("/", 1)[-1])
                sent.append(asked)
        cancel_sent = time.time()
        cancel_code, _ = self.request(
            "PATCH", f"/pulp/api/v3/tasks/{running}/", {"state": "canceled"}
        )
        left = self.outage_seconds - (time.time() - stopped)
        if left > 0:
            threading.Event().wait(left)  # the length of the outage, not a synchronisation
        server.start()
        back = time.time()
        # They share orphan cleanup's exclusive lock, so they run one after another:
        # the first start measures the wake-up, the rest is the tasks' own work.
        finals = [self.wait_state(pk, FINAL, 3 * WAIT) for pk in hrefs]
        canceled = self.settled(running, WAIT)
        ended = canceled["finished"]
        starts = [f["started"] for f in finals if f["started"] is not None]
        last = max((f["finished"] or back for f in finals), default=back)
        self.outcome.outage = {
            "seconds_down": back - stopped,
            "accepted": sum(1 for c in codes if c == 202),
            "requests": tasks,
            "completed": sum(1 for f in finals if f["state"] == "completed"),
            "started_during": sum(1 for start in starts if start < back),
            # From each POST to its task's start: on degraded mode's resyncs, one after
            # another (the tasks share orphan cleanup's exclusive lock).
            "start_delays": sorted(
                f["started"] - asked
                for f, asked in zip(finals, sent, strict=True)
                if f["started"] is not None
            ),
            "first_start_after_return": min(starts) - back if starts else None,
            "done_after_return": last - back,
            # The PATCH of a task running since before the outage, sent during it.
            "cancel": {
                "http": cancel_code,
                "state": canceled["state"],
                "latency": None if ended is None else ended - cancel_sent,
                "during": ended is not None and ended < back,
            },
        }


class NatsOperator(Operator):
    """The outage on the ``nats`` backend: a throwaway nats-server stopped for a while.

    The same Pulp as :class:`Operator` (API, workers, PgBouncer, ``PULP_*`` only), less
    the checks that are not about the outage (admin commands, the content app, the
    forged cancel, which Redis showed).
    """

    backend = "nats"
    server_name = "NATS"

    def __init__(self, run: Any, workers: int = 2, outage_seconds: float = 60.0) -> None:
        from pulp_pubsub_tools.testing import NatsServer

        super().__init__(run, workers, outage_seconds)
        self.db = "operator_nats"
        self.nats = NatsServer()

    def server(self) -> Any:
        return self.nats

    def subscribed(self) -> int:
        """Connections subscribed to the wake-up subject (from the server's monitoring)."""
        from pulp_pubsub.backends.nats.names import escape_token

        subject = f"{escape_token(PREFIX)}.pulp_worker_wakeup"
        return sum(
            1
            for conn in self.nats.connections()
            if subject in (conn.get("subscriptions_list") or [])
        )

    def __call__(self) -> OperatorOutcome:
        from .site import ensure_package

        site, out = self.site, self.outcome
        ensure_package(site.venv, "nats-py>=2.6", "nats")
        self.nats.start()
        try:
            self.api_port, self.content_port = free_port(), free_port()
            site.create_database(self.db)
            env = self.environment()
            site.manage(env, "reset-admin-password", f"--password={self.password}")
            for i in range(self.workers):
                site.start_worker(f"opnats-worker{i}", env, "--name-template", f"n{i}@opnats")
            argv = [site.bin("pulpcore-api"), "--bind", f"127.0.0.1:{self.api_port}"]
            site.start("opnats-api", env, [*argv, "--workers", "1"])
            site.wait(lambda: site.workers_registered(self.db) == self.workers, WAIT, "workers")
            site.wait(lambda: self.subscribed() == self.workers, WAIT, "workers subscribed")
            status = f"http://127.0.0.1:{self.api_port}/pulp/api/v3/status/"
            site.wait(lambda: self.responds(status), WAIT, "pulpcore-api")
            out.serving["login"] = self.login() == 201
            self.outage(env)
            out.serving["after_outage"] = all(p.popen.poll() is None for p in site.processes)
        finally:
            site.stop_all()
            self.nats.cleanup()
        return out
