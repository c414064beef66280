from __future__ import annotations

import importlib
import os

import pytest

from pulp_pubsub import registry
from pulp_pubsub.backends import memory
from pulp_pubsub.handler import backends

#: Backends the contract tests run on; each has tests/harness_<name>.py ("natsjs" is the
#: nats backend with JetStream replay on, "zookeeper_auth" zookeeper with digest auth).
DEFAULT_BACKENDS = (
    "memory,postgres,redis,relay,relay_direct,etcd,nats,natsjs,zookeeper,zookeeper_auth"
)
CONTRACT_BACKENDS = [
    name for name in os.environ.get("PUBSUB_TEST_BACKENDS", DEFAULT_BACKENDS).split(",") if name
]


@pytest.fixture(autouse=True)
def _fresh_backend():
    """Each test starts with a backend built from its own settings."""
    backends.reset()
    yield
    backends.reset()
    memory.forget_queues()  # targeted messages a test left waiting are not the next one's


@pytest.fixture
def clean_registry():
    registry.reset()
    yield registry
    registry.reset()
    importlib.reload(importlib.import_module("demo.pubsub"))


@pytest.fixture(scope="session", params=CONTRACT_BACKENDS)
def harness(request, tmp_path_factory):
    """A running server of each backend, shared by the tests of that backend."""
    module = importlib.import_module(f"tests.harness_{request.param}")
    with module.make_harness(tmp_path_factory) as running:
        yield running
