"""Throwaway PostgreSQL, Redis and PgBouncer servers, and a fault-injecting TCP proxy.

Why: fault tests must stop, restart, freeze or cut servers without touching the shared ones
on the machine (127.0.0.1:5432, :6379, :4222).  Each server here runs the locally installed
binary on a free loopback port in its own temporary directory, and ``cleanup()`` (or
interpreter exit) removes it.  Plain classes without pytest, so benchmarks can use them too.

PostgreSQL and PgBouncer refuse to run as root, so as root they run as the ``postgres`` OS
user.  ``initdb`` runs once per process into a template that each instance copies, and the
scratch directories live on RAM-backed /dev/shm when it has room (copying the 40 MB template
to this machine's disk took ~1 s, to tmpfs ~50 ms).  $PUBSUB_TEST_TMPDIR overrides that.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import glob
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
from typing import Any, TypeVar

LOOPBACK = "127.0.0.1"
_LIVE: set[_Server] = set()
_S = TypeVar("_S", bound="_Server")


def free_port() -> int:
    """An unused loopback port (racy until bound; ``start()`` retries once if it was taken)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _scratch_base() -> str | None:
    """$PUBSUB_TEST_TMPDIR, else /dev/shm if it has 1 GiB free, else the tempfile default."""
    if os.environ.get("PUBSUB_TEST_TMPDIR"):
        return os.environ["PUBSUB_TEST_TMPDIR"]
    with contextlib.suppress(OSError):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 2**30 and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    return None


def _pg_bin(name: str) -> str:
    """$PUBSUB_PG_BIN/name, else the newest /usr/lib/postgresql/*/bin/name, else PATH."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    for d in [os.environ.get("PUBSUB_PG_BIN", ""), *reversed(versions)]:
        if d and os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return shutil.which(name) or name


def _as_postgres() -> dict[str, Any]:
    """Popen kwargs that drop root to the ``postgres`` user (initdb/postgres/pgbouncer insist)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": pwd.getpwnam("postgres").pw_gid, "extra_groups": []}


def _own(path: str) -> None:
    """Give a tree to ``postgres`` when we are root, so the dropped child can write there."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for root, dirs, files in os.walk(path):
            for p in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(p, pw.pw_uid, pw.pw_gid)


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid``, from the ppid field of /proc/*/stat (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


class _Server:
    """Shared lifecycle: spawn, probe the real protocol until ready, stop, freeze, clean up."""

    kind = "server"
    stop_signals: dict[str, int] = {"graceful": signal.SIGTERM, "kill": signal.SIGKILL}
    cleanup_mode: str | None = None  # stop mode cleanup() uses; None means the first one
    run_as_postgres = False

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"pubsub-{self.kind}-", dir=_scratch_base())
        self.log_path = os.path.join(self.dir, f"{self.kind}.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        _LIVE.add(self)

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Hook: write config files before each start (the first start may change the port)."""

    def _probe(self) -> bool:
        """Hook: one readiness check; True once the server answers its protocol."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    def start(self: _S, timeout: float = 30.0) -> _S:
        """Spawn the server and wait (with a deadline) until a real client request succeeds."""
        if self.running:
            return self
        for attempt in range(3):
            self._prepare()
            kw = _as_postgres() if self.run_as_postgres else {}
            with open(self.log_path, "ab") as log:
                # New session: a Ctrl-C in the terminal must not reach the servers directly.
                self._proc = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=self.dir,
                    start_new_session=True,
                    **kw,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if self._probe():
                    self._started_once = True
                    return self
                time.sleep(0.02)
            tail = self.log_tail()
            self._kill_hard()
            if not self._started_once and attempt < 2 and "in use" in tail:
                self.port = free_port()  # lost the free_port() race; restarts keep the port
                continue
            raise RuntimeError(
                f"{self.kind} on port {self.port} did not come up within "
                f"{timeout}s; log {self.log_path}:\n{tail}"
            )
        raise AssertionError("unreachable")

    def stop(self, mode: str | None = None, timeout: float = 30.0) -> None:
        """Stop with a mode from ``stop_signals`` (default: the first); SIGKILL after timeout."""
        sig = self.stop_signals[mode or next(iter(self.stop_signals))]
        if not self.running or self._proc is None:
            return
        self.thaw()  # a stopped process acts on nothing but SIGKILL
        self._proc.send_signal(sig)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_hard()

    def _kill_hard(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            kids = _descendants(self._proc.pid)
            self._proc.kill()
            self._proc.wait()
            _signal_all(kids, signal.SIGKILL)

    def restart(self: _S, mode: str | None = None) -> _S:
        """Stop and start again: same port, same data directory."""
        self.stop(mode)
        return self.start()

    def freeze(self) -> None:
        """SIGSTOP the server and its children: sockets stay open but nothing answers."""
        if self._proc is not None and self.running:
            os.kill(self._proc.pid, signal.SIGSTOP)  # parent first, so it forks no new child
            _signal_all(_descendants(self._proc.pid), signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None and self.running:
            _signal_all(_descendants(self._proc.pid), signal.SIGCONT)
            os.kill(self._proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop the server and delete its directory; safe to call twice."""
        try:
            self.stop(self.cleanup_mode, timeout=10)
        finally:
            self._kill_hard()
            shutil.rmtree(self.dir, ignore_errors=True)
            _LIVE.discard(self)

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@atexit.register
def _cleanup_all() -> None:
    for server in list(_LIVE):
        server.cleanup()


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


