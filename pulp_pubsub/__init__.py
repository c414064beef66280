"""pulp-pubsub: pluggable push-based publish/subscribe for Django worker fleets."""

from __future__ import annotations

from .backends.aftercommit import Report
from .backends.base import BaseBackend
from .backends.listener import Subscriber
from .exceptions import InvalidChannel, InvalidPayload, PublishError, PubSubError
from .handler import backends
from .message import Message
from .registry import CANCEL, METRICS_HEARTBEAT, WAKEUP, registry

__all__ = [
    "CANCEL",
    "METRICS_HEARTBEAT",
    "WAKEUP",
    "BaseBackend",
    "InvalidChannel",
    "InvalidPayload",
    "Message",
    "PubSubError",
    "PublishError",
    "Subscriber",
    "get_backend",
    "publish",
    "publish_soon",
    "registry",
]


def get_backend() -> BaseBackend:
    """The process's backend, built from the settings on first use."""
    return backends.get()


def publish(
    channel: str, payload: str = "", *, group: str | None = None, receivers: int = 1
) -> None:
    """Send ``payload`` on ``channel``; inside ``transaction.atomic()``, at commit.

    With ``group``: targeted delivery, to ``receivers`` members of that group
    instead of every subscriber (a broadcast where the backend cannot target).
    """
    registry.check_payload(channel, payload)
    registry.check_group(channel, group)
    backends.get().publish(channel, payload, group=group, receivers=receivers)


def publish_soon(
    channel: str,
    payload: str = "",
    *,
    group: str | None = None,
    receivers: int = 1,
    report: Report | None = None,
) -> None:
    """:func:`publish` for a message about rows already committed, returning before the
    server has it: a failure on the wire is counted and handed to ``report`` (or
    logged), never raised; bad input still raises (see ``BaseBackend.publish_soon``)."""
    registry.check_payload(channel, payload)
    registry.check_group(channel, group)
    backends.get().publish_soon(channel, payload, group=group, receivers=receivers, report=report)
