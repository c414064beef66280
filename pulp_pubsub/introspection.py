"""Who listens, asked of the listeners themselves.

PostgreSQL shows a session only its own LISTENs, and no server knows how
late a subscriber's messages are or when it last resynced. So every
subscriber's listener thread also listens on one control channel,
``pubsub_control`` (under ``PUBSUB_CHANNEL_PREFIX`` like any channel), and
answers a query there by publishing a small JSON document to the reply
channel that the query names. Nothing here depends on the server, so it
works the same way on every backend.

The asking side, :class:`ControlClient` (``pubsub_channels --live``,
``pubsub_ping --expect-subscribers``), is a bare connection of the backend,
not a subscriber: it never answers itself and is never counted.

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
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from . import control_auth
from .backends.selfpipe import wait_readable
from .control_auth import OVERHEAD, ControlPolicy, Query, query_body, sign, verify
from .exceptions import ConnectionLost, IntrospectionDisabled, PublishError, PubSubError

if TYPE_CHECKING:
    from types import TracebackType

    from .backends.base import BaseBackend, Transport
    from .backends.listener import Subscriber

logger = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Answer:
    """One live subscriber, as it described itself."""

    id: str
    host: str
    pid: int
    process: str
    backend: str
    channels: tuple[str, ...]
    channels_total: int
    connected_since: float | None
    received: int
    resyncs: int
    last_resync_at: float | None
    reconnects: int
    probe_rtt: float | None
    #: Seconds from sending the query to reading this answer.
    latency: float
    #: The subscriber keeps its channel names to itself (PUBSUB_INTROSPECTION_CHANNELS).
    channels_hidden: bool = False

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data


# -- the answering side (the listener thread) -------------------------------------


def answer_query(subscriber: Subscriber, transport: Transport, wire: str, payload: str) -> None:
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
    subscriber: Subscriber, query_id: str, limit: int = ANSWER_LIMIT, channels: bool = True
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


def _limit(backend: BaseBackend) -> int:
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


# -- the asking side -----------------------------------------------------------------


class ControlClient:
    """A bare connection that asks the fleet, and checks the server answers.

    It opens one transport of the backend and listens only on a reply
    channel of its own. Use it from one thread, as a context manager.
    """

    def __init__(self, backend: BaseBackend, policy: ControlPolicy | None = None) -> None:
        self.backend = backend
        self.policy = policy or control_auth.policy()
        self.reply = REPLY_PREFIX + uuid.uuid4().hex[:16]
        self._reply_wire = backend.wire_name(self.reply)
        self._control_wire = backend.wire_name(CONTROL_CHANNEL)
        self._transport = backend.open_transport()
        try:
            self._transport.listen([self._reply_wire])
        except BaseException:
            self._transport.close()
            raise

    def round_trip(self, timeout: float) -> float | None:
        """Seconds for a message to come back through the server; None on timeout."""
        token = f"ping {uuid.uuid4().hex}"
        started = time.monotonic()
        self._send(self._reply_wire, token)
        back = False

        def take(payload: str) -> None:
            nonlocal back
            back = back or payload == token

        self._read(started + timeout, take, lambda: back)
        return time.monotonic() - started if back else None

    def query(self, timeout: float, expect: int | None = None) -> list[Answer]:
        """The answers of the live subscribers within ``timeout`` seconds.

        With ``expect``, stops as soon as that many have answered. Raises
        :class:`IntrospectionDisabled` when this install has introspection
        off or no key to sign the query with. Only answers signed with the
        fleet's key count.
        """
        key = signing_key(self.policy)
        query_id = uuid.uuid4().hex[:16]
        answers: dict[str, Answer] = {}
        started = time.monotonic()
        body = query_body(query_id, self.reply)
        self._send(self._control_wire, sign(key, "query", self._control_wire, body))

        def take(payload: str) -> None:
            text = verify(key, "answer", self._reply_wire, payload)
            if text is None:
                return
            answer = _parse_answer(text, query_id, time.monotonic() - started)
            if answer is not None:
                answers.setdefault(answer.id, answer)

        def enough() -> bool:
            return bool(expect) and len(answers) >= (expect or 0)

        self._read(started + timeout, take, enough)
        return sorted(answers.values(), key=lambda a: (a.host, a.pid, a.id))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _send(self, wire: str, payload: str) -> None:
        # backend.send(), the path every publish takes, but not publish():
        # control traffic is not counted as messages.
        try:
            self.backend.send(wire, payload)
        except PubSubError:
            raise
        except Exception as exc:
            raise PublishError(f"{self.backend.name} backend could not publish: {exc}") from exc

    def _read(self, deadline: float, take: Callable[[str], None], done: Callable[[], bool]) -> None:
        fd = self._transport.fileno()
        while True:
            # read() never blocks, and the client library may hold messages
            # that no longer make the socket readable: read before waiting.
            for wire, payload in self._transport.read():
                if wire == self._reply_wire and payload is not None:
                    take(payload)
            left = deadline - time.monotonic()
            if done() or left <= 0:
                return
            wait_readable([fd], left)


def signing_key(policy: ControlPolicy) -> bytes:
    """The key to sign queries with; IntrospectionDisabled when this install may not ask."""
    if not policy.answers:
        raise IntrospectionDisabled(
            f"Introspection is switched off on this install ({control_auth.ENABLED_SETTING} "
            "= False): subscribers answer no queries, so none can be listed or counted. "
            f"Set {control_auth.ENABLED_SETTING} = True on the fleet and here to use it."
        )
    if policy.key is None:
        raise IntrospectionDisabled(
            f"Cannot sign a control query: {policy.key_error} Set "
            f"{control_auth.KEY_SETTING} (or SECRET_KEY) to the value the fleet uses."
        )
    return policy.key


def _parse_answer(payload: str, query_id: str, latency: float) -> Answer | None:
    try:
        data = json.loads(payload)
        if not isinstance(data, dict) or data.get("query") != query_id:
            return None
        channels = data.get("channels") or []
        return Answer(
            id=str(data["id"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            process=str(data.get("process", "")),
            backend=str(data.get("backend", "")),
            channels=tuple(str(c) for c in channels),
            channels_total=int(data.get("channels_total", len(channels))),
            connected_since=_number(data.get("connected_since")),
            received=int(data.get("received", 0)),
            resyncs=int(data.get("resyncs", 0)),
            last_resync_at=_number(data.get("last_resync_at")),
            reconnects=int(data.get("reconnects", 0)),
            probe_rtt=_number(data.get("probe_rtt")),
            latency=latency,
            channels_hidden=data.get("channels_hidden") is True,
        )
    except (ValueError, TypeError, KeyError):
        return None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def gather(backend: BaseBackend, timeout: float, expect: int | None = None) -> list[Answer]:
    """Ask every live subscriber of ``backend``; see :meth:`ControlClient.query`."""
    with ControlClient(backend) as client:
        return client.query(timeout, expect)
