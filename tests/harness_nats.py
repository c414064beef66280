"""Throwaway nats-servers for the contract and fault tests of the nats backend."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import nats

from pulp_pubsub_tools.testing import NatsServer

from .harness import Harness

#: The stop modes of the other harnesses, in NatsServer's words.
MODES = {"fast": "graceful", "smart": "graceful", "immediate": "kill"}


class NatsHarness(Harness):
    name = "nats"
    cross_process = True
    # The server's max_payload (1 MiB here, its default) is the only limit: none of the layer's.
    payload_limit = None
    allows_nul = True

    def __init__(self, server: NatsServer, **options: Any) -> None:
        self.server = server
        self.options = options

    @property
    def url(self) -> str:
        return self.server.url

    def settings(self, **extra_options: Any) -> dict[str, Any]:
        return {
            "PUBSUB_BACKEND": "nats",
            "PUBSUB_URL": self.url,
            "PUBSUB_OPTIONS": {**self.options, **extra_options},
        }

    @staticmethod
    def wire_name(prefix: str, name: str) -> str:
        """The subject of ``name``, written independently of the backend (docs/backends.md)."""

        def token(text: str) -> str:
            return text.replace("%", "%25").replace(".", "%2E").replace("$", "%24")

        return (token(prefix) + "." if prefix else "") + token(name)

    def restart(self, mode: str = "fast") -> None:
        self.server.restart(MODES.get(mode, mode))

    def kill_subscriber_connections(self) -> int:
        """nats-server 2.9 has no verb to drop one client, so SIGKILL and start it again.

        Unlike ``restart("fast")`` nothing is closed cleanly: the clients see their
        sockets reset, as when a node dies.
        """
        self.server.restart("kill")
        return 1

    def freeze(self) -> None:
        self.server.freeze()

    def thaw(self) -> None:
        self.server.thaw()

    def server_connections(self) -> int:
        return len(self.server.connections())

    def publish_external(self, wire_channel: str, payload: str) -> None:
        """Publish as any NATS client would: plain nats-py, bytes as given."""
        publish_plain(self.url, wire_channel, payload.encode("utf-8"))


def publish_plain(url: str, subject: str, data: bytes) -> None:
    async def main() -> None:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            await nc.publish(subject, data)
            await nc.flush(5)
        finally:
            await nc.close()

    asyncio.run(main())


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[NatsHarness]:
    server = NatsServer()
    try:
        server.start()
        yield NatsHarness(server)
    finally:
        server.cleanup()
