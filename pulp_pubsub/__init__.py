"""pulp-pubsub: pluggable push-based publish/subscribe for Django worker fleets."""

from __future__ import annotations

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
    "registry",
]


def get_backend() -> BaseBackend:
    """The process's backend, built from the settings on first use."""
    return backends.get()


def publish(channel: str, payload: str = "") -> None:
    """Send ``payload`` on ``channel``; inside ``transaction.atomic()``, at commit."""
    registry.check_payload(channel, payload)
    backends.get().publish(channel, payload)
