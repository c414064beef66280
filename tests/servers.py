"""Throwaway PostgreSQL, Redis and PgBouncer servers, plus a fault-injecting TCP proxy.

Why: fault tests must stop, restart, freeze or cut servers without touching the shared
servers on the machine (127.0.0.1:5432, :6379, :4222).  Every server here is started from
the locally installed binary on a free loopback port, in its own temporary directory, and
is removed again by ``cleanup()`` (or at interpreter exit).  Plain classes, no pytest
import, so a benchmark script can use them too.

PostgreSQL and PgBouncer refuse to run as root; when we are root they run as the
``postgres`` OS user.  ``initdb`` runs once per process into a cached template that each
instance copies, which keeps a fresh server at well under a second.
"""
from __future__ import annotations

import atexit
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
import weakref
from typing import Any, TypeVar

LOOPBACK = "127.0.0.1"
_LIVE: "weakref.WeakSet[_Server]" = weakref.WeakSet()
_S = TypeVar("_S", bound="_Server")


def free_port() -> int:
    """Ask the kernel for an unused loopback port (there is a small race until it is bound)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    """Locate a PostgreSQL binary: $PUBSUB_PG_BIN, the newest Debian layout, or PATH."""
    dirs = [os.environ.get("PUBSUB_PG_BIN", "")]
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))[::-1]
    for d in dirs:
        if d and os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"PostgreSQL binary {name!r} not found; set PUBSUB_PG_BIN")
    return found


def _drop_root() -> dict[str, Any]:
    """Popen kwargs that run a child as ``postgres`` when we are root (initdb/postgres insist)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": pwd.getpwnam("postgres").pw_gid, "extra_groups": []}


def _own(path: str) -> None:
    """Give a tree to the ``postgres`` user when we are root, so the dropped child can use it."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam("postgres")
    for root, dirs, files in os.walk(path):
        for p in [root] + [os.path.join(root, n) for n in dirs + files]:
            os.lchown(p, pw.pw_uid, pw.pw_gid)


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (breadth first), from the ppid field of /proc/*/stat."""
    parent: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        parent.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        kids = parent.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


