"""Channels, the handlers that apps attach to them, and wiring both to a subscriber.

Mistakes (a handler for an undeclared channel, the same handler twice, a
channel declared twice with different rules) raise ``ImproperlyConfigured``
while the apps load, so a worker with a broken handler module never starts
rather than silently missing its messages.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import autodiscover_modules

from .backends.listener import Callback, Subscriber
from .exceptions import InvalidChannel, InvalidPayload
from .validation import validate_channel, validate_group

WAKEUP = "pulp_worker_wakeup"
#: The targeted-delivery groups of WAKEUP: who may unblock tasks (not the
#: auxiliary workers), and who may run them.
UNBLOCKERS = "unblock"
RUNNERS = "handle"
CANCEL = "pulp_worker_cancel"
METRICS_HEARTBEAT = "pulp_worker_metrics_heartbeat"

PayloadCheck = Callable[[str], bool]


def _is_uuid(payload: str) -> bool:
    try:
        uuid.UUID(payload)
    except ValueError:
        return False
    return True


def _is_iso_time(payload: str) -> bool:
    try:
        datetime.fromisoformat(payload)
    except ValueError:
        return False
    return True


def _is_wakeup_reason(payload: str) -> bool:
    # Any text: pulpcore's receivers treat a reason they do not know as "do
    # both", so a release that adds one must not make dispatch() raise here.
    # The integration's seam check notices a new reason at start-up instead.
    return True


@dataclass(frozen=True)
class Channel:
    name: str
    description: str = ""
    check: PayloadCheck | None = field(default=None, compare=False)
    check_doc: str = ""
    #: The groups its messages may be targeted to (empty: broadcast only).
    groups: tuple[str, ...] = ()


class Registry:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._channels: dict[str, Channel] = {}
        self._handlers: dict[str, list[Callback]] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every app's channels and handlers; keep the built-in channels."""
        with self._lock:
            self._channels.clear()
            self._handlers.clear()
            self.declare(
                WAKEUP,
                "Wakes task workers.",
                _is_wakeup_reason,
                "any text",
                groups=(UNBLOCKERS, RUNNERS),
            )
            self.declare(CANCEL, "Cancels the task with this id.", _is_uuid, "a task UUID")
            self.declare(
                METRICS_HEARTBEAT,
                "Moves every worker's last metrics report time.",
                _is_iso_time,
                "an ISO-8601 timestamp",
            )

    def declare(
        self,
        name: str,
        description: str = "",
        check: PayloadCheck | None = None,
        check_doc: str = "",
        groups: tuple[str, ...] = (),
    ) -> Channel:
        """Declare a channel; ``groups`` names the targeted-delivery groups it uses."""
        validate_channel(name)
        for group in groups:
            validate_group(group)
        channel = Channel(name, description, check, check_doc, tuple(groups))
        with self._lock:
            existing = self._channels.get(name)
            if existing is not None and (existing, existing.check) != (channel, check):
                raise ImproperlyConfigured(f"Channel {name!r} is already declared differently.")
            self._channels[name] = channel
        return channel

    def handler(self, channel: str) -> Callable[[Callback], Callback]:
        """Decorator: run the function for every message on ``channel``."""

        def register(func: Callback) -> Callback:
            self.add_handler(channel, func)
            return func

        return register

    def add_handler(self, channel: str, func: Callback) -> None:
        with self._lock:
            if channel not in self._channels:
                raise ImproperlyConfigured(
                    f"Handler {qualname(func)} is for channel {channel!r}, which is not "
                    "declared; declare it with registry.declare() first."
                )
            handlers = self._handlers.setdefault(channel, [])
            if func in handlers:
                raise ImproperlyConfigured(
                    f"Handler {qualname(func)} is registered twice for channel {channel!r}."
                )
            handlers.append(func)

    def channels(self) -> list[Channel]:
        with self._lock:
            return sorted(self._channels.values(), key=lambda c: c.name)

    def handlers(self, channel: str) -> list[Callback]:
        with self._lock:
            return list(self._handlers.get(channel, ()))

    def check_payload(self, channel: str, payload: str) -> None:
        declared = self._channels.get(channel)
        if declared is None or declared.check is None or not isinstance(payload, str):
            return
        if not declared.check(payload):
            raise InvalidPayload(
                f"Channel {channel!r} expects {declared.check_doc or 'another payload'}, "
                f"not {payload[:80]!r}."
            )

    def check_group(self, channel: str, group: str | None) -> None:
        """A declared channel takes targeted messages only for the groups it declares."""
        declared = self._channels.get(channel)
        if group is None or declared is None or group in declared.groups:
            return
        raise InvalidChannel(
            f"Channel {channel!r} declares no group {group!r} "
            f"(its groups: {', '.join(declared.groups) or 'none, broadcast only'})."
        )

    def connect(self, subscriber: Subscriber) -> list[str]:
        """Subscribe ``subscriber`` to every channel that has handlers."""
        with self._lock:
            wiring = {channel: list(funcs) for channel, funcs in self._handlers.items() if funcs}
        for channel, funcs in sorted(wiring.items()):
            for func in funcs:
                subscriber.subscribe(channel, func)
        return sorted(wiring)

    def autodiscover(self) -> None:
        autodiscover_modules("pubsub")


def qualname(func: Callable[..., object]) -> str:
    module = getattr(func, "__module__", "?")
    return f"{module}.{getattr(func, '__qualname__', repr(func))}"


registry = Registry()
