"""The object every callback receives."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message.

    ``channel`` and ``payload`` match the attributes of psycopg's ``Notify``,
    so handlers written for Pulp's LISTEN loop accept a ``Message`` unchanged.
    ``resync`` marks the synthetic message sent after a reconnect (or a
    queue overflow): messages on ``channel`` may have been missed, so the
    receiver should look again. Its payload is always empty. ``group`` is
    the targeted-delivery group this message was handed to this subscriber
    for (None: a broadcast, which every subscriber of the channel gets).
    """

    channel: str
    payload: str
    received_at: float = field(default_factory=time.time)
    resync: bool = False
    group: str | None = None
