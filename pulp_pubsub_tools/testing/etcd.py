"""Throwaway etcd members: a single server, or a 3-member cluster on loopback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from .processes import LOOPBACK, ServerProcess, free_port

INSTALL_HINT = "etcd not found: install it with `apt-get install etcd-server` (Debian/Ubuntu)."


def etcd_binary() -> str:
    path = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    return path


def call(
    url: str,
    path: str,
    body: dict[str, Any],
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
) -> dict[str, Any]:
    """One JSON-gateway call with the standard library (what curl would do)."""
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


class EtcdServer(ServerProcess):
    """One etcd member; alone it is a single-node cluster, or a member of ``EtcdCluster``."""

    kind = "etcd"
    stop_signals = {"graceful": 15, "kill": 9}

    def __init__(
        self,
        name: str = "default",
        extra_args: list[str] | None = None,
        tls: bool = False,
        password: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.tls = tls
        #: With a password, authentication is turned on for user ``root`` at the first start.
        self.password = password
        self.ca_file = self.cert_file = self.key_file = ""
        self._context: ssl.SSLContext | None = None
        if tls:
            from .redis import _make_certs

            # The server's certificate has no extended key usage, so it also
            # serves as the client certificate the server demands.
            self.ca_file, self.cert_file, self.key_file = _make_certs(self.dir)
            self._context = ssl.create_default_context(cafile=self.ca_file)
            self._context.load_cert_chain(self.cert_file, self.key_file)
            extra_args = [
                "--cert-file",
                self.cert_file,
                "--key-file",
                self.key_file,
                "--client-cert-auth",
                "--trusted-ca-file",
                self.ca_file,
                *(extra_args or []),
            ]
        self.peer_port = free_port()
        self.initial_cluster: str | None = None
        self.need_quorum = True
        self._extra = extra_args or []

    @property
    def url(self) -> str:
        auth = f"root:{quote(self.password, safe='')}@" if self.password else ""
        return f"{'etcds' if self.tls else 'etcd'}://{auth}{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30.0) -> EtcdServer:
        first = not self._started_once
        super().start(timeout)
        if first and self.password:
            self.enable_auth("root", self.password)
        return self

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    def call(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        return call(self.http_url, path, body, timeout, self._context)

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"

    def _command(self) -> list[str]:
        return [
            etcd_binary(),
            "--name",
            self.name,
            "--data-dir",
            os.path.join(self.dir, "data"),
            "--listen-client-urls",
            self.http_url,
            "--advertise-client-urls",
            self.http_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state",
            "new",
            # Short Raft timers: a lost leader is replaced in well under a second.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--log-level",
            "warn",
            *self._extra,
        ]

    def _probe(self) -> bool:
        try:
            if not self.need_quorum:
                # A cluster member serves nothing before a quorum: its port is enough here.
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return True
            return self._probe_kv()
        except OSError:
            return False

    def _probe_kv(self) -> bool:
        """etcd's /health: a quorum read inside the server, answered with auth on too."""
        try:
            with urllib.request.urlopen(
                self.http_url + "/health", timeout=1, context=self._context
            ) as response:
                return bool(json.loads(response.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def status(self) -> dict[str, Any]:
        return self.call("/v3/maintenance/status", {})

    def compact(self) -> int:
        """Compact the history up to the current revision; returns that revision."""
        revision = int(self.call("/v3/kv/range", {"key": "eA=="})["header"]["revision"])
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def put(self, key: str, value: str) -> None:
        import base64

        def b(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        self.call("/v3/kv/put", {"key": b(key), "value": b(value)})

    def enable_auth(self, user: str, password: str) -> None:
        """A root user with ``password``, then authentication on (etcdctl's sequence)."""
        self.call("/v3/auth/user/add", {"name": user, "password": password})
        self.call("/v3/auth/role/add", {"name": "root"})
        self.call("/v3/auth/user/grant", {"user": user, "role": "root"})
        self.call("/v3/auth/enable", {})


class EtcdCluster:
    """Three members on loopback; ``leader()`` finds the member to kill."""

    def __init__(self, size: int = 3) -> None:
        self.members = [EtcdServer(name=f"m{i}") for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = initial
            m.need_quorum = False  # a member alone never has one; the cluster waits below

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"{LOOPBACK}:{m.port}" for m in self.members)

    def start(self, timeout: float = 30.0) -> EtcdCluster:
        for m in self.members:
            m.start(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.leader() is not None and all(m._probe_kv() for m in self.members):
                return self
            time.sleep(0.05)
        raise RuntimeError("the etcd cluster elected no leader within {timeout} s")

    def leader(self) -> EtcdServer | None:
        for m in self.members:
            if not m.running:
                continue
            try:
                status = m.status()
            except (OSError, ValueError, urllib.error.URLError):
                continue
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                return m
        return None

    def cleanup(self) -> None:
        for m in self.members:
            m.cleanup()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
