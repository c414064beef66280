"""Who listens, asked of the listeners themselves: the answering side.

PostgreSQL shows a session only its own LISTENs, and no server knows how
late a subscriber's messages are or when it last resynced. So every
subscriber's listener thread also listens on one control channel,
``pubsub_control`` (under ``PUBSUB_CHANNEL_PREFIX`` like any channel), and
answers a query there by publishing a small JSON document to the reply
channel that the query names. Nothing here depends on the server, so it
works the same way on every backend. The asking side is the operator's
(:mod:`pulp_pubsub.management.inspect`).

Only signed, fresh, never-seen queries are answered, at a bounded rate, and
answering can be switched off: see :mod:`pulp_pubsub.control_auth`.

Control traffic never reaches a callback and is never counted as messages.
An answer says where a subscriber runs and how it is doing; it never holds
a setting, a URL or a payload, and holds channel names only where
``PUBSUB_INTROSPECTION_CHANNELS`` (by default
``PUBSUB_METRICS_CHANNEL_ATTRIBUTES``) allows. It fits PostgreSQL's payload
limit: when the channel list would not, it is cut short and
``channels_total`` says how many there are.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from ...control_auth import OVERHEAD, Gate, Query, sign
from ...exceptions import ConnectionLost

if TYPE_CHECKING:
    from collections import Counter

    from ..transport import SubscribedBackend, Transport

logger = logging.getLogger(__name__)


class Described(Protocol):
    """What an answer tells of a subscriber (a :class:`~.subscriber.Subscriber`)."""

    backend: SubscribedBackend
    stats: Counter[str]
    control_gate: Gate

    @property
    def channels(self) -> list[str]: ...

    @property
    def connected_since(self) -> float | None: ...

    @property
    def last_resync_at(self) -> float | None: ...

    @property
    def probe_rtt(self) -> float | None: ...

    @property
    def degraded_since(self) -> float | None: ...


#: The channel every listener hears queries on.
CONTROL_CHANNEL = "pubsub_control"
#: Answers go only to channels named like this, so a query cannot make the
#: fleet publish on a channel that has handlers.
REPLY_PREFIX = "pubsub_reply_"
_REPLY = re.compile(r"pubsub_reply_[0-9a-f]{8,32}")
_QUERY_ID = re.compile(r"[0-9a-f]{8,32}")
#: PostgreSQL's payload limit, kept on every backend so answers look alike.
ANSWER_LIMIT = 7999
_LAUNCHERS = {"manage.py", "django-admin", "django-admin.py", "pulpcore-manager"}
#: At most one warning per process in this many seconds about answers that failed.
WARNING_INTERVAL = 60.0


def answer_query(subscriber: Described, transport: Transport, wire: str, payload: str) -> None:
    """Answer a query read from the control channel ``wire``, on ``transport``.

    Runs on the subscriber's listener thread. Unsigned, stale, replayed and
    over-the-rate queries get no answer (and no log line above DEBUG: the
    sender is not to be trusted with our log volume either). A lost
    connection propagates (the listener reconnects as for any read); any
    other failure to answer is logged, since the querier's problem must not
    cost the listener its connection.
    """
    gate = subscriber.control_gate
    query = gate.admit(wire, payload, parse_query)
    if query is None or gate.policy.key is None:
        logger.debug("Not answering a control message (refused so far: %s)", dict(gate.refused))
        return
    query_id, reply, _ = query
    backend = subscriber.backend
    try:
        reply_wire = backend.wire_name(reply)
        text = describe_subscriber(
            subscriber, query_id, _limit(backend) - OVERHEAD, channels=gate.policy.channels
        )
        transport.send_from_listener(reply_wire, sign(gate.policy.key, "answer", reply_wire, text))
    except ConnectionLost:
        raise
    except Exception as exc:
        _warn(f"A {backend.name} subscriber could not answer a control query: {exc}")


def parse_query(body: str) -> Query | None:
    """(query id, reply channel, sent at) of a well-formed query body, else None."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    query_id, reply = data.get("query"), data.get("reply")
    if not (isinstance(query_id, str) and _QUERY_ID.fullmatch(query_id)):
        return None
    if not (isinstance(reply, str) and _REPLY.fullmatch(reply)):
        return None
    sent_at = data.get("ts")
    if not isinstance(sent_at, (int, float)) or isinstance(sent_at, bool):
        return None
    return query_id, reply, float(sent_at)


def describe_subscriber(
    subscriber: Described, query_id: str, limit: int = ANSWER_LIMIT, channels: bool = True
) -> str:
    """The JSON answer of ``subscriber``, at most ``limit`` UTF-8 bytes.

    Without ``channels``, the names are left out (their number is kept).
    """
    names = subscriber.channels
    stats = subscriber.stats
    data: dict[str, Any] = {
        "query": query_id,
        "id": f"{os.getpid()}-{id(subscriber):x}",
        "host": socket.gethostname()[:255],
        "pid": os.getpid(),
        "process": process_name()[:200],
        "backend": subscriber.backend.name,
        "connected_since": subscriber.connected_since,
        "received": stats["received"],
        "resyncs": stats["resyncs"],
        "last_resync_at": subscriber.last_resync_at,
        "reconnects": stats["reconnects"],
        "probe_rtt": subscriber.probe_rtt,
        "degraded_since": subscriber.degraded_since,
        "channels_total": len(names),
        "channels": [],
    }
    if not channels:
        data["channels_hidden"] = True
        return json.dumps(data, separators=(",", ":"))
    # ASCII-only JSON: a character's length is its length in bytes.
    size = len(json.dumps(data, separators=(",", ":")))
    for channel in names:
        extra = len(json.dumps(channel)) + (1 if data["channels"] else 0)
        if size + extra > limit:
            break
        data["channels"].append(channel)
        size += extra
    return json.dumps(data, separators=(",", ":"))


def process_name() -> str:
    """What an operator calls this process: the program, never its arguments.

    Arguments may hold secrets; only a management command's name, which is
    an identifier, is added for ``manage.py``-like launchers.
    """
    argv = sys.argv or [""]
    # "-c" and "-" (a script from the command line or stdin): the interpreter.
    path = argv[0] if argv[0] not in ("", "-c", "-") else sys.executable
    name = os.path.basename(path)
    if name == "__main__.py":  # python -m package
        name = os.path.basename(os.path.dirname(path))
    if name in _LAUNCHERS and len(argv) > 1 and re.fullmatch(r"[a-z][a-z0-9_]*", argv[1]):
        name = f"{name} {argv[1]}"
    child = multiprocessing.current_process().name
    if child != "MainProcess":
        name = f"{name} ({child})"
    return name


def _limit(backend: SubscribedBackend) -> int:
    return min(ANSWER_LIMIT, backend.payload_limit or ANSWER_LIMIT)


_warn_lock = threading.Lock()
_warned_at: float | None = None
_unwarned = 0


def _warn(text: str) -> None:
    global _warned_at, _unwarned
    now = time.monotonic()
    with _warn_lock:
        if _warned_at is not None and now - _warned_at < WARNING_INTERVAL:
            _unwarned += 1
            logger.debug("%s", text)
            return
        suppressed, _warned_at, _unwarned = _unwarned, now, 0
    more = f" ({suppressed} more since the last warning)" if suppressed else ""
    logger.warning("%s%s", text, more)
