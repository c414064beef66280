"""What the contract and fault tests need from each backend under test.

Every backend supplies one ``Harness`` subclass in ``tests/harness_<name>.py``
with a ``make_harness()`` context manager that yields it with its server
running. The contract tests are written once against this interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

from django.test import override_settings

from pulp_pubsub import get_backend
from pulp_pubsub.backends.base import BaseBackend


class Harness:
    name: ClassVar[str] = "base"
    #: True when the server outlives a subscriber's process (not the memory backend).
    cross_process: ClassVar[bool] = True
    #: The largest payload in UTF-8 bytes, or None when the layer sets none.
    payload_limit: ClassVar[int | None] = None
    allows_nul: ClassVar[bool] = True
    #: True when a reconnecting subscriber is handed what it missed instead of a resync.
    replays: ClassVar[bool] = False
    #: The Django database alias whose ``transaction.atomic()`` governs on-commit publishing.
    db_alias: ClassVar[str] = "default"

    def settings(self, **extra_options: Any) -> dict[str, Any]:
        """The ``PUBSUB_*`` settings that point the layer at this server.

        Fault tests pass short probe and backoff options here.
        """
        raise NotImplementedError

    @contextlib.contextmanager
    def configured(self, **extra_options: Any) -> Iterator[BaseBackend]:
        with override_settings(**self.settings(**extra_options)):
            backend = get_backend()
            try:
                yield backend
            finally:
                backend.close()

    # Fault injection: each breaks every subscriber connection in its own way.
    def restart(self, mode: str = "fast") -> None:
        raise NotImplementedError

    def kill_subscriber_connections(self) -> None:
        raise NotImplementedError

    def freeze(self) -> None:
        raise NotImplementedError

    def thaw(self) -> None:
        raise NotImplementedError

    # Interoperability with a plain client of the server.
    def publish_external(self, wire_channel: str, payload: str) -> None:
        raise NotImplementedError


class ProxiedServerHarness(Harness):
    """A throwaway server (``self.server``) whose clients pass a TcpProxy (``self.proxy``):
    for servers with no command that drops a client's connection (etcd, ZooKeeper), which
    the proxy resets instead."""

    server: Any
    proxy: Any
    #: The contract's restart modes, as the server's stop signals.
    MODES: ClassVar[dict[str, str]] = {"fast": "graceful", "smart": "graceful", "immediate": "kill"}

    def restart(self, mode: str = "fast") -> None:
        self.server.restart(self.MODES.get(mode, mode))

    def kill_subscriber_connections(self) -> int:
        return int(self.proxy.cut())

    def freeze(self) -> None:
        self.server.freeze()

    def thaw(self) -> None:
        self.server.thaw()
