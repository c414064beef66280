"""The zookeeper backend with digest authentication: every znode of the layer carries the
ACL of its user alone, and the plain client of the interop tests logs in as that user."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pulp_pubsub_tools.testing import ZookeeperServer

from .harness_etcd import ProxyProcess
from .harness_zookeeper import ZookeeperHarness

CREDENTIALS = ("pubsub", "s3cret-zk@pw/:")


class ZookeeperAuthHarness(ZookeeperHarness):
    credentials = CREDENTIALS


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[ZookeeperAuthHarness]:
    server = ZookeeperServer()
    try:
        server.start()
        proxy = ProxyProcess(server.host, server.port)
        try:
            yield ZookeeperAuthHarness(server, proxy)
        finally:
            proxy.close()
    finally:
        server.cleanup()
