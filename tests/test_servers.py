"""Self-test of tests/servers.py against the real binaries: each helper must really start,
restart on the same port, freeze, and inject the faults the fault tests rely on."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pulp_pubsub_tools.testing import (
    PgBouncerServer,
    PostgresServer,
    RedisServer,
    TcpProxy,
    free_port,
)
from pulp_pubsub_tools.testing.processes import ServerProcess, require_binary

pytestmark = pytest.mark.servers


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run a blocking client call in the background so a test can see whether it hangs."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as exc:  # handed to the test, which asserts on it
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 < port < 65536


def test_postgres_restart_keeps_port_and_data() -> None:
    with PostgresServer(max_connections=150) as pg:
        port = pg.port
        with psycopg.connect(pg.url, autocommit=True) as conn:
            assert conn.execute("SHOW max_connections").fetchone() == ("150",)
            conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
        pg.restart()
        assert pg.port == port
        pg.restart("immediate")  # crash recovery; committed rows survive even with fsync=off here
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (7,)
        pg.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.url, connect_timeout=2)
    assert pg.django_database()["ENGINE"] == "django.db.backends.postgresql"


def test_postgres_password() -> None:
    with PostgresServer(password="s3cret") as pg:
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(pg.url.replace("s3cret", "wrong"), connect_timeout=2)
        assert pg.django_database()["PASSWORD"] == "s3cret"


def test_postgres_freeze_and_thaw() -> None:
    with PostgresServer() as pg, psycopg.connect(pg.url, autocommit=True) as conn:
        pg.freeze()
        try:
            started = time.monotonic()
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(pg.url, connect_timeout=1)
            assert time.monotonic() - started < 5
            t, out = in_thread(lambda: conn.execute("SELECT 42").fetchone())
            t.join(0.5)
            assert t.is_alive(), "a frozen backend must not answer"
        finally:
            pg.thaw()
        t.join(5)
        assert out == {"value": (42,)}
        with psycopg.connect(pg.url, connect_timeout=2) as conn2:
            assert conn2.execute("SELECT 1").fetchone() == (1,)


def test_redis_restart_freeze_kill() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=0.5)
        assert client.set("k", "v") and client.get("k") == b"v"
        port = server.port
        server.restart()
        assert server.port == port and client.get("k") is None  # no persistence
        server.freeze()
        try:
            with pytest.raises(redis.TimeoutError):
                client.ping()
        finally:
            server.thaw()
        assert client.ping()
        server.stop("kill")
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(server.url, socket_timeout=0.5).ping()


def test_redis_password_acl_and_tls() -> None:
    with RedisServer(password="pw") as server:
        assert redis.Redis.from_url(server.url).ping()
        no_retry = Retry(NoBackoff(), 0)  # redis-py otherwise retries auth errors for ~4 s
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port, password="bad", retry=no_retry).ping()
    acl = ["user default off", "user alice on >apw ~* &* +@all"]
    with RedisServer(acl_lines=acl) as server:
        alice = redis.Redis(host=server.host, port=server.port, username="alice", password="apw")
        assert alice.ping()
    with RedisServer(tls=True) as server:
        assert server.url.startswith("rediss://") and server.ca_file
        assert redis.Redis.from_url(server.url, ssl_ca_certs=server.ca_file).ping()


def test_pgbouncer_transaction_mode() -> None:
    with PostgresServer() as pg, PgBouncerServer(pg, default_pool_size=1) as bouncer:
        for _ in range(3):
            with psycopg.connect(bouncer.url, autocommit=True) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        admin_conn = psycopg.connect(
            bouncer.admin_url, autocommit=True, cursor_factory=psycopg.ClientCursor
        )
        with admin_conn as admin:
            cur = admin.execute("SHOW POOLS")
            names = [d.name for d in cur.description or []]
            pools = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        assert any(p["database"] == "postgres" and p["pool_mode"] == "transaction" for p in pools)
        assert bouncer.django_database()["PORT"] == str(bouncer.port)


def test_proxy_cut_stall_resume_slow() -> None:
    with RedisServer() as server, TcpProxy(server.host, server.port) as proxy:
        url = proxy.url_for(server.url)
        assert str(proxy.port) in url
        client = redis.Redis.from_url(url, socket_timeout=5)
        assert client.ping() and proxy.connections == 1

        proxy.stall()
        t, out = in_thread(client.ping)
        t.join(0.5)
        assert t.is_alive(), "a stalled proxy must not forward the reply"
        proxy.resume()
        t.join(5)
        assert out == {"value": True}

        # redis-py silently reconnects pooled connections, so watch a raw socket for the RST.
        raw = socket.create_connection((proxy.host, proxy.port), timeout=5)
        raw.sendall(b"PING\r\n")
        assert raw.recv(64) == b"+PONG\r\n"
        proxy.cut()
        assert proxy.connections == 0
        with pytest.raises(ConnectionResetError):
            raw.sendall(b"PING\r\n")
            raw.recv(64)
        raw.close()
        client = redis.Redis.from_url(url, socket_timeout=5)
        assert client.ping()  # the proxy still accepts new connections

        proxy.slow(0.2)
        started = time.monotonic()
        assert client.ping()
        assert time.monotonic() - started >= 0.4  # request and reply both delayed
        proxy.resume()


def test_proxy_in_front_of_postgres_cut() -> None:
    with PostgresServer() as pg, TcpProxy(pg.host, pg.port) as proxy:
        conn = psycopg.connect(proxy.url_for(pg.url), autocommit=True)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.cut()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        with psycopg.connect(proxy.url_for(pg.url), connect_timeout=2) as conn2:
            assert conn2.execute("SELECT 2").fetchone() == (2,)


def test_proxy_refuses_remote_targets() -> None:
    with pytest.raises(ValueError):
        TcpProxy("8.8.8.8", 53)


def test_a_missing_server_binary_fails_with_its_install_line() -> None:
    class Missing(ServerProcess):
        kind = "missing"
        package = "pgbouncer"

        def _command(self) -> list[str]:
            return ["/nonexistent/bin/pgbouncer", "pgbouncer.ini"]

        def _probe(self) -> bool:
            return False

    server = Missing()
    try:
        with pytest.raises(RuntimeError) as caught:
            server.start()
        assert str(caught.value) == (
            "pgbouncer is not installed; install it with: apt-get install pgbouncer"
        )
        assert not server.running
    finally:
        server.cleanup()
    with pytest.raises(RuntimeError, match="apt-get install postgresql"):
        require_binary("no-such-initdb", "postgresql")
