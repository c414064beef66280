"""``relay_pgbouncer``: real pulpcore workers on the relay backend, behind PgBouncer.

One ``pubsub_relay`` (``pulpcore-manager pubsub_relay``, the Django database
direct, its one LISTEN session) and K workers and an API process whose Django
database goes through PgBouncer in transaction pooling mode with a pool smaller
than K. Publishing is the relay's default ``pg_notify`` mode, so a dispatch's
wake-up goes out at commit from PostgreSQL, through the pooler, to the relay.
Shown: every task starts and finishes, cancels arrive, and PostgreSQL holds no
more sessions for the fleet's database than the pool plus the relay, sampled
throughout.
"""

from __future__ import annotations

import importlib.util
import secrets
import time
from typing import TYPE_CHECKING

from .pooledfleet import drive_sampled, fleet_verdict
from .scenarios import Outcome

if TYPE_CHECKING:
    from .figures import Verdict
    from .scenarios import Report, Run

NAME = "relay_pgbouncer"


def relay_clients(url: str, token: str) -> int:
    """How many clients the relay has, this one included; -1 when it does not answer."""
    from pulp_pubsub.backends.relay.protocol import RelayConnection
    from pulp_pubsub.exceptions import ConnectionLost

    deadline = time.monotonic() + 5.0
    try:
        conn = RelayConnection(url, token, 5.0, None)
    except ConnectionLost:
        return -1
    try:
        conn.send(deadline, type="ping", id=1)
        while True:
            for frame in conn.read():
                if frame.get("type") == "pong":
                    return int(frame.get("clients", -1))
            if not conn.wait(deadline):
                return -1
    except ConnectionLost:
        return -1
    finally:
        conn.close()


def relay_pgbouncer(run: Run) -> None:
    from pulp_pubsub_tools.testing.processes import free_port

    if importlib.util.find_spec("websockets") is None:
        raise RuntimeError("the relay scenario needs websockets (pip install 'pulp-pubsub[relay]')")
    site, config = run.site, run.config
    k, pool, db = config.workers, config.pool_size, NAME
    run.log(
        f"relay-pgbouncer: one pubsub_relay, {k} integrated workers on the relay backend "
        f"(pg_notify; PgBouncer transaction pool of {pool})"
    )
    outcome = Outcome(db, "pulp-pubsub, relay backend", k, f"PgBouncer txn, pool {pool}")
    url, token = f"ws://127.0.0.1:{free_port()}", secrets.token_urlsafe(16)
    layer = run.integrated(
        PUBSUB_BACKEND="relay",
        PUBSUB_URL=url,
        PUBSUB_RELAY_TOKEN=token,
        OTEL_ENABLED=True,
    )
    workers = run.pulp_settings(f"{db}-worker", db, via_bouncer=True, **layer)
    api = run.pulp_settings(f"{db}-api", db, via_bouncer=True, **layer)
    # The relay's own session goes to PostgreSQL itself, never through the pooler.
    relay_settings = run.pulp_settings(f"{db}-relay", db, via_bouncer=False, **layer)
    site.create_database(db)
    site.start(
        f"{db}-relay",
        relay_settings,
        [site.bin("pulpcore-manager"), "pubsub_relay", "--bind", url.removeprefix("ws://")],
    )
    site.wait(lambda: relay_clients(url, token) >= 1, 60, "the relay")
    for i in range(k):
        site.start_worker(f"{db}-relay{i}", workers, "--name-template", f"relay{i}@{db}")
    # (Its direct connections come and go before the sessions are sampled.)
    site.wait(lambda: site.workers_registered(db) == k, 90, f"{db} workers")
    # Every worker holds one WebSocket; the asking one is the (k+1)th client.
    site.wait(lambda: relay_clients(url, token) == k + 1, 30, f"{db} workers subscribed")
    drive_sampled(run, outcome, db, api)


def relay_verdicts(report: Report) -> list[Verdict]:
    from .figures import Verdict

    outcome = report.outcomes.get(NAME)
    if outcome is None:
        return []
    info = outcome.integration or {}
    most, relays, pool = (
        info.get("postgres_sessions_most"),
        info.get("relay_sessions_most"),
        info.get("pool_size"),
    )
    return [
        fleet_verdict("relay-pgbouncer", outcome),
        Verdict(
            "relay-pgbouncer: PostgreSQL sessions <= pool + relays",
            most is not None and pool is not None and relays == 1 and most <= pool + relays,
            f"most at once {most} (pool {pool}, relays {relays})",
        ),
    ]
