"""JetStream API requests that outlast a leader election, and say that they wait.

When a cluster loses a node, the groups that node led elect new leaders: the meta group's
(which makes consumers) and each stream's (which answers for its stream and stores its
messages). Until then a JetStream API request goes unanswered, or is refused as unavailable.
A subscriber that treated that as a lost connection, after one request with its whole
``connect_timeout``, reconnected after a backoff and started over, again and again: up to
64 s from a node's loss to delivering again, measured, where the elections took at most 7 s.

So a subscriber's requests are asked again every half second, earlier tries still waiting,
until an overall deadline, and the wait is logged at INFO: what was asked, what the cluster
answered, how long it took. A request asked again must be safe to repeat (the transport makes
each try's consumer on a delivery subject of its own, see ``NatsTransport._add_consumer``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client

from ...exceptions import ConnectionLost

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: Seconds between tries while none has been answered: a request that waits out an election
#: is asked again this often, so its answer follows the new leader by about this much.
INTERVAL = 0.5
#: Tries waiting at once, at most (each ends at its own deadline, or when one is answered).
MAX_TRIES_WAITING = 8
#: Seconds a subscriber asks for, at most, before it gives up and reconnects: elections after
#: a node's loss take a few seconds; a cluster that lost its quorum stays without a leader.
PATIENCE = 20.0


#: nats-server 2.11 and later answer a try of a publish whose ``Nats-Msg-Id`` an earlier try
#: still being stored carries with this (409 "duplicate message id is in process"): that
#: earlier try's acknowledgement is still to come.
_MSG_ID_IN_PROCESS = 10158


def _unanswered(exc: BaseException) -> bool:
    """An answer a cluster electing a leader gives: none, or "unavailable, ask again"."""
    if isinstance(exc, asyncio.TimeoutError | nats.errors.NoRespondersError):
        return True  # nats-py's TimeoutError is an asyncio.TimeoutError
    if not isinstance(exc, nats.js.errors.APIError):
        return False
    return (exc.code or 0) >= 500 or exc.err_code == _MSG_ID_IN_PROCESS


def _said(exc: BaseException) -> str:
    if isinstance(exc, nats.js.errors.APIError):
        return f"{exc.code} {exc.description or ''}".strip()
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer"
    return f"{type(exc).__name__}: {exc}"


async def patiently(
    ask: Callable[[float], Awaitable[T]],
    what: str,
    deadline: float,
    try_timeout: float,
    interval: float = INTERVAL,
    awaited: str = "the cluster to elect a leader",
) -> T:
    """The first answer to ``await ask(timeout)``, asked every ``interval`` until ``deadline``.

    Earlier tries go on waiting (up to ``try_timeout`` each) while later ones are asked: a
    loaded server's late answer still counts, and a try stuck on a server that has just died
    does not hold the others up. Raises ConnectionLost naming ``what``, the time waited and
    the last refusal when nothing was answered by ``deadline`` (monotonic); an error that is
    not about a missing leader is raised as it is, at once.
    """
    started = time.monotonic()
    waiting: set[asyncio.Task[T]] = set()
    tries = 0
    next_try = started
    said = False
    last = "no answer"
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise ConnectionLost(
                    f"JetStream did not answer {what} within {now - started:.1f} s "
                    f"({tries} tries, last: {last}); no leader elected?"
                )
            # At most one try per interval, also when tries are refused at once (no
            # responders while a stream has no leader) and earlier ones still wait.
            if now >= next_try and len(waiting) < MAX_TRIES_WAITING:
                tries += 1
                next_try = now + interval
                timeout = max(0.05, min(try_timeout, deadline - now))
                waiting.add(asyncio.ensure_future(ask(timeout)))
            wake = min(next_try if len(waiting) < MAX_TRIES_WAITING else deadline, deadline)
            done: set[asyncio.Task[T]] = set()
            if waiting:
                done, waiting = await asyncio.wait(
                    waiting, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
                )
            else:
                await asyncio.sleep(max(0.0, wake - now))
            for task in done:
                exc = task.exception()
                if exc is None:
                    if tries > 1:
                        logger.info(
                            "JetStream answered %s after %.1f s and %d tries (the last "
                            "refusal: %s).",
                            what,
                            time.monotonic() - started,
                            tries,
                            last,
                        )
                    return task.result()
                if not _unanswered(exc):
                    raise exc
                last = _said(exc)
            if not said and (done or time.monotonic() >= next_try):
                said = True
                logger.info(
                    "JetStream did not answer %s within %.1f s (%s): waiting for %s, "
                    "asking again every %.1f s for up to %.0f s.",
                    what,
                    time.monotonic() - started,
                    last,
                    awaited,
                    interval,
                    deadline - started,
                )
    finally:
        for task in waiting:
            task.cancel()


#: What a direct get answers for a sequence past the stream's last, or one it no longer holds.
_NOT_FOUND = "404"


async def direct_get(
    nc: Client, stream: str, request: dict[str, Any], what: str, deadline: float, try_timeout: float
) -> tuple[int, bytes, dict[str, str]] | None:
    """The (sequence, data, headers) a direct get of ``stream`` answers to ``request``, or
    None (404). The headers are the stored message's own (its ``Nats-Msg-Id`` among them)
    and the server's (``Nats-Sequence``, ``Nats-Subject``, ...).

    A stream with ``allow_direct`` answers these from any of its replicas that is caught up,
    followers included, so they need neither the stream's nor the meta group's leader: they
    are answered during both elections. Asked again like any request here (:func:`patiently`).
    """
    subject = f"$JS.API.DIRECT.GET.{stream}"
    payload = json.dumps(request).encode()

    async def ask(timeout: float) -> tuple[int, bytes, dict[str, str]] | None:
        reply = await nc.request(subject, payload, timeout=timeout)
        headers = reply.headers or {}
        status = headers.get("Status")
        if status == _NOT_FOUND:
            return None
        if status:
            raise nats.js.errors.APIError(
                code=int(status) if status.isdigit() else 500,
                description=headers.get("Description") or "",
            )
        return int(headers["Nats-Sequence"]), reply.data, headers

    return await patiently(
        ask, what, deadline, try_timeout, awaited="a caught-up replica of the stream"
    )
