"""Throwaway ZooKeeper servers: a standalone one, or a 3-member ensemble on loopback.

They run Debian's ``zookeeper`` package (the jars in /usr/share/java, Java from the
machine) as ``QuorumPeerMain`` with a small ``tickTime`` and the admin server off, so a
server answers within a second or two of its start and a lost leader is replaced quickly.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from typing import Any

from .processes import LOOPBACK, ServerProcess, free_port

JAR = "/usr/share/java/zookeeper.jar"
#: The jar's manifest names most of its dependencies; the Netty server (TLS) also needs
#: these, and slf4j a binding or it warns on stderr.
EXTRA_JARS = (
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar",
    "/usr/share/java/slf4j-simple.jar",
)
INSTALL_HINT = "ZooKeeper is not installed; install it with: apt-get install zookeeper"
#: Milliseconds: sessions may last from 2 to 20 ticks, so 200 allows 0.4 s to 4 s.
TICK_MS = 200


def java_command() -> list[str]:
    """``java -cp ...`` for the Debian jars, or the error naming the package that brings them."""
    java = shutil.which("java") or "/usr/bin/java"
    if not os.path.exists(JAR) or not os.access(java, os.X_OK):
        raise RuntimeError(INSTALL_HINT)
    classpath = [JAR, *(jar for jar in EXTRA_JARS if os.path.exists(jar))]
    # A short-lived JVM: the client compiler only, a small heap, serial GC.
    return [
        java,
        "-Xms32m",
        "-Xmx256m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Dzookeeper.admin.enableServer=false",
        # Empty containers (a closed subscriber's private channels) go within a second.
        "-Dznode.container.checkIntervalMs=1000",
        "-cp",
        ":".join(classpath),
    ]


def four_letter(host: str, port: int, word: str, timeout: float = 1.0) -> str:
    """A four-letter command (``ruok``, ``srvr``, ``mntr``): what ``echo srvr | nc`` prints."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(word.encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode("utf-8", "replace")


class ZookeeperServer(ServerProcess):
    """One ZooKeeper server; alone it is standalone, or a member of a ``ZookeeperEnsemble``."""

    kind = "zookeeper"
    package = "zookeeper"
    stop_signals = {"graceful": 15, "kill": 9}

    def __init__(
        self,
        server_id: int = 0,
        tls: bool = False,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.server_id = server_id
        self.tls = tls
        self.ensemble: list[ZookeeperServer] | None = None
        self.quorum_port = free_port()
        self.election_port = free_port()
        self.secure_port: int | None = None
        self.ca_file = self.cert_file = self.key_file = ""
        self.extra_config = dict(extra_config or {})
        if tls:
            from .redis import _make_certs

            # The server's certificate (no extended key usage) doubles as the client's.
            self.ca_file, self.cert_file, self.key_file = _make_certs(self.dir)
            self.secure_port = free_port()

    @property
    def url(self) -> str:
        if self.tls:
            return f"zks://{LOOPBACK}:{self.secure_port}"
        return f"zk://{LOOPBACK}:{self.port}"

    @property
    def hosts(self) -> str:
        """The plain connect string, as kazoo and zkCli take it."""
        return f"{LOOPBACK}:{self.port}"

    def _prepare(self) -> None:
        data = os.path.join(self.dir, "data")
        os.makedirs(data, exist_ok=True)
        lines = {
            "tickTime": TICK_MS,
            "initLimit": 20,
            "syncLimit": 10,
            "dataDir": data,
            "clientPort": self.port,
            "clientPortAddress": LOOPBACK,
            "admin.enableServer": "false",
            "4lw.commands.whitelist": "*",
            "maxClientCnxns": 0,
            "preAllocSize": 1024,
            "snapCount": 100000,
            "forceSync": "no",
        }
        if self.tls:
            key_pem = os.path.join(self.dir, "server-keystore.pem")
            with open(key_pem, "w") as out:
                for path in (self.key_file, self.cert_file):
                    with open(path) as f:
                        out.write(f.read())
            lines.update(
                {
                    "secureClientPort": self.secure_port,
                    "secureClientPortAddress": LOOPBACK,
                    "serverCnxnFactory": "org.apache.zookeeper.server.NettyServerCnxnFactory",
                    "ssl.keyStore.location": key_pem,
                    "ssl.keyStore.type": "PEM",
                    "ssl.trustStore.location": self.ca_file,
                    "ssl.trustStore.type": "PEM",
                    "ssl.clientAuth": "need",
                }
            )
        if self.ensemble:
            for member in self.ensemble:
                lines[f"server.{member.server_id}"] = (
                    f"{LOOPBACK}:{member.quorum_port}:{member.election_port}"
                )
            with open(os.path.join(data, "myid"), "w") as f:
                f.write(f"{self.server_id}\n")
        lines.update(self.extra_config)
        with open(os.path.join(self.dir, "zoo.cfg"), "w") as f:
            f.writelines(f"{key}={value}\n" for key, value in lines.items())

    def _command(self) -> list[str]:
        return [
            *java_command(),
            "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            os.path.join(self.dir, "zoo.cfg"),
        ]

    def _probe(self) -> bool:
        """Serving: ``srvr`` names a mode (a member without a quorum says it is not serving).

        A member's first start waits only for its port: it has no quorum until the others run.
        """
        try:
            if self.ensemble and not self._started_once:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return True
            return "Mode:" in four_letter(self.host, self.port, "srvr")
        except OSError:
            return False

    def mode(self) -> str | None:
        """``standalone``, ``leader`` or ``follower``; None when not serving."""
        try:
            answer = four_letter(self.host, self.port, "srvr")
        except OSError:
            return None
        for line in answer.splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def client_connections(self) -> int:
        """Client connections the server holds (``cons`` lists one line each)."""
        try:
            answer = four_letter(self.host, self.port, "cons")
        except OSError:
            return 0
        return sum(1 for line in answer.splitlines() if line.strip().startswith("/"))


class ZookeeperEnsemble:
    """Three members on loopback; ``leader()`` finds the one to kill."""

    def __init__(self, size: int = 3) -> None:
        self.members = [ZookeeperServer(server_id=i + 1) for i in range(size)]
        for member in self.members:
            member.ensemble = self.members

    @property
    def url(self) -> str:
        return "zk://" + ",".join(f"{LOOPBACK}:{m.port}" for m in self.members)

    @property
    def hosts(self) -> str:
        return ",".join(m.hosts for m in self.members)

    def start(self, timeout: float = 60.0) -> ZookeeperEnsemble:
        # Each member waits for a quorum before it serves: start them all, then wait.
        for member in self.members:
            member.start(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(m.mode() for m in self.members):
                for member in self.members:
                    member._started_once = True
                return self
            time.sleep(0.05)
        tails = "\n".join(m.log_tail(10) for m in self.members)
        raise RuntimeError(f"the ZooKeeper ensemble did not form within {timeout} s:\n{tails}")

    def leader(self) -> ZookeeperServer | None:
        for member in self.members:
            if member.running and member.mode() == "leader":
                return member
        return None

    def cleanup(self) -> None:
        for member in self.members:
            member.cleanup()

    def __enter__(self) -> ZookeeperEnsemble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
