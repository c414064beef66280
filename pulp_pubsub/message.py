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
    receiver should look again. Its payload is always empty.

    ``since`` (on a resync only) is the last moment, in ``time.time()``
    seconds, at which the subscriber had proof that it was hearing: its last
    successful read or probe on the connection that was lost, or the first
    message dropped from a full queue. Messages published well before it were
    delivered; None when the subscriber had never heard anything.

    ``group`` is the targeted-delivery group this message was handed to this
    subscriber for (None: a broadcast, which every subscriber of the channel gets).
    """

    channel: str
    payload: str
    received_at: float = field(default_factory=time.time)
    resync: bool = False
    since: float | None = None
    group: str | None = None
