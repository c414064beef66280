"""The zookeeper backend with digest authentication: every znode of the layer carries the
ACL of its user alone, and the plain client of the interop tests logs in as that user."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from . import harness_zookeeper
from .harness_zookeeper import ZookeeperHarness

CREDENTIALS = ("pubsub", "s3cret-zk@pw/:")


class ZookeeperAuthHarness(ZookeeperHarness):
    credentials = CREDENTIALS


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[ZookeeperHarness]:
    with harness_zookeeper.make_harness(tmp_path_factory, ZookeeperAuthHarness) as running:
        yield running