class PostgresServer(_Server):
    """A private cluster: trust on 127.0.0.1, or scram-sha-256 when ``password`` is given."""

    kind = "postgres"
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


def _make_certs(directory: str) -> tuple[str, str, str]:
    """A throwaway CA and a server cert for 127.0.0.1/localhost; returns (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pubsub test CA")])

    def cert(subject: x509.Name, pub: Any, ext: x509.ExtensionType, is_ca: bool) -> bytes:
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .add_extension(ext, critical=is_ca)
        )
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
    )
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    files = {
        "ca.crt": cert(ca_name, ca_key.public_key(), ca_usage, True),
        "server.crt": cert(server_name, key.public_key(), san, False),
        "server.key": pem_key,
    }
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    ca, crt, pkey = (os.path.join(directory, n) for n in files)
    return ca, crt, pkey


class RedisServer(_Server):
    """A private redis-server without persistence; optional password, ACL file and TLS."""

    kind = "redis"

    def __init__(
        self,
        password: str | None = None,
        acl_lines: list[str] | None = None,
        tls: bool = False,
        extra_args: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.password, self.tls = password, tls
        self.ca_file: str | None = None
        self._args = [
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.dir,
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        if password:
            self._args += ["--requirepass", password]
        if acl_lines is not None:
            with open(os.path.join(self.dir, "users.acl"), "w") as f:
                f.write("\n".join(acl_lines) + "\n")
            self._args += ["--aclfile", f.name]
        if tls:
            self.ca_file, crt, key = _make_certs(self.dir)
            self._args += [
                "--tls-cert-file",
                crt,
                "--tls-key-file",
                key,
                "--tls-ca-cert-file",
                self.ca_file,
                "--tls-auth-clients",
                "no",
            ]
        self._args += extra_args or []

    def _command(self) -> list[str]:
        port = ["--port", "0", "--tls-port"] if self.tls else ["--port"]
        return [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            *port,
            str(self.port),
            *self._args,
        ]

    def _probe(self) -> bool:
        """Send PING: any RESP reply (+PONG, -NOAUTH, -NOPERM) means it is serving."""
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as sock:
                conn = sock
                if self.tls:
                    ctx = ssl.create_default_context(cafile=self.ca_file)
                    conn = ctx.wrap_socket(sock, server_hostname=LOOPBACK)
                conn.sendall(b"PING\r\n")
                return conn.recv(64)[:1] in (b"+", b"-")
        except OSError:
            return False

    @property
    def url(self) -> str:
        auth = ":" + urllib.parse.quote(self.password, safe="") + "@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/0"


class PgBouncerServer(_Server):
    """PgBouncer in front of a PostgresServer; ``admin_url`` reaches SHOW POOLS and friends."""

    kind = "pgbouncer"
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


class TcpProxy:
    """A loopback relay to one server that injects network faults on demand.

    ``cut()`` resets every open connection (RST, as a dead middlebox would) and keeps
    accepting; ``stall()`` keeps sockets open but forwards nothing either way, not even a FIN
    (a black hole / half-open link) until ``resume()``, which also ends ``slow(d)``, the
    per-chunk delay.  Two threads per connection, at most ``max_connections`` connections.
    """

    def __init__(self, target_host: str, target_port: int, max_connections: int = 1024) -> None:
        if not ipaddress.ip_address(socket.gethostbyname(target_host)).is_loopback:
            raise ValueError("TcpProxy only relays to loopback addresses")
        self.target, self.max_connections = (target_host, target_port), max_connections
        self._listener = socket.create_server((LOOPBACK, 0), backlog=128)
        self._listener.settimeout(0.2)  # lets the accept loop notice close()
        self.host, self.port = LOOPBACK, int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._delay = 0.0
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def start(self) -> TcpProxy:
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()
        return self

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def url_for(self, url: str) -> str:
        """The same URL, with host and port pointing at this proxy."""
        parts = urllib.parse.urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = (auth + "@" if auth else "") + f"{self.host}:{self.port}"
        return parts._replace(netloc=netloc).geturl()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                if len(self._pairs) >= self.max_connections:
                    raise OSError("proxy connection limit reached")
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self._abort(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[Any, Any]) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = src.recv(65536)
                while not self._flowing.wait(0.05):  # stalled: hold the bytes (or the EOF)
                    if pair not in self._pairs:
                        return
                if not data or pair not in self._pairs:
                    break
                if self._delay:
                    time.sleep(self._delay)
                dst.sendall(data)
        with self._lock:
            if pair not in self._pairs:
                return  # cut() already reset it
            self._pairs.discard(pair)
        for s in pair:  # orderly close: the other side sees EOF
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        """Close with RST rather than FIN; SHUT_RD first wakes a thread blocked in recv."""
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        sock.close()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            for s in pair:
                self._abort(s)

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._delay = 0.0
        self._flowing.set()

    def slow(self, delay_seconds: float) -> None:
        self._delay = max(0.0, delay_seconds)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
        if self._thread.is_alive():
            self._thread.join(2)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class SentinelServer(_Server):
    """One redis-server in sentinel mode watching ``service_name`` (added for the redis tests)."""

    kind = "sentinel"

    def __init__(
        self,
        master_port: int,
        service_name: str,
        quorum: int,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 3000,
    ) -> None:
        super().__init__()
        self.conf_path = os.path.join(self.dir, "sentinel.conf")
        self._monitor = [
            f"sentinel monitor {service_name} {LOOPBACK} {master_port} {quorum}",
            f"sentinel down-after-milliseconds {service_name} {down_after_ms}",
            f"sentinel failover-timeout {service_name} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service_name} 1",
        ]

    def _prepare(self) -> None:
        if self._started_once:
            return  # a sentinel rewrites its config with what it learned; keep that
        with open(self.conf_path, "w") as f:
            f.write(
                "\n".join(
                    [
                        f"port {self.port}",
                        f"bind {LOOPBACK}",
                        "daemonize no",
                        f"dir {self.dir}",
                        'logfile ""',
                        *self._monitor,
                    ]
                )
                + "\n"
            )

    def _command(self) -> list[str]:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        return [binary, self.conf_path, "--sentinel"]

    def _probe(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis(
            self.host, self.port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
        )


class SentinelCluster:
    """A master, its replicas and a quorum of sentinels on loopback, for failover tests.

    ``start()`` returns once every replica has synced and every sentinel knows every replica
    and every other sentinel, so a failover can be authorised at once.  ``kill_master()``
    SIGKILLs the current master; ``wait_for_failover()`` returns the new master's address.
    ``url`` is the ``redis+sentinel://`` URL of the redis backend.
    """

    def __init__(
        self,
        replicas: int = 1,
        sentinels: int = 3,
        service_name: str = "pubsub",
        down_after_ms: int = 500,
        failover_timeout_ms: int = 3000,
    ) -> None:
        self.service_name = service_name
        self._counts = (replicas, sentinels)
        self._timing = (down_after_ms, failover_timeout_ms)
        self._sync = ["--repl-diskless-sync-delay", "0"]
        self.master = RedisServer(extra_args=self._sync)
        # Made once the master runs: start() may have moved it to another port.
        self.replicas: list[RedisServer] = []
        self.sentinels: list[SentinelServer] = []

    @property
    def servers(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service_name}"

    def _wait(self, what: str, predicate: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                result = predicate()
            except Exception as exc:  # a server still starting, or just killed
                result, error = None, exc
            if result:
                return result
            time.sleep(0.05)
        logs = "".join(f"\n--- {s.kind} {s.port}:\n{s.log_tail(10)}" for s in self.sentinels)
        raise RuntimeError(
            f"sentinel cluster: timed out after {timeout}s waiting for {what} "
            f"(last error: {error!r}){logs}"
        )

    def start(self, timeout: float = 60.0) -> SentinelCluster:
        import redis

        self.master.start()
        replicas, sentinels = self._counts
        follow = [*self._sync, "--replicaof", LOOPBACK, str(self.master.port)]
        self.replicas = [RedisServer(extra_args=follow) for _ in range(replicas)]
        for server in self.replicas:
            server.start()

        def synced() -> bool:
            for replica in self.replicas:
                with redis.Redis(replica.host, replica.port, socket_timeout=2) as r:
                    if r.info("replication").get("master_link_status") != "up":
                        return False
            return True

        self._wait("the replicas to sync", synced, timeout)
        quorum = sentinels // 2 + 1
        self.sentinels = [
            SentinelServer(self.master.port, self.service_name, quorum, *self._timing)
            for _ in range(sentinels)
        ]
        for sentinel in self.sentinels:
            sentinel.start()

        def acquainted() -> bool:
            for sentinel in self.sentinels:
                with sentinel.client() as s:
                    replicas = s.sentinel_slaves(self.service_name)
                    peers = s.sentinel_sentinels(self.service_name)
                    if len(replicas) < len(self.replicas) or len(peers) < len(self.sentinels) - 1:
                        return False
            return True

        self._wait("the sentinels to know every replica and each other", acquainted, timeout)
        return self

    def master_address(self) -> tuple[str, int]:
        """The master's address as the sentinels that answer agree on it."""
        addresses = set()
        for sentinel in self.sentinels:
            if sentinel.running:
                with sentinel.client() as s:
                    host, port = s.sentinel_get_master_addr_by_name(self.service_name)
                    addresses.add((host, int(port)))
        if len(addresses) != 1:
            raise RuntimeError(f"sentinels disagree on the master: {sorted(addresses)}")
        return addresses.pop()

    def server_at(self, address: tuple[str, int]) -> RedisServer:
        return next(s for s in self.servers if (s.host, s.port) == address)

    def kill_master(self) -> RedisServer:
        server = self.server_at(self.master_address())
        server.stop("kill")
        return server

    def wait_for_failover(self, old: tuple[str, int], timeout: float = 60.0) -> tuple[str, int]:
        import redis

        def promoted() -> tuple[str, int] | None:
            address = self.master_address()
            if address == old:
                return None
            with redis.Redis(*address, socket_timeout=2) as r:
                return address if r.info("replication").get("role") == "master" else None

        return self._wait("a failover", promoted, timeout)

    def cleanup(self) -> None:
        for server in [*self.sentinels, *self.servers]:
            server.cleanup()

    def __enter__(self) -> SentinelCluster:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
