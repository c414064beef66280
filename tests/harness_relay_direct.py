"""Two relays with no PostgreSQL at all; publishers send to both (``publish='direct'``)."""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from typing import Any

from pulp_pubsub.backends.relay.protocol import RelayConnection

from .harness_relay import RelayHarness, relays_over


class DirectRelayHarness(RelayHarness):
    # The backend's name, which messages and commands print; the parameter says the mode.
    name = "relay"
    mode = "direct"

    def publish_external(self, wire_channel: str, payload: str) -> None:
        """A publish frame from a plain WebSocket client, to every relay."""
        for relay in self.relays:
            conn = RelayConnection(relay.url, self.token, 5.0)
            try:
                deadline = time.monotonic() + 5
                conn.send(deadline, type="publish", id=1, channel=wire_channel, payload=payload)
                while not any(f["type"] == "published" for f in conn.read()):
                    assert conn.wait(deadline), "the relay did not answer"
            finally:
                conn.close()


@contextlib.contextmanager
def make_harness(tmp_path_factory: Any) -> Iterator[DirectRelayHarness]:
    token = secrets.token_urlsafe(24)
    with relays_over(None, token) as relays:
        yield DirectRelayHarness(None, relays, token)
