"""A throwaway ZooKeeper server for the contract and fault tests of the zookeeper backend.

Clients reach it through a TcpProxy in a child process (as etcd's do): ZooKeeper has no
command that drops one client's connection, so ``kill_subscriber_connections()`` resets
them at the proxy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from kazoo.client import KazooClient

from pulp_pubsub.backends.zookeeper.backend import ZookeeperBackend
from pulp_pubsub.backends.zookeeper.names import escape
from pulp_pubsub_tools.testing import ZookeeperServer

from .harness import ProxiedServerHarness
from .harness_etcd import ProxyProcess

ROOT = ZookeeperBackend.options["root"]


class ZookeeperHarness(ProxiedServerHarness):
    name = "zookeeper"
    cross_process = True
    payload_limit = ZookeeperBackend.options["max_payload"]
    allows_nul = True
    #: A reconnecting subscriber replays the gap instead of resyncing.
    replays = True
    #: (user, password) for digest authentication, or None.
    credentials: tuple[str, str] | None = None

    def __init__(self, server: ZookeeperServer, proxy: ProxyProcess) -> None:
        self.server, self.proxy = server, proxy

    @property
    def url(self) -> str:
        auth = ""
        if self.credentials:
            user, password = self.credentials
            auth = f"{user}:{quote(password, safe='')}@"
        return f"zk://{auth}{self.proxy.host}:{self.proxy.port}"

    def settings(self, **extra_options: Any) -> dict[str, Any]:
        # A JVM stopping and starting again on a loaded machine took up to 25 s here, longer
        # than the default outage_interval, whose periodic resync would then stand beside
        # the replay the fault tests expect; degraded mode is tested on its own.
        options = {"outage_interval": 120.0, **extra_options}
        return {"PUBSUB_BACKEND": "zookeeper", "PUBSUB_URL": self.url, "PUBSUB_OPTIONS": options}

    def server_connections(self) -> int:
        """Client connections the server holds, less the one asking (``cons`` counts it)."""
        return max(0, self.server.client_connections() - 1)

    @contextlib.contextmanager
    def client(self) -> Iterator[KazooClient]:
        """A plain kazoo client, with the layer's credentials when there are any."""
        auth = [("digest", ":".join(self.credentials))] if self.credentials else None
        zk = KazooClient(self.server.hosts, auth_data=auth)
        zk.start(timeout=10)
        try:
            yield zk
        finally:
            zk.stop()
            zk.close()

    def publish_external(self, wire_channel: str, payload: str) -> None:
        from kazoo.security import CREATOR_ALL_ACL, OPEN_ACL_UNSAFE

        acl = CREATOR_ALL_ACL if self.credentials else OPEN_ACL_UNSAFE
        with self.client() as zk:
            zk.create(
                f"{ROOT}/{escape(wire_channel)}/m",
                payload.encode(),
                acl=acl,
                sequence=True,
                makepath=True,
            )


@contextlib.contextmanager
def make_harness(
    tmp_path_factory: Any, kind: type[ZookeeperHarness] = ZookeeperHarness
) -> Iterator[ZookeeperHarness]:
    server = ZookeeperServer()
    try:
        server.start()
        proxy = ProxyProcess(server.host, server.port)
        try:
            yield kind(server, proxy)
        finally:
            proxy.close()
    finally:
        server.cleanup()
