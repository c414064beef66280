"""A throwaway etcd member for the contract and fault tests of the etcd backend.

Clients reach it through a TcpProxy: etcd has no command to drop a client's
connections, so ``kill_subscriber_connections()`` resets them at the proxy. The
proxy runs in a child process, so its relay threads are not the test's own
(the contract tests count threads).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from pulp_pubsub.backends.etcd.backend import EtcdBackend
from pulp_pubsub_tools.testing import EtcdServer

from .harness import ProxiedServerHarness

_PROXY = """
import sys
from pulp_pubsub_tools.testing import TcpProxy
with TcpProxy(sys.argv[1], int(sys.argv[2])) as proxy:
    print(proxy.port, flush=True)
    for line in sys.stdin:
        if line.strip() == "cut":
            n = proxy.connections
            proxy.cut()
            print(n, flush=True)
"""


class ProxyProcess:
    """A TcpProxy in a child process, driven over its stdin."""

    def __init__(self, host: str, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PROXY, host, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.host, self.port = host, int(self.proc.stdout.readline())

    def cut(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("cut\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class EtcdHarness(ProxiedServerHarness):
    name = "etcd"
    cross_process = True
    payload_limit = EtcdBackend.payload_limit
    allows_nul = True
    #: A reconnecting subscriber replays the gap instead of resyncing.
    replays = True

    def __init__(self, server: EtcdServer, proxy: ProxyProcess) -> None:
        self.server, self.proxy = server, proxy

    @property
    def url(self) -> str:
        return f"etcd://{self.proxy.host}:{self.proxy.port}"

    def settings(self, **extra_options: Any) -> dict[str, Any]:
        return {"PUBSUB_BACKEND": "etcd", "PUBSUB_URL": self.url, "PUBSUB_OPTIONS": extra_options}

    def server_connections(self) -> int:
        """Established TCP connections to etcd's client port (etcd has no client list)."""
        port = f":{self.server.port:04X}"
        held = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError), open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    held += fields[1].endswith(port) and fields[3] == "01"
        return held

    def publish_external(self, wire_channel: str, payload: str) -> None:
        self.server.put(EtcdBackend.options["key_prefix"] + wire_channel, payload)


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[EtcdHarness]:
    server = EtcdServer()
    try:
        server.start()
        proxy = ProxyProcess(server.host, server.port)
        try:
            yield EtcdHarness(server, proxy)
        finally:
            proxy.close()
    finally:
        server.cleanup()
