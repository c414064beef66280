"""Throwaway Redis servers (with TLS, passwords and ACL users) and Sentinel clusters."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import time
import urllib.parse
from typing import Any

from .processes import LOOPBACK, ServerProcess


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


class RedisServer(ServerProcess):
    """A private redis-server without persistence; optional password, ACL file and TLS."""

    kind = "redis"
    package = "redis-server"

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


class SentinelServer(ServerProcess):
    """One redis-server in sentinel mode watching ``service_name`` (added for the redis tests)."""

    kind = "sentinel"
    package = "redis-server"

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
