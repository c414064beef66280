"""Who listens, asked of the listeners themselves: the asking side, for the operator.

:class:`ControlClient` (``pubsub_channels --live``, ``pubsub_ping
--expect-subscribers``) is a bare connection of the backend, not a subscriber: it never
answers itself and is never counted. The listeners' side, and what an answer holds, is
:mod:`pulp_pubsub.backends.listener.responder`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .. import control_auth
from ..backends.listener.responder import CONTROL_CHANNEL, REPLY_PREFIX
from ..backends.selfpipe import wait_readable
from ..control_auth import ControlPolicy, query_body, sign, verify
from ..exceptions import IntrospectionDisabled, PublishError, PubSubError

if TYPE_CHECKING:
    from types import TracebackType

    from ..backends.base import BaseBackend


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
    #: When it went degraded (periodic resyncs), or None: push delivery works.
    degraded_since: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["channels"] = list(self.channels)
        return data


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
            for item in self._transport.read():
                # A transport that never joined a group is never handed a message.
                if isinstance(item, tuple) and item[0] == self._reply_wire and item[1] is not None:
                    take(item[1])
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
            degraded_since=_number(data.get("degraded_since")),
        )
    except (ValueError, TypeError, KeyError):
        return None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def gather(backend: BaseBackend, timeout: float, expect: int | None = None) -> list[Answer]:
    """Ask every live subscriber of ``backend``; see :meth:`ControlClient.query`."""
    with ControlClient(backend) as client:
        return client.query(timeout, expect)
