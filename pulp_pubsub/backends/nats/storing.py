"""A JetStream publish that outlasts a stream leader election, and is stored once.

A stream stores a message only through its leader. When the node that led it is lost, the
other replicas elect a new one (measured here: 4 to 8 s on nats-server 2.9); meanwhile a
publish goes unanswered. Sent once with the whole ``publish_timeout``, a publish made at
the start of the election failed after 5 s even when the new leader was there after 4, and
the next message was stored only once that failure was over: up to 10 s from a node's loss
to storing again, where the election took at most 8.

So a publish is sent again every half second with short per-try deadlines, earlier tries
still waiting, until its ``publish_timeout`` is spent (:func:`.jsapi.patiently`, which also
says at INFO what it waits for). Every try of one publish carries the same ``Nats-Msg-Id``:
the stream stores the first to reach a leader and acknowledges the others as duplicates,
so a retried publish is never stored twice, provided all its tries fall within the
stream's duplicate window. The backend checks that window when it checks the stream, and
with a window shorter than ``publish_timeout`` it sends one try only, as before.

Meanwhile the subscribers need not wait for the election: from the first retry on, once a
second (:data:`TELL_EVERY` tries), ``tell(msg_id)`` sends a plain NATS message, which no
stream stores, to the channel's live subject: a notice that carries the message itself and
its ``Nats-Msg-Id``. Plain NATS needs no leader, so each live subscriber delivers the
message at once, about a second after the node's loss instead of after the election, and
only once: the repeated notices and the copy the stream stores (and republishes) later
carry the same id, and a subscriber that delivered it early does not deliver it again
(:mod:`.transport`). A message told early is delivered even if its publish then fails: the
publisher gets its PublishError, the subscribers that heard the notice have the message
(at least once, as with any failed publish that may have reached a server). A targeted
publish's notice carries no message (it is for one member of a group, not for every
subscriber): the channel's subscribers resync instead, as all did before this release.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from .jsapi import INTERVAL, patiently
from .names import MSG_ID

logger = logging.getLogger(__name__)

#: Seconds one try waits for its acknowledgement, at most: short, so that tries keep going
#: to the cluster (a try sent while no leader is elected is never answered), long enough for
#: a loaded server's late acknowledgement, which still counts while later tries wait.
TRY_TIMEOUT = 2.0
#: While a publish waits, its subscribers are told every this many tries (a second).
TELL_EVERY = 2


def message_id() -> str:
    """An id unique to one publish (one copy of a targeted one), shared by all its tries."""
    return uuid.uuid4().hex


async def store(
    nc: Client,
    subject: str,
    data: bytes,
    deadline: float,
    what: str,
    retry: bool = True,
    no_stream: Callable[[float], Awaitable[Any]] | None = None,
    msg_id: str | None = None,
    tell: Callable[[str], Awaitable[None]] | None = None,
) -> Any:
    """Publish ``data`` to ``subject`` and wait for a stream's acknowledgement until ``deadline``.

    With ``retry`` the publish is sent again every :data:`~.jsapi.INTERVAL` while none is
    answered (see the module doc); without it, once, waiting until ``deadline``. When no
    stream captures the subject (no responders), ``no_stream(timeout)`` is awaited once, to
    make the stream again, and the publish goes on. Raises ConnectionLost naming ``what``
    when nothing was acknowledged in time, and any other refusal as it is. ``msg_id``: the
    message's id, when the caller sends it again on another connection. ``tell(msg_id)``:
    tells the channel's subscribers that the message with this id waits to be stored (see
    the module doc); awaited at the first retry and once a second after.
    """
    headers = {MSG_ID: msg_id or message_id()}
    js = nc.jetstream()
    remade = no_stream is None
    tries = 0

    async def attempt(timeout: float) -> Any:
        nonlocal remade, tries
        tries += 1
        if tell is not None and tries % TELL_EVERY == 0:
            try:
                await tell(headers[MSG_ID])
            except Exception as exc:  # the publish goes on; its subscribers wait, as before
                logger.debug("Could not tell the subscribers of %r: %s", subject, exc)
        logger.debug(
            "JetStream publish to %r: try %d (%s %s).", subject, tries, MSG_ID, headers[MSG_ID]
        )
        try:
            return await js.publish(subject, data, timeout=timeout, headers=dict(headers))
        except nats.js.errors.NoStreamResponseError:
            if not remade:
                remade = True
                assert no_stream is not None
                await no_stream(timeout)
            # Also what a node says while it recovers its streams: asked again.
            raise nats.errors.NoRespondersError from None

    if not retry:
        return await attempt(max(0.05, deadline - time.monotonic()))
    return await patiently(attempt, what, deadline, TRY_TIMEOUT, INTERVAL)
