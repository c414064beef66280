"""The nats backend with JetStream replay on, against a throwaway nats-server with a store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pulp_pubsub_tools.testing import NatsServer

from .harness_nats import NatsHarness


class NatsJetStreamHarness(NatsHarness):
    name = "nats"  # the backend; the fixture id is "natsjs"
    replays = True


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[NatsJetStreamHarness]:
    server = NatsServer(jetstream=True)
    try:
        server.start()
        yield NatsJetStreamHarness(server, jetstream=True, stream_max_age=600.0)
    finally:
        server.cleanup()
