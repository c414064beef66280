"""The PostgreSQL, Redis, etcd, relay, NATS and ZooKeeper servers of one benchmark run.

A server given by URL is only checked, never stopped: the benchmark refuses
one that cannot take the connections a run needs (the shared development
PostgreSQL allows 100, and 250 subscribers need more). Otherwise it starts
throwaway ones from :mod:`pulp_pubsub_tools.testing` on free loopback ports, tuned
so that only what is measured shows: commits wait for no disk (the commit
scenario shows NOTIFY's lock, not this machine's fsync latency) and nothing
in the background adds transactions to the idle measurement.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import Any

from pulp_pubsub.conf import hide_password

from ..testing import (
    EtcdServer,
    NatsServer,
    PostgresServer,
    RedisServer,
    RelayServer,
    ZookeeperServer,
)
from ..testing.processes import ServerProcess
from . import BenchError


def start_postgres(max_connections: int) -> ServerProcess:
    conf = {"full_page_writes": False, "autovacuum": False}
    return _started(PostgresServer(max_connections=max_connections, extra_conf=conf))


def start_redis() -> ServerProcess:
    return _started(RedisServer(extra_args=["--maxclients", "10000"]))


def start_etcd() -> ServerProcess:
    # etcd's default Raft timers (the test launcher shortens them) and hourly
    # auto-compaction, as an operator would run it.
    timers = ["--heartbeat-interval", "100", "--election-timeout", "1000"]
    return _started(EtcdServer(extra_args=[*timers, "--auto-compaction-retention", "1"]))


def start_nats(jetstream: bool = False) -> ServerProcess:
    return _started(NatsServer(jetstream=jetstream))


def start_zookeeper() -> ServerProcess:
    # ZooKeeper's usual tickTime (the test launcher shortens it): sessions of 4 to 40 s.
    return _started(ZookeeperServer(extra_config={"tickTime": 2000}))


def start_relay(postgres_url: str) -> ServerProcess:
    return _started(RelayServer(postgres_url, extra_args=["--max-clients", "10000"]))


def _started(server: ServerProcess) -> ServerProcess:
    try:
        return server.start(timeout=60)
    except (OSError, RuntimeError) as exc:
        server.cleanup()
        raise BenchError(f"Cannot start a throwaway {server.kind} server: {exc}") from exc


LAUNCHERS: dict[str, Callable[[ServerSet], ServerProcess]] = {
    "postgres": lambda servers: start_postgres(servers.max_connections),
    "redis": lambda servers: start_redis(),
    "relay": lambda servers: start_relay(servers.url("postgres")),
    "etcd": lambda servers: start_etcd(),
    "nats": lambda servers: start_nats(),
    "natsjs": lambda servers: start_nats(jetstream=True),
    "zookeeper": lambda servers: start_zookeeper(),
}


class ServerSet:
    """The servers of one run: given by URL, or started on first use and stopped on close."""

    def __init__(self, urls: dict[str, str], max_connections: int) -> None:
        self.urls = {kind: url for kind, url in urls.items() if url}
        self.given = set(self.urls)
        self.max_connections: int = max_connections
        self._launched: dict[str, ServerProcess] = {}

    def url(self, kind: str) -> str:
        if kind not in self.urls:
            launcher = LAUNCHERS.get(kind)
            if launcher is None:
                raise BenchError(
                    f"The benchmark cannot start a {kind} server itself: pass "
                    f"--server-url {kind}=URL."
                )
            self._launched[kind] = launcher(self)
            self.urls[kind] = self._launched[kind].url
        return self.urls[kind]

    def cpu_seconds(self, kind: str) -> float | None:
        """CPU used so far by a throwaway server and its children; None for a given one."""
        launched = self._launched.get(kind)
        if launched is None or launched.pid is None:
            return None
        return process_tree_cpu(launched.pid)

    def pss_kb(self, kind: str) -> int | None:
        """Proportional memory (kB) of a throwaway server and its children; None for a given one.

        PSS, not RSS: PostgreSQL's backends share its buffers, which RSS would count
        once per session.
        """
        launched = self._launched.get(kind)
        if launched is None or launched.pid is None:
            return None
        return sum(_pss_kb(pid) for pid in process_tree(launched.pid))

    def port(self, kind: str) -> int | None:
        """The TCP port of a server of this run (given or throwaway), if its URL has one."""
        from urllib.parse import urlsplit

        url = self.urls.get(kind)
        if url is None:
            return None
        try:
            return urlsplit(url.split(",")[0]).port
        except ValueError:
            return None

    def describe(self) -> dict[str, str]:
        return {
            kind: f"{hide_password(url)} ({'given' if kind in self.given else 'throwaway'})"
            for kind, url in self.urls.items()
        }

    def close(self) -> None:
        for launched in self._launched.values():
            launched.cleanup()
        self._launched.clear()


def process_tree(root: int) -> set[int]:
    """``root`` and its live descendants, from /proc (Linux)."""
    return _tree(root, _stats()[0])


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stats() -> tuple[dict[int, int], dict[int, int]]:
    """Parent and CPU ticks (user + system) of every live process."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        pid = int(path.split("/")[2])
        parents[pid] = int(fields[1])
        times[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    return parents, times


def _tree(root: int, parents: dict[int, int]) -> set[int]:
    # One pass to index children: a PostgreSQL serving 2,000 sessions has 2,000 of them.
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


def process_tree_cpu(root: int) -> float:
    """User and system seconds of ``root`` and its live descendants, from /proc (Linux)."""
    parents, times = _stats()
    ticks = sum(times.get(pid, 0) for pid in _tree(root, parents))
    return ticks / os.sysconf("SC_CLK_TCK")


def check_postgres_capacity(monitor: Any, needed: int) -> None:
    """Refuse a server (given by URL) that cannot take ``needed`` more sessions."""
    free = monitor.free_connections()
    if free < needed:
        raise BenchError(
            f"The PostgreSQL server at {hide_password(monitor.url)} has room for {free} more "
            f"sessions, and this run needs about {needed}. Leave out --postgres-url to use a "
            "throwaway server, or lower --subscribers."
        )
