"""The hear check: proof that a subscription hears what others publish, not only that it is alive.

The liveness probe of most transports travels the publish path, so its coming back proves
both. PostgreSQL's is a bare Sync of the LISTEN session (a NOTIFY would wake every listening
session of the database), which proves the session alive but not hearing: behind a
transaction pooler it is alive and deaf. :class:`HearCheck` covers that gap for the listener.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING

from ...exceptions import ConnectionLost, Deaf

if TYPE_CHECKING:
    from ..transport import Transport

logger = logging.getLogger(__name__)

#: A hear check waits for its own message this long at least, whatever probe_timeout says.
HEAR_TIMEOUT_MIN = 1.0


class HearCheck:
    """Proof that a transport whose probe takes a shorter way hears what others publish.

    See :meth:`Transport.hear_interval`. A check is due after every LISTEN and then every
    interval (jittered); it fails as :class:`Deaf` only when the session itself answered a
    probe after the check was sent, so a stalled or frozen link stays a lost connection,
    found by the probe, and is never mistaken for deafness.
    """

    def __init__(self, transport: Transport, timeout: float, retry: float) -> None:
        self.transport, self.timeout, self.retry = transport, timeout, retry
        self.interval = transport.hear_interval()
        self.token: str | None = None
        self.sent_at = 0.0
        self.deadline = math.inf
        self.next = time.monotonic() if self.interval is not None else math.inf

    def due(self) -> float:
        return self.deadline if self.token else self.next

    def after_listen(self) -> None:
        if self.interval is not None:
            self.next = min(self.next, time.monotonic())

    def answered(self, payload: str) -> bool:
        if self.token is None or payload != self.token:
            return False
        self.token, self.deadline = None, math.inf
        return True

    def step(self, now: float, probe_answered_at: float, channel: str, stats: Counter[str]) -> bool:
        """Send or judge the check; True when a probe should go out now.

        One goes out with every check, so that by its deadline the session has shown
        whether it is alive since, and deafness is judged after one timeout, not two.
        """
        if self.interval is None:
            return False
        if self.token and now >= self.deadline:
            if probe_answered_at > self.sent_at:
                raise Deaf(self.transport.deaf(self.timeout))
            self.deadline = now + self.timeout
            return True
        if not self.token and now >= self.next:
            token = "hear " + uuid.uuid4().hex
            try:
                # Rare on purpose: a NOTIFY wakes every listening session of the database.
                self.transport.hear(channel, token)
            except ConnectionLost as exc:
                # The check's own connection failed, not this one: the probe judges this.
                stats["hear_check_errors"] += 1
                logger.debug("A hear check could not be sent: %s", exc)
                self.next = now + self.retry
                return False
            stats["hear_checks"] += 1
            self.token, self.sent_at = token, time.monotonic()
            self.deadline = self.sent_at + self.timeout
            self.next = self.sent_at + self.interval * random.uniform(0.75, 1.0)
            return True
        return False
