"""``zookeeper_pgbouncer``: real pulpcore workers on the ZooKeeper backend, behind PgBouncer.

A throwaway ZooKeeper server, and K workers and the dispatching API settings
configured by ``PULP_*`` environment variables alone (``PULP_PUBSUB_BACKEND=zookeeper``,
``PULP_PUBSUB_URL=zk://...``), Django's database through PgBouncer in transaction
pooling mode with a pool smaller than K. Wake-ups and cancels travel through
ZooKeeper only, so nothing but the pool's sessions reaches PostgreSQL: shown by
sampling its sessions throughout, and by counting the NOTIFYs it sees (none).
The fleet counts as subscribed when ``pubsub_ping --expect-subscribers K`` says so.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from .operator import pulp_environment
from .pooledfleet import drive_sampled, fleet_verdict
from .scenarios import Outcome

if TYPE_CHECKING:
    from .figures import Verdict
    from .scenarios import Report, Run

NAME = "zookeeper_pgbouncer"


def zookeeper_pgbouncer(run: Run) -> None:
    from pulp_pubsub_tools.testing import ZookeeperServer
    from pulp_pubsub_tools.testing.processes import free_port

    if importlib.util.find_spec("kazoo") is None:
        raise RuntimeError(
            "the zookeeper scenario needs kazoo (pip install 'pulp-pubsub[zookeeper]')"
        )
    site, config = run.site, run.config
    k, pool, db = config.workers, config.pool_size, NAME
    run.log(
        f"zookeeper-pgbouncer: a ZooKeeper server, {k} integrated workers on the zookeeper "
        f"backend, PULP_* only (PgBouncer transaction pool of {pool})"
    )
    outcome = Outcome(db, "pulp-pubsub, ZooKeeper backend", k, f"PgBouncer txn, pool {pool}")
    server = ZookeeperServer()
    try:
        server.start(timeout=90)
        env = pulp_environment(
            site,
            db,
            run.bouncer,
            free_port(),
            PULP_PUBSUB_BACKEND="zookeeper",
            PULP_PUBSUB_URL=server.url,
        )
        site.create_database(db)
        for i in range(k):
            site.start_worker(f"{db}-zk{i}", env, "--name-template", f"zk{i}@{db}")
        site.wait(lambda: site.workers_registered(db) == k, 90, f"{db} workers")
        site.wait(
            lambda: (
                site.manage_run(env, "pubsub_ping", "--expect-subscribers", str(k)).returncode == 0
            ),
            60,
            f"{db} workers subscribed",
        )
        drive_sampled(run, outcome, db, env)
    finally:
        server.cleanup()


def zookeeper_verdicts(report: Report) -> list[Verdict]:
    from .figures import Verdict

    outcome = report.outcomes.get(NAME)
    if outcome is None:
        return []
    info = outcome.integration or {}
    most, pool = info.get("postgres_sessions_most"), info.get("pool_size")
    stray = sum((outcome.stray_notifies or {}).values())
    return [
        fleet_verdict("zookeeper-pgbouncer", outcome),
        Verdict(
            "zookeeper-pgbouncer: PostgreSQL sessions <= pool, no NOTIFY reaches it",
            most is not None and pool is not None and most <= pool and stray == 0,
            f"most at once {most} (pool {pool}); NOTIFYs {stray}",
        ),
    ]
