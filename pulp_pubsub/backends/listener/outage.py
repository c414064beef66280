"""How a subscriber tells its operator that its connection is lost, deaf, or back.

A flapping connection or a long outage must not flood the log, yet the first loss of an
outage must be seen with its cause, and a deaf connection (which no retry will cure until
someone changes a setting) must keep being seen.
"""

from __future__ import annotations

import logging
import time

# The listener's one logger, whichever of its modules writes.
logger = logging.getLogger(__package__)

#: At most one WARNING about a lost connection per subscriber in this many
#: seconds, so a flapping connection or a long outage does not flood the log.
OUTAGE_LOG_INTERVAL = 60.0


class OutageLog:
    def __init__(self, backend_name: str) -> None:
        self.backend_name = backend_name
        self._started = 0.0
        self._warned = False
        self._warned_at: float | None = None
        self._quiet = 0
        self._deaf_logged_at: float | None = None

    def lost(self, cause: str) -> None:
        """One WARNING with the cause per outage, and at most one per interval.

        An outage whose warning is held back is counted and named in the next
        warning; its recovery is then logged at DEBUG, not INFO.
        """
        now = self._started = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < OUTAGE_LOG_INTERVAL:
            self._quiet += 1
            self._warned = False
            logger.debug("Pub/sub %s subscriber lost its connection: %s", self.backend_name, cause)
            return
        quiet = self._quiet
        logger.warning(
            "Pub/sub %s subscriber lost its connection (%s); reconnecting.%s",
            self.backend_name,
            cause,
            f" {quiet} more outage(s) since the last warning were not logged." if quiet else "",
        )
        self._warned_at, self._quiet, self._warned = now, 0, True

    def deaf(self, exc: BaseException) -> None:
        """The deafness itself, at ERROR: its message says the fix."""
        now = time.monotonic()
        if self._deaf_logged_at is None or now - self._deaf_logged_at >= OUTAGE_LOG_INTERVAL:
            self._deaf_logged_at = now
            logger.error("%s", exc)

    def reconnected(self) -> None:
        (logger.info if self._warned else logger.debug)(
            "Pub/sub %s subscriber reconnected after %.1f s.",
            self.backend_name,
            time.monotonic() - self._started,
        )

    def hears_again(self) -> None:
        logger.info("Pub/sub %s subscriber hears again.", self.backend_name)
