"""A throwaway redis-server for the contract and fault tests of the redis backend."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis

from pulp_pubsub_tools.testing import RedisServer

from .harness import Harness

#: The stop modes of the other harnesses, in RedisServer's words.
MODES = {"fast": "graceful", "smart": "graceful", "immediate": "kill"}


class RedisHarness(Harness):
    name = "redis"
    cross_process = True
    payload_limit = None
    allows_nul = True

    def __init__(self, server: RedisServer) -> None:
        self.server = server

    @property
    def url(self) -> str:
        return self.server.url

    def settings(self, **extra_options: Any) -> dict[str, Any]:
        return {"PUBSUB_BACKEND": "redis", "PUBSUB_URL": self.url, "PUBSUB_OPTIONS": extra_options}

    def connect(self) -> redis.Redis:
        """A plain client of the server, as redis-cli or any other program would be."""
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=5)

    def restart(self, mode: str = "fast") -> None:
        self.server.restart(MODES.get(mode, mode))

    def kill_subscriber_connections(self) -> int:
        with self.connect() as client:
            return int(client.client_kill_filter(_type="pubsub"))

    def freeze(self) -> None:
        self.server.freeze()

    def thaw(self) -> None:
        self.server.thaw()

    def publish_external(self, wire_channel: str, payload: str) -> None:
        with self.connect() as client:
            client.publish(wire_channel, payload)


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[RedisHarness]:
    server = RedisServer()
    try:
        server.start()
        yield RedisHarness(server)
    finally:
        server.cleanup()
