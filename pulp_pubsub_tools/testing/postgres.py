"""Throwaway PostgreSQL servers and a PgBouncer in front of one.

PostgreSQL and PgBouncer refuse to run as root, so as root they run as the ``postgres`` OS
user. ``initdb`` runs once per process into a template that each instance copies.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.parse
from typing import Any

from .processes import (
    LOOPBACK,
    ServerProcess,
    _as_postgres,
    _own,
    _scratch_base,
    require_binary,
)


def _pg_bin(name: str) -> str:
    """$PUBSUB_PG_BIN/name, else the newest /usr/lib/postgresql/*/bin/name, else PATH."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    for d in [os.environ.get("PUBSUB_PG_BIN", ""), *reversed(versions)]:
        if d and os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    path = shutil.which(name) or name
    require_binary(path, "postgresql")
    return path


_TEMPLATE: str | None = None
_TEMPLATE_LOCK = threading.Lock()


def _pg_template() -> str:
    """initdb once per process (~1 s); instances copy it.  1 MB WAL segments keep it small."""
    global _TEMPLATE
    with _TEMPLATE_LOCK:
        if _TEMPLATE is None:
            root = tempfile.mkdtemp(prefix="pubsub-pgtemplate-", dir=_scratch_base())
            atexit.register(shutil.rmtree, root, True)
            _own(root)
            data = os.path.join(root, "data")
            cmd = [
                _pg_bin("initdb"),
                "-D",
                data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                "--wal-segsize=1",
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, **_as_postgres())
            if r.returncode:
                raise RuntimeError(f"initdb failed:\n{r.stdout}\n{r.stderr}")
            _TEMPLATE = data
    return _TEMPLATE


def _pg_value(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int | float):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


class PostgresServer(ServerProcess):
    """A private cluster: trust on 127.0.0.1, or scram-sha-256 when ``password`` is given."""

    kind = "postgres"
    package = "postgresql"
    stop_signals = {"fast": signal.SIGINT, "smart": signal.SIGTERM, "immediate": signal.SIGQUIT}
    cleanup_mode = "immediate"  # the data is thrown away: skip the shutdown checkpoint
    run_as_postgres = True

    def __init__(
        self,
        max_connections: int = 100,
        extra_conf: dict[str, Any] | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__()
        self.user, self.dbname, self.password = "postgres", "postgres", password
        self._password_set = False
        self.data_dir = os.path.join(self.dir, "data")
        shutil.copytree(_pg_template(), self.data_dir, symlinks=True)
        conf: dict[str, Any] = {
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": self.dir,
            "max_connections": max_connections,
            "shared_buffers": f"{max(16384, 20 * max_connections)}kB",  # >= 16 kB a connection
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "timezone": "UTC",
            **(extra_conf or {}),
        }
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
            f.writelines(f"\n{k} = {_pg_value(v)}" for k, v in conf.items())
        method = "scram-sha-256" if password else "trust"
        with open(os.path.join(self.data_dir, "pg_hba.conf"), "w") as f:
            f.write(f"local all all trust\nhost all all 127.0.0.1/32 {method}\n")
        _own(self.dir)

    def _command(self) -> list[str]:
        return [_pg_bin("postgres"), "-D", self.data_dir, "-p", str(self.port)]

    def _probe(self) -> bool:
        import psycopg
        from psycopg import sql

        try:  # the unix socket always trusts, so the first start can set the password
            with psycopg.connect(
                host=self.dir,
                port=self.port,
                user=self.user,
                dbname=self.dbname,
                connect_timeout=2,
                autocommit=True,
            ) as conn:
                if self.password and not self._password_set:
                    conn.execute(
                        sql.SQL("ALTER ROLE postgres PASSWORD {}").format(
                            sql.Literal(self.password)
                        )
                    )
                    self._password_set = True
            return True
        except psycopg.OperationalError:
            return False

    @property
    def url(self) -> str:
        pw = ":" + urllib.parse.quote(self.password, safe="") if self.password else ""
        return f"postgresql://{self.user}{pw}@{self.host}:{self.port}/{self.dbname}"

    def django_database(self) -> dict[str, Any]:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": self.dbname,
            "USER": self.user,
            "PASSWORD": self.password or "",
            "HOST": self.host,
            "PORT": str(self.port),
        }


class PgBouncerServer(ServerProcess):
    """PgBouncer in front of a PostgresServer; ``admin_url`` reaches SHOW POOLS and friends."""

    kind = "pgbouncer"
    package = "pgbouncer"
    stop_signals = {"fast": signal.SIGTERM, "safe": signal.SIGINT, "kill": signal.SIGKILL}
    run_as_postgres = True

    def __init__(
        self,
        postgres: PostgresServer,
        pool_mode: str = "transaction",
        default_pool_size: int = 2,
        max_client_conn: int = 500,
        extra_conf: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.postgres, self.user, self.dbname = postgres, postgres.user, postgres.dbname
        self.conf: dict[str, Any] = {
            "listen_addr": LOOPBACK,
            "unix_socket_dir": self.dir,
            "auth_type": "trust",
            "auth_file": os.path.join(self.dir, "users.txt"),
            "admin_users": self.user,
            "pool_mode": pool_mode,
            "default_pool_size": default_pool_size,
            "max_client_conn": max_client_conn,
            "ignore_startup_parameters": "extra_float_digits",
            "server_login_retry": 1,  # default 15 s would outlast a PostgreSQL restart test
            **(extra_conf or {}),
        }

    def _prepare(self) -> None:
        pg = self.postgres
        login = f" user={pg.user} password={pg.password}" if pg.password else ""
        lines = [
            f"[databases]\n* = host={pg.host} port={pg.port}{login}\n[pgbouncer]",
            f"listen_port = {self.port}",
            *(f"{k} = {v}" for k, v in self.conf.items()),
        ]
        with open(os.path.join(self.dir, "pgbouncer.ini"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(self.conf["auth_file"], "w") as f:
            f.write(f'"{pg.user}" "{pg.password or ""}"\n')
        _own(self.dir)

    def _command(self) -> list[str]:
        ini = os.path.join(self.dir, "pgbouncer.ini")
        return [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", ini]

    def _probe(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.dbname}"

    @property
    def admin_url(self) -> str:
        """The admin console speaks only the simple query protocol: use psycopg.ClientCursor."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/pgbouncer"

    def django_database(self) -> dict[str, Any]:
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": self.dbname,
            "USER": self.user,
            "PASSWORD": "",
            "HOST": self.host,
            "PORT": str(self.port),
            "DISABLE_SERVER_SIDE_CURSORS": True,
        }  # required by transaction pooling
