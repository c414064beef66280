"""A cancel message is acted on only when the database confirms it.

Anyone who can publish on the backend (often a Redis shared with the cache) could
otherwise cancel any running task whose id the API shows. pulpcore's
``cancel_task()`` commits the ``canceling`` state before it sends the message, so
a genuine cancel always passes; what does not is refused here, loudly.
"""

from __future__ import annotations

import logging

from ... import get_backend
from ...message import Message
from ...metrics import count

logger = logging.getLogger(__name__)


def refuse(message: Message) -> None:
    backend = get_backend()
    count(backend.stats, "pulpcore_cancels_refused", backend.name, message.channel)
    logger.warning(
        "Ignored a cancel message for task %s: the database does not show it as being "
        "canceled, so it did not come from Pulp's cancel.",
        message.payload,
    )
