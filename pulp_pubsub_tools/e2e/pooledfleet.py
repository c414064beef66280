"""What the fleets on another backend behind PgBouncer share: sampled sessions, one verdict.

A fleet's database goes through PgBouncer in transaction pooling mode; while its
tasks are driven and it idles, :class:`SessionSampler` watches how many sessions
PostgreSQL holds for that database, which is what the pooler is there to bound.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from .figures import Verdict
    from .scenarios import Outcome, Run
    from .site import Settings

#: The sessions of a relay (its LISTEN), counted apart.
RELAY_APPLICATION_NAME = "pulp-pubsub relay"
#: The drive agent's own direct connection (it watches the task table), not counted.
OBSERVER_APPLICATION_NAME = "pulp-e2e observer"


class SessionSampler:
    """The most PostgreSQL sessions on one database at once, sampled every 50 ms.

    The run's own direct connections (the drive agent's observer, and this
    sampler's, which is on another database) are not counted.
    """

    def __init__(self, run: Run, dbname: str) -> None:
        self.site, self.dbname = run.site, dbname
        self.most = 0
        self.most_relay = 0
        self.samples = 0
        #: The sessions seen when the most were: application name, client port, state, query.
        self.at_most: list[tuple[str, int | None, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="e2e-sessions", daemon=True)

    def __enter__(self) -> SessionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        # On the 'postgres' database, so this connection is not counted.
        with self.site.connect() as conn:
            while not self._stop.wait(0.05):
                rows = conn.execute(
                    "SELECT application_name, client_port, state, left(query, 60) "
                    "FROM pg_stat_activity WHERE datname = %s AND backend_type = "
                    "'client backend' AND application_name <> %s",
                    [self.dbname, OBSERVER_APPLICATION_NAME],
                ).fetchall()
                relays = sum(1 for row in rows if row[0] == RELAY_APPLICATION_NAME)
                if len(rows) > self.most:
                    self.most, self.at_most = len(rows), [tuple(row) for row in rows]
                self.most_relay = max(self.most_relay, relays)
                self.samples += 1


def drive_sampled(run: Run, outcome: Outcome, db: str, api: Settings) -> SessionSampler:
    """Drive the fleet's tasks and let it idle while its sessions are sampled, stop it, put
    the figures in ``outcome`` and ``outcome`` in the run's report."""
    observer = f"{run.site.dsn(db)}?application_name={quote(OBSERVER_APPLICATION_NAME)}"
    with SessionSampler(run, db) as sessions:
        run.drive(outcome, db, api, burst_seconds=0.5, observer_dsn=observer)
        run.idle({db: outcome}, run.config.contrast_idle_seconds)
    run.site.stop_all()
    outcome.integration = {
        **(outcome.integration or {}),
        "postgres_sessions_most": sessions.most,
        "session_samples": sessions.samples,
        "sessions_at_most": sessions.at_most,
        "pool_size": run.config.pool_size,
    }
    if sessions.most_relay:
        outcome.integration["relay_sessions_most"] = sessions.most_relay
    relays = f" + {sessions.most_relay} relay" if sessions.most_relay else ""
    outcome.notes.append(
        f"PostgreSQL sessions on the fleet's database, most at once: {sessions.most} "
        f"(pool {run.config.pool_size}{relays}; {sessions.samples} samples)"
    )
    run.report.outcomes[db] = outcome
    return sessions


def fleet_verdict(label: str, outcome: Outcome) -> Verdict:
    """Every task started and finished, and both cancels (running, queued) arrived."""
    from .figures import Verdict

    cancel = outcome.cancel or {}
    waiting = outcome.cancel_waiting or {}
    return Verdict(
        f"{label}: every task starts and finishes, cancels arrive",
        bool(outcome.tasks)
        and outcome.finished == len(outcome.tasks)
        and cancel.get("state") == "canceled"
        and waiting.get("second") == "canceled",
        f"{outcome.finished}/{len(outcome.tasks)}; running task {cancel.get('state')}, "
        f"queued task {waiting.get('second')}; ran on {outcome.workers_used}",
    )
