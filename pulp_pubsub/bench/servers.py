"""Throwaway PostgreSQL and Redis for the benchmark, or the servers it is given.

tests/servers.py is not part of the installed package, so the benchmark has a
launcher of its own: the locally installed binary on a free loopback port in a
scratch directory, no persistence, removed again by :meth:`ServerSet.close`
(or at interpreter exit). It is deliberately smaller than the test helpers: it
never restarts, freezes or cuts a server.

A server passed by URL is only checked, never stopped: the benchmark refuses
one that cannot take the connections a run needs (the shared development
PostgreSQL allows 100, and 250 subscribers need more).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ..conf import hide_password
from . import BenchError

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    """$PUBSUB_PG_BIN/name, else the newest /usr/lib/postgresql/*/bin/name, else PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin")
    newest = sorted(found, key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    for directory in [os.environ.get("PUBSUB_PG_BIN", ""), *reversed(newest)]:
        if directory and os.access(os.path.join(directory, name), os.X_OK):
            return os.path.join(directory, name)
    path = shutil.which(name)
    if path is None:
        raise BenchError(
            f"Cannot start a throwaway PostgreSQL: {name!r} is not installed "
            "(set $PUBSUB_PG_BIN, or pass --postgres-url)."
        )
    return path


def _as_postgres() -> dict[str, Any]:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise BenchError(
            "Running as root, and there is no 'postgres' user to run a throwaway PostgreSQL as."
        ) from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


class Launched:
    """One server process of ours and its scratch directory."""

    def __init__(self, kind: str, url: str, proc: subprocess.Popen[bytes], directory: str) -> None:
        self.kind, self.url, self.proc, self.dir = kind, url, proc, directory

    def stop(self) -> None:
        if self.proc.poll() is None:
            # PostgreSQL: SIGQUIT is an immediate shutdown; the data is thrown away anyway.
            self.proc.send_signal(signal.SIGQUIT if self.kind == "postgres" else signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_ready(
    kind: str, proc: subprocess.Popen[bytes], ready: Callable[[], bool], log: str
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(0.05)
    tail = ""
    with contextlib.suppress(OSError), open(log, errors="replace") as f:
        tail = "".join(f.readlines()[-20:])
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    raise BenchError(f"The throwaway {kind} server did not come up; its log ends:\n{tail}")


def start_postgres(max_connections: int) -> Launched:
    directory = tempfile.mkdtemp(prefix="pubsub-bench-pg-")
    data, log = os.path.join(directory, "data"), os.path.join(directory, "postgres.log")
    as_postgres = _as_postgres()
    if as_postgres:
        os.chown(directory, as_postgres["user"], as_postgres["group"])
    initdb = [_pg_bin("initdb"), "-D", data, "-U", "postgres", "-A", "trust", "--no-sync"]
    done = subprocess.run(
        [*initdb, "-E", "UTF8", "--locale=C"], capture_output=True, text=True, **as_postgres
    )
    if done.returncode:
        shutil.rmtree(directory, ignore_errors=True)
        raise BenchError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
    port = free_port()
    settings = {
        "listen_addresses": LOOPBACK,
        "port": port,
        "unix_socket_directories": directory,
        "max_connections": max_connections,
        # Durability is not what is measured: commits wait for no disk, so the commit
        # scenario shows NOTIFY's lock rather than this machine's fsync latency.
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        # Nothing in the background may add transactions to the idle measurement.
        "autovacuum": "off",
    }
    command = [_pg_bin("postgres"), "-D", data]
    for key, value in settings.items():
        command += ["-c", f"{key}={value}"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **as_postgres,
        )
    url = f"postgresql://postgres@{LOOPBACK}:{port}/postgres"
    launched = Launched("postgres", url, proc, directory)
    _LIVE.append(launched)

    def ready() -> bool:
        import psycopg

        try:
            psycopg.connect(url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    _wait_ready("postgres", proc, ready, log)
    return launched


def start_redis() -> Launched:
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("Cannot start a throwaway Redis: redis-server is not installed.")
    directory = tempfile.mkdtemp(prefix="pubsub-bench-redis-")
    port, log = free_port(), os.path.join(directory, "redis.log")
    command = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", ""]
    command += ["--appendonly", "no", "--dir", directory, "--maxclients", "10000"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
        )
    launched = Launched("redis", f"redis://{LOOPBACK}:{port}/0", proc, directory)
    _LIVE.append(launched)

    def ready() -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    _wait_ready("redis", proc, ready, log)
    return launched


_LIVE: list[Launched] = []
LAUNCHERS: dict[str, Callable[[ServerSet], Launched]] = {
    "postgres": lambda servers: start_postgres(servers.max_connections),
    "redis": lambda servers: start_redis(),
}


@atexit.register
def _stop_all() -> None:
    while _LIVE:
        _LIVE.pop().stop()


class ServerSet:
    """The servers of one run: given by URL, or started on first use and stopped on close."""

    def __init__(self, urls: dict[str, str], max_connections: int) -> None:
        self.urls = {kind: url for kind, url in urls.items() if url}
        self.given = set(self.urls)
        self.max_connections: int = max_connections
        self._launched: list[Launched] = []

    def url(self, kind: str) -> str:
        if kind not in self.urls:
            launcher = LAUNCHERS.get(kind)
            if launcher is None:
                raise BenchError(
                    f"The benchmark cannot start a {kind} server itself: pass "
                    f"--server-url {kind}=URL."
                )
            launched = launcher(self)
            self._launched.append(launched)
            self.urls[kind] = launched.url
        return self.urls[kind]

    def cpu_seconds(self, kind: str) -> float | None:
        """CPU used so far by a throwaway server and its children; None for a given one."""
        launched = next((s for s in self._launched if s.kind == kind), None)
        if launched is None:
            return None
        return process_tree_cpu(launched.proc.pid)

    def describe(self) -> dict[str, str]:
        return {
            kind: f"{hide_password(url)} ({'given' if kind in self.given else 'throwaway'})"
            for kind, url in self.urls.items()
        }

    def close(self) -> None:
        for launched in self._launched:
            launched.stop()
            with contextlib.suppress(ValueError):
                _LIVE.remove(launched)
        self._launched.clear()


def process_tree_cpu(root: int) -> float:
    """User and system seconds of ``root`` and its live descendants, from /proc (Linux)."""
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
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in tree:
            continue
        tree.add(pid)
        todo += [child for child, parent in parents.items() if parent == pid]
    ticks = sum(times.get(pid, 0) for pid in tree)
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