class _Server:
    """Lifecycle shared by all servers: spawn, probe until ready, stop, freeze, clean up."""

    kind = "server"
    stop_signals: dict[str, int] = {"graceful": signal.SIGTERM, "kill": signal.SIGKILL}
    run_as_postgres = False
    cleanup_mode: str | None = None  # stop mode used by cleanup(); None = first stop mode

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"pubsub-{self.kind}-")
        self.log_path = os.path.join(self.dir, f"{self.kind}.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        _LIVE.add(self)

    # Subclass hooks -------------------------------------------------------------------
    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write config files before each start (the port may change on the first start)."""

    def _probe(self) -> bool:
        """One readiness check that talks the real protocol; True once the server answers."""
        raise NotImplementedError

    # Lifecycle ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def start(self: _S, timeout: float = 30.0) -> _S:
        """Spawn and wait until the server answers; on the first start retry if the port was taken."""
        if self.running:
            return self
        for attempt in range(3):
            self._prepare()
            kw = _drop_root() if self.run_as_postgres else {}
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, cwd=self.dir,
                                              start_new_session=True, **kw)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if self._probe():
                    self._started_once = True
                    return self
                time.sleep(0.05)
            tail = self.log_tail()
            self._kill_hard()
            if not self._started_once and attempt < 2 and "in use" in tail:
                self.port = free_port()
                continue
            raise RuntimeError(f"{self.kind} on port {self.port} did not come up within "
                               f"{timeout}s (log {self.log_path}):\n{tail}")
        raise AssertionError("unreachable")

    def stop(self, mode: str | None = None, timeout: float = 30.0) -> None:
        """Stop with the named shutdown mode (first key of ``stop_signals`` by default)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        sig = self.stop_signals[mode or next(iter(self.stop_signals))]
        self.thaw()  # a stopped process cannot act on anything but SIGKILL
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_hard()

    def _kill_hard(self) -> None:
        if self._proc and self._proc.poll() is None:
            kids = _descendants(self._proc.pid)
            self._proc.kill()
            self._proc.wait()
            _signal_all(kids, signal.SIGKILL)

    def restart(self: _S, mode: str | None = None) -> _S:
        """Stop and start again on the same port with the same data."""
        self.stop(mode)
        return self.start()

    def freeze(self) -> None:
        """SIGSTOP the server and all its children: connections stay open but nothing answers."""
        if self._proc and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGSTOP)  # parent first so it forks no new child
            _signal_all(_descendants(self._proc.pid), signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc and self._proc.poll() is None:
            _signal_all(_descendants(self._proc.pid), signal.SIGCONT)
            os.kill(self._proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop (fastest non-kill mode) and delete the temporary directory."""
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


# PostgreSQL -----------------------------------------------------------------------------
_TEMPLATE: str | None = None
_TEMPLATE_LOCK = threading.Lock()


def _pg_template() -> str:
    """Run initdb once per process; later instances copy the result (copy is ~10x faster)."""
    global _TEMPLATE
    with _TEMPLATE_LOCK:
        if _TEMPLATE is None:
            root = tempfile.mkdtemp(prefix="pubsub-pgtemplate-")
            _own(root)
            data = os.path.join(root, "data")
            r = subprocess.run([_pg_bin("initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                                "--no-sync", "-E", "UTF8", "--locale=C"],
                               capture_output=True, text=True, cwd=root, **_drop_root())
            if r.returncode:
                raise RuntimeError(f"initdb failed:\n{r.stdout}\n{r.stderr}")
            atexit.register(shutil.rmtree, root, True)
            _TEMPLATE = data
    return _TEMPLATE


def _pg_value(v: object) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (int, float)):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


class PostgresServer(_Server):
    """A private PostgreSQL cluster: trust on loopback, or SCRAM when ``password`` is given."""

    kind = "postgres"
    stop_signals = {"fast": signal.SIGINT, "smart": signal.SIGTERM, "immediate": signal.SIGQUIT}
    run_as_postgres = True
    cleanup_mode = "immediate"  # the data is thrown away, skip the shutdown checkpoint

    def __init__(self, max_connections: int = 100, extra_conf: dict[str, Any] | None = None,
                 password: str | None = None) -> None:
        super().__init__()
        self.user, self.dbname, self.password = "postgres", "postgres", password
        self._password_set = False
        self.data_dir = os.path.join(self.dir, "data")
        shutil.copytree(_pg_template(), self.data_dir, symlinks=True)
        conf: dict[str, Any] = {
            "listen_addresses": LOOPBACK, "unix_socket_directories": self.dir,
            "max_connections": max_connections,
            # PostgreSQL needs at least 2 buffers (16kB) per connection.
            "shared_buffers": f"{max(16384, 20 * max_connections)}kB",
            "fsync": False, "synchronous_commit": False, "full_page_writes": False,
            "timezone": "UTC", **(extra_conf or {})}
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
            f.write("".join(f"\n{k} = {_pg_value(v)}" for k, v in conf.items()) + "\n")
        method = "scram-sha-256" if password else "trust"
        with open(os.path.join(self.data_dir, "pg_hba.conf"), "w") as f:
            f.write(f"local all all trust\nhost all all 127.0.0.1/32 {method}\n")
        _own(self.dir)

    def _command(self) -> list[str]:
        return [_pg_bin("postgres"), "-D", self.data_dir, "-p", str(self.port)]

    def _probe(self) -> bool:
        import psycopg
        from psycopg import sql
        try:  # over the unix socket (always trust), so the password can be set on first start
            with psycopg.connect(host=self.dir, port=self.port, user=self.user, dbname=self.dbname,
                                 connect_timeout=2, autocommit=True) as conn:
                if self.password and not self._password_set:
                    conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(
                        sql.Literal(self.password)))
                    self._password_set = True
            return True
        except psycopg.OperationalError:
            return False

    @property
    def url(self) -> str:
        auth = self.user + (":" + urllib.parse.quote(self.password, safe="") if self.password else "")
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.dbname}"

    def django_database(self) -> dict[str, Any]:
        return {"ENGINE": "django.db.backends.postgresql", "NAME": self.dbname, "USER": self.user,
                "PASSWORD": self.password or "", "HOST": self.host, "PORT": str(self.port)}


# Redis ----------------------------------------------------------------------------------
def _make_certs(directory: str) -> tuple[str, str, str]:
    """Write a throwaway CA and a server cert for 127.0.0.1/localhost; return (ca, cert, key)."""
    ca, crt, key = (os.path.join(directory, n) for n in ("ca.crt", "server.crt", "server.key"))
    try:
        import datetime
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        ext = os.path.join(directory, "san.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ecp = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        for cmd in (["req", "-x509", *ecp, "-keyout", ca + ".key", "-out", ca, "-subj", "/CN=pubsub-test-ca", "-days", "2"],
                    ["req", *ecp, "-keyout", key, "-out", crt + ".csr", "-subj", "/CN=localhost"],
                    ["x509", "-req", "-in", crt + ".csr", "-CA", ca, "-CAkey", ca + ".key", "-CAcreateserial",
                     "-out", crt, "-days", "2", "-extfile", ext]):
            subprocess.run(["openssl", *cmd], check=True, capture_output=True)
        return ca, crt, key
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def build(subject: str, issuer: str, pub: Any, is_ca: bool) -> Any:
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if is_ca:
            return b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        return b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]), critical=False)

    ca_cert = build("pubsub-test-ca", "pubsub-test-ca", ca_key.public_key(), True).sign(ca_key, hashes.SHA256())
    srv_cert = build("localhost", "pubsub-test-ca", srv_key.public_key(), False).sign(ca_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    for path, data in ((ca, ca_cert.public_bytes(pem)), (crt, srv_cert.public_bytes(pem)),
                       (key, srv_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))):
        with open(path, "wb") as f:
            f.write(data)
    return ca, crt, key


class RedisServer(_Server):
    """A private redis-server without persistence; optional password, ACL file and TLS."""

    kind = "redis"

    def __init__(self, password: str | None = None, acl_lines: list[str] | None = None,
                 tls: bool = False, extra_args: list[str] | None = None) -> None:
        super().__init__()
        self.password, self.tls, self.extra_args = password, tls, list(extra_args or [])
        self.ca_file: str | None = None
        self._args = ["--bind", LOOPBACK, "--save", "", "--appendonly", "no", "--dir", self.dir,
                      "--daemonize", "no", "--logfile", ""]
        if password:
            self._args += ["--requirepass", password]
        if acl_lines is not None:
            acl = os.path.join(self.dir, "users.acl")
            with open(acl, "w") as f:
                f.write("\n".join(acl_lines) + "\n")
            self._args += ["--aclfile", acl]
        if tls:
            self.ca_file, crt, key = _make_certs(self.dir)
            self._args += ["--tls-cert-file", crt, "--tls-key-file", key,
                           "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no"]

    def _command(self) -> list[str]:
        ports = ["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)]
        return [shutil.which("redis-server") or "/usr/bin/redis-server", *ports, *self._args, *self.extra_args]

    def _probe(self) -> bool:
        """Send PING; any RESP reply (+PONG, -NOAUTH, -NOPERM) means the server is serving."""
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as raw:
                sock: socket.socket = raw
                if self.tls:
                    sock = ssl.create_default_context(cafile=self.ca_file).wrap_socket(raw, server_hostname=LOOPBACK)
                sock.sendall(b"PING\r\n")
                return sock.recv(64)[:1] in (b"+", b"-")
        except OSError:
            return False

    @property
    def url(self) -> str:
        auth = ":" + urllib.parse.quote(self.password, safe="") + "@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{self.host}:{self.port}/0"


# PgBouncer ------------------------------------------------------------------------------
class PgBouncerServer(_Server):
    """PgBouncer in front of a PostgresServer; ``admin_url`` opens the SHOW POOLS console."""

    kind = "pgbouncer"
    stop_signals = {"fast": signal.SIGTERM, "safe": signal.SIGINT, "kill": signal.SIGKILL}
    run_as_postgres = True

    def __init__(self, postgres: PostgresServer, pool_mode: str = "transaction",
                 default_pool_size: int = 2, max_client_conn: int = 500,
                 extra_conf: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.postgres = postgres
        self.user, self.dbname, self.password = postgres.user, postgres.dbname, postgres.password
        self.conf: dict[str, Any] = {
            "listen_addr": LOOPBACK, "unix_socket_dir": self.dir, "auth_type": "trust",
            "auth_file": os.path.join(self.dir, "users.txt"), "admin_users": self.user,
            "pool_mode": pool_mode, "default_pool_size": default_pool_size,
            "max_client_conn": max_client_conn, "ignore_startup_parameters": "extra_float_digits",
            # Retry server logins quickly after a PostgreSQL restart (default is 15 s).
            "server_login_retry": 1, **(extra_conf or {})}

    def _prepare(self) -> None:
        pg = self.postgres
        login = f" user={pg.user} password={pg.password}" if pg.password else ""
        ini = [f"[databases]\n* = host={pg.host} port={pg.port}{login}\n[pgbouncer]",
               f"listen_port = {self.port}", *(f"{k} = {v}" for k, v in self.conf.items())]
        with open(os.path.join(self.dir, "pgbouncer.ini"), "w") as f:
            f.write("\n".join(ini) + "\n")
        with open(self.conf["auth_file"], "w") as f:
            f.write(f'"{pg.user}" "{pg.password or ""}"\n')
        _own(self.dir)

    def _command(self) -> list[str]:
        return [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer", os.path.join(self.dir, "pgbouncer.ini")]

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
        """Admin console; it speaks only the simple query protocol (use psycopg.ClientCursor)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/pgbouncer"

    def django_database(self) -> dict[str, Any]:
        return {"ENGINE": "django.db.backends.postgresql", "NAME": self.dbname, "USER": self.user,
                "PASSWORD": "", "HOST": self.host, "PORT": str(self.port),
                "DISABLE_SERVER_SIDE_CURSORS": True}  # required with transaction pooling


# TCP proxy ------------------------------------------------------------------------------
class TcpProxy:
    """Loopback relay between clients and one server, with network faults on demand.

    ``cut()`` resets every open connection (as a crashed middlebox would) but keeps
    accepting; ``stall()`` keeps sockets open and forwards nothing in either direction,
    including FIN (a black hole / half-open link) until ``resume()``; ``slow(d)`` delays
    each forwarded chunk by ``d`` seconds.  Two threads per connection, capped by
    ``max_connections``.
    """

    def __init__(self, target_host: str, target_port: int, max_connections: int = 1024) -> None:
        if not ipaddress.ip_address(socket.gethostbyname(target_host)).is_loopback:
            raise ValueError("TcpProxy only relays to loopback addresses")
        self.target = (target_host, target_port)
        self.max_connections = max_connections
        self.host = LOOPBACK
        self._listener = socket.create_server((LOOPBACK, 0), backlog=128)
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._delay = 0.0
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> "TcpProxy":
        if self._thread is None:
            self._thread = threading.Thread(target=self._accept_loop, name=f"proxy:{self.port}", daemon=True)
            self._thread.start()
        return self

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def url_for(self, url: str) -> str:
        """Rewrite a server URL so that it goes through this proxy."""
        parts = urllib.parse.urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        return parts._replace(netloc=(auth + "@" if auth else "") + f"{self.host}:{self.port}").geturl()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
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
            for src, dst in (pair, pair[::-1]):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, socket.socket]) -> None:
        try:
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
        except OSError:
            pass
        with self._lock:
            if pair not in self._pairs:
                return
            self._pairs.discard(pair)
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    @staticmethod
    def _abort(sock: socket.socket) -> None:
        """Close with an RST instead of a FIN; SHUT_RD first wakes a thread blocked in recv."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
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
        """Back to normal forwarding: ends a stall and any slow() delay."""
        self._delay = 0.0
        self._flowing.set()

    def slow(self, delay_seconds: float) -> None:
        self._delay = max(0.0, delay_seconds)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()
        if self._thread is not None:
            self._thread.join(2)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
