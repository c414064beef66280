"""The smallest etcd role of docs/security.md, run on a throwaway etcd with auth on."""

from __future__ import annotations

import base64

import pytest

from pulp_pubsub.backends.etcd.backend import EtcdBackend, _prefix_end
from pulp_pubsub.exceptions import PublishError
from pulp_pubsub_tools.testing import EtcdServer

from .util import dispatch_until, wait_until

pytestmark = pytest.mark.backend

FAST = {"probe_interval": 0.5, "probe_timeout": 2.0, "reconnect_max": 0.3}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def grant_prefix(server: EtcdServer, role: str, prefix: bytes) -> None:
    """``etcdctl role grant-permission ROLE readwrite --prefix PREFIX``."""
    perm = {"permType": "READWRITE", "key": b64(prefix), "range_end": b64(_prefix_end(prefix))}
    server.call("/v3/auth/role/add", {"name": role})
    server.call("/v3/auth/role/grant", {"name": role, "perm": perm})


@pytest.fixture(scope="module")
def server():
    with EtcdServer() as running:
        for user, role, prefix in (("pulp", "pubsub", b"pubsub/"), ("other", "elsewhere", b"x/")):
            running.call("/v3/auth/user/add", {"name": user, "password": f"{user}-pw"})
            grant_prefix(running, role, prefix)
            running.call("/v3/auth/user/grant", {"user": user, "role": role})
        running.call("/v3/auth/user/add", {"name": "root", "password": "root-pw"})
        running.call("/v3/auth/role/add", {"name": "root"})
        running.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        running.call("/v3/auth/enable", {})
        yield running


def test_a_user_with_readwrite_on_the_prefix_is_enough(server):
    backend = EtcdBackend(url=f"etcd://pulp:pulp-pw@{server.host}:{server.port}", options=FAST)
    with backend.subscriber() as sub:
        got: list = []
        sub.subscribe("pulp_worker_wakeup", got.append)
        backend.publish("pulp_worker_wakeup", "handle")
        dispatch_until(sub, lambda: got)
        # The liveness probe (a put and its watch event) works too.
        wait_until(lambda: sub.probe_rtt is not None, timeout=10, what="a probe round trip")
        assert sub.stats["reconnects"] == 0, sub.last_error
    backend.close()


def test_a_user_without_rights_on_the_prefix_gets_clear_errors(server):
    backend = EtcdBackend(url=f"etcd://other:other-pw@{server.host}:{server.port}", options=FAST)
    with pytest.raises(PublishError, match="permission denied"):
        backend.publish("pulp_worker_wakeup", "handle")
    with backend.subscriber() as sub:
        sub.subscribe("pulp_worker_wakeup", lambda m: None)
        wait_until(lambda: sub.last_error, timeout=10, what="the subscriber's error")
        assert "permission denied" in str(sub.last_error)
    backend.close()
