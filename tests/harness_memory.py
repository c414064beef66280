from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pulp_pubsub.backends import memory

from .harness import Harness


class MemoryHarness(Harness):
    name = "memory"
    cross_process = False
    payload_limit = 7999
    allows_nul = False

    def settings(self, **extra_options: Any) -> dict[str, Any]:
        return {"PUBSUB_BACKEND": "memory", "PUBSUB_URL": None, "PUBSUB_OPTIONS": extra_options}

    def restart(self, mode: str = "fast") -> None:
        memory.drop_connections()

    def kill_subscriber_connections(self) -> None:
        memory.drop_connections()

    def freeze(self) -> None:
        memory.set_server_down(True)

    def thaw(self) -> None:
        memory.set_server_down(False)

    def publish_external(self, wire_channel: str, payload: str) -> None:
        memory.MemoryBackend().send(wire_channel, payload)


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[MemoryHarness]:
    yield MemoryHarness()
    memory.set_server_down(False)
