"""What the servers themselves say: PostgreSQL sessions and transactions, Redis clients.

The monitor is a plain autocommit psycopg connection of the parent process.
Transactions are read from a second connection to another database of the
server (``template1``), so the reading itself adds nothing to the count. Where
that database cannot be reached (a server given by URL may not allow it), the
monitor reads from its own database and leaves its own statements out, which
PostgreSQL's lazily published counters make exact only to a transaction or two.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from . import BenchError

#: The benchmark's own tables: created with raw SQL, so the bench works in any project.
TABLES = (
    "CREATE TABLE IF NOT EXISTS pubsub_bench_event ("
    " id bigserial PRIMARY KEY, note text NOT NULL,"
    " created timestamptz NOT NULL DEFAULT now()) WITH (autovacuum_enabled = false)",
    "CREATE TABLE IF NOT EXISTS pubsub_bench_task ("
    " id bigserial PRIMARY KEY, created timestamptz NOT NULL DEFAULT now())"
    " WITH (autovacuum_enabled = false)",
)
EVENT_INSERT = "INSERT INTO pubsub_bench_event (note) VALUES (%s)"
TASK_INSERT = "INSERT INTO pubsub_bench_task DEFAULT VALUES RETURNING id"
TASK_POLL = "SELECT id FROM pubsub_bench_task WHERE id > %s ORDER BY id"
TASK_MAX = "SELECT coalesce(max(id), 0) FROM pubsub_bench_task"


@dataclass
class XactMark:
    value: int
    statements: int
    at: float


class Monitor:
    def __init__(self, url: str) -> None:
        from psycopg.conninfo import make_conninfo

        self.url = url
        try:
            self.conn = _connect(url)
        except Exception as exc:
            raise BenchError(f"Cannot connect to the benchmark's PostgreSQL: {exc}") from exc
        self.statements = 0
        self.version = str(self._one("SHOW server_version"))
        self.dbname = str(self.conn.info.dbname)
        self._can_flush = self.conn.info.server_version >= 150000
        self._reader: Any = None
        for other in ("template1", "postgres"):
            if other != self.dbname:
                with contextlib.suppress(Exception):
                    self._reader = _connect(make_conninfo(url, dbname=other))
                    break

    def _one(self, query: str, params: Any = None) -> Any:
        self.statements += 1
        row = self.conn.execute(query, params).fetchone()
        return row[0] if row else None

    def create_tables(self) -> None:
        for statement in TABLES:
            self.statements += 1
            self.conn.execute(statement)
        self.statements += 1
        self.conn.execute("TRUNCATE pubsub_bench_event, pubsub_bench_task")

    def drop_tables(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.execute("DROP TABLE IF EXISTS pubsub_bench_event, pubsub_bench_task")

    def free_connections(self) -> int:
        limit = int(self._one("SHOW max_connections"))
        reserved = int(self._one("SHOW superuser_reserved_connections"))
        used = int(
            self._one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
        )
        return limit - reserved - used

    def sessions(self) -> dict[str, int]:
        """Client sessions on this database other than ours, by application_name."""
        self.statements += 1
        rows = self.conn.execute(
            "SELECT application_name, count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND datname = current_database()"
            " AND pid <> pg_backend_pid() GROUP BY 1"
        ).fetchall()
        return {str(name): int(n) for name, n in rows}

    def wait_gone(self, prefix: str, timeout: float = 15.0) -> None:
        """Wait until no session named ``prefix...`` is left, so ended agents add nothing later.

        A backend reports its last counters as it exits, just after it leaves
        ``pg_stat_activity``; the short pause covers that.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(name.startswith(prefix) for name in self.sessions()):
                break
            time.sleep(0.05)
        time.sleep(0.2)

    def _flush_own_stats(self) -> None:
        # PostgreSQL 15+ publishes a session's counters at most once a second;
        # forcing our own makes the count exact at both ends of a window.
        if self._can_flush:
            self._one("SELECT pg_stat_force_next_flush()")

    def xact_mark(self) -> XactMark:
        # Publish our own counters now: left pending, they would land inside the window.
        self._flush_own_stats()
        value = self._xacts()
        return XactMark(value, self.statements, time.monotonic())

    def xacts_since(self, mark: XactMark) -> tuple[int, float]:
        """Transactions of others on this database since ``mark``, and the seconds elapsed."""
        elapsed = time.monotonic() - mark.at
        if self._reader is not None:
            return max(0, self._xacts() - mark.value), elapsed
        self._flush_own_stats()
        value = self._xacts()
        # Ours in between: the read that made ``mark``, anything since, and the
        # flush just now; not the read just now (a session sees its own only later).
        own = self.statements - mark.statements
        return max(0, value - mark.value - own), elapsed

    def _xacts(self) -> int:
        query = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s"
        if self._reader is not None:
            return int(self._reader.execute(query, [self.dbname]).fetchone()[0])
        return int(self._one(query, [self.dbname]))

    def insert_task(self) -> int:
        return int(self._one(TASK_INSERT))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self.conn.close()


def _connect(url: str) -> Any:
    import psycopg

    # Never prepared: preparing a statement is a transaction of its own.
    return psycopg.connect(url, autocommit=True, connect_timeout=10, prepare_threshold=None)


class RedisMonitor:
    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=10)
        self.version = str(self.client.info("server").get("redis_version", "?"))

    def clients(self) -> int:
        """Connected clients other than this one."""
        return int(self.client.info("clients")["connected_clients"]) - 1

    def close(self) -> None:
        self.client.close()


def established(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local port is ``port``: a server's clients.

    Read from /proc/net/tcp and tcp6 (Linux), so it counts the connections of any
    server on this machine, whatever it can tell about itself.
    """
    found = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == port:
                        found += 1
        except OSError:
            continue
    return found
