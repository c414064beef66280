"""One ZooKeeper session of one subscriber, read through a self-pipe.

kazoo calls watches back on a thread of its own; a watch here only notes which channel
changed and pokes the pipe the shared listener waits on. The listener's ``read()`` then
lists that channel's children (setting the next watch in the same request) and fetches
the new ones, in sequence order, each request bounded by ``connect_timeout``.

Per channel the transport keeps the channel node's creation zxid (which incarnation of
the node it has read) and the last sequence it delivered: its replay position. A read
takes the channel node's trim mark and its children as one snapshot (the node's data
version, which every trim bumps, is the same in both answers), so "the history no longer
reaches back" is exact: the mark lies above the position. A channel node that was removed
and made again (an operator, or an empty private channel) starts afresh with a resync.

A lost connection is a lost transport: kazoo's own reconnecting is left to the shared
listener, which opens a new session, hands it the old position and gets the gap replayed.
The liveness probe is an ephemeral sequential node of this session in the subscriber's
private probe channel, which it reads back like any message; each probe deletes the one
before, and the rest goes with the session.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kazoo.exceptions import KazooException, NoAuthError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState

from ...exceptions import ConnectionLost
from ..selfpipe import close_fds, drain, make_pipe, poke
from ..transport import SubscribedBackend, Transport
from .client import Connect, create_container, parse_mark, stop
from .names import Where, sequence

if TYPE_CHECKING:
    from kazoo.interfaces import IAsyncResult
    from kazoo.protocol.states import WatchedEvent

#: Messages fetched per channel per read; the rest on the next turn.
READ_BATCH = 256
#: Snapshots retried when the channel changes between its two answers.
SNAPSHOT_TRIES = 10
#: ``czxid`` of a channel never looked at yet, and of one that did not exist when looked at.
UNKNOWN, ABSENT = -1, 0


@dataclass
class Channel:
    path: str
    czxid: int = UNKNOWN
    last: int = -1
    mark: int = -1
    mark_version: int = -1


class ZookeeperHost(SubscribedBackend, Protocol):
    """What a transport needs of the ZooKeeper backend beyond every backend's contract.

    A protocol, so that this module does not import the backend that imports it.
    """

    where: Where
    connect: Connect
    base: str
    acl: list[Any]

    def path(self, wire: str) -> str: ...


class ZookeeperTransport(Transport):
    backend: ZookeeperHost

    def __init__(self, backend: ZookeeperHost) -> None:
        super().__init__(backend)
        self._timeout = float(backend.config["connect_timeout"])
        self._lock = threading.Lock()
        self._dirty: set[str] = set()
        self._dead: str | None = None
        self._closed = False
        self._channels: dict[str, Channel] = {}
        self._wires: dict[str, str] = {}
        self._resume_from: dict[str, tuple[int, int]] | None = None
        self._inbox: list[tuple[str, str | None]] = []
        self._probe_nodes: dict[str, str] = {}
        self._containers: set[str] = set()
        self._established = False
        self._pipe_r, self._pipe_w = make_pipe()
        self._client = client = backend.connect.client(retry_forever=False)
        client.add_listener(self._on_state)
        # Not kazoo's start(timeout): past the timeout it stops the client, which waits out
        # a silent member's handshake (the whole session timeout); see client.stop.
        try:
            client.start_async().wait(self._timeout)
            failure = None if client.connected else f"no answer within {self._timeout:g} s"
        except Exception as exc:
            failure = str(exc) or type(exc).__name__
        if failure is not None:
            stop(client, 0.0)
            close_fds(self._pipe_r, self._pipe_w)
            raise ConnectionLost(
                f"could not connect to ZooKeeper at {backend.where.connect_string}: {failure}"
            )
        self._established = True

    # -- kazoo's threads -----------------------------------------------------------

    def _on_state(self, state: str) -> None:
        if state in (KazooState.SUSPENDED, KazooState.LOST) and self._established:
            self._die(
                "the ZooKeeper session expired"
                if state == KazooState.LOST
                else "the connection to ZooKeeper was lost"
            )

    def _die(self, why: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = why
            if not self._closed:
                poke(self._pipe_w)

    def _on_watch(self, event: WatchedEvent) -> None:
        with self._lock:
            wire = self._wires.get(event.path)
            if wire is not None and not self._closed:
                self._dirty.add(wire)
                poke(self._pipe_w)

    # -- the listener's side ---------------------------------------------------------

    def fileno(self) -> int:
        return self._pipe_r

    def position(self) -> dict[str, Any]:
        return {
            "base": self.backend.base,
            "channels": {
                wire: (ch.czxid, ch.last)
                for wire, ch in self._channels.items()
                if ch.czxid != UNKNOWN
            },
        }

    def resume(self, position: Any) -> bool:
        if not isinstance(position, dict) or position.get("base") != self.backend.base:
            return False
        self._resume_from = dict(position.get("channels") or {})
        return True

    def listen(self, channels: Collection[str]) -> None:
        # Only the first listen of a resumed transport replays; later ones are new subscribes.
        resume_from, self._resume_from = self._resume_from, None
        with self._guard("listening"):
            for wire in channels:
                if wire in self._channels:
                    continue
                channel = Channel(self.backend.path(wire))
                fresh = True
                if resume_from is not None:
                    seen = resume_from.get(wire)
                    if seen is None:
                        # Listened to before, but no position of it survived: unknown gap.
                        self._inbox.append((wire, None))
                    else:
                        channel.czxid, channel.last = seen
                        fresh = False
                with self._lock:
                    self._channels[wire] = channel
                    self._wires[channel.path] = wire
                self._inbox.extend(self._scan(wire, channel, fresh))

    def unlisten(self, channels: Collection[str]) -> None:
        with self._lock:
            for wire in channels:
                channel = self._channels.pop(wire, None)
                if channel is not None:
                    self._wires.pop(channel.path, None)
                self._dirty.discard(wire)

    def read(self) -> list[tuple[str, str | None]]:
        drain(self._pipe_r)
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            dead = self._dead
        if dead:
            raise ConnectionLost(dead)
        out, self._inbox = self._inbox, []
        with self._guard("reading"):
            for wire in sorted(dirty):
                channel = self._channels.get(wire)
                if channel is not None:
                    out.extend(self._scan(wire, channel))
        return out

    def _scan(self, wire: str, ch: Channel, fresh: bool = False) -> list[tuple[str, str | None]]:
        """What ``wire`` holds after ``ch.last``, in order, and the next watch set."""
        client = self._client
        out: list[tuple[str, str | None]] = []
        for _ in range(SNAPSHOT_TRIES):
            try:
                children, stat = self._wait(
                    client.get_children_async(ch.path, watch=self._on_watch, include_data=True)
                )
            except NoNodeError:
                if self._wait(client.exists_async(ch.path, watch=self._on_watch)) is not None:
                    continue  # made meanwhile: list it
                if ch.czxid > ABSENT and not fresh:
                    out.append((wire, None))  # removed, with whatever it held past our position
                ch.czxid, ch.last, ch.mark, ch.mark_version = ABSENT, -1, -1, -1
                return out
            if stat.czxid != ch.czxid:
                if ch.czxid > ABSENT and not fresh:
                    out.append((wire, None))  # another incarnation of the node
                # Made since we last looked (or first seen): all it holds is new.
                ch.czxid, ch.last, ch.mark, ch.mark_version = stat.czxid, -1, -1, -1
            if stat.version != ch.mark_version:
                data, node = self._wait(client.get_async(ch.path))
                if node.version != stat.version or node.czxid != stat.czxid:
                    continue  # trimmed between the two answers: look again
                ch.mark, ch.mark_version = parse_mark(data), node.version
            numbered = sorted(
                (seq, name) for name in children if (seq := sequence(name)) is not None
            )
            if fresh:
                ch.last = max([ch.mark, *(seq for seq, _ in numbered)])
                return out
            if ch.mark > ch.last:
                out.append((wire, None))  # trimmed past our position: the history is gone
                ch.last = ch.mark
            new = [(seq, name) for seq, name in numbered if seq > ch.last][:READ_BATCH]
            pending = [client.get_async(f"{ch.path}/{name}") for _, name in new]
            complete = True
            for (seq, _), result in zip(new, pending, strict=True):
                try:
                    data, _ = self._wait(result)
                except NoNodeError:
                    complete = False  # trimmed while we read: the next snapshot says so
                    break
                out.append((wire, data.decode("utf-8", "replace")))
                ch.last = seq
            if complete:
                if len(new) == READ_BATCH:
                    self._again(wire)
                return out
        self._again(wire)
        return out

    def _again(self, wire: str) -> None:
        with self._lock:
            self._dirty.add(wire)
            poke(self._pipe_w)

    def _wait(self, result: IAsyncResult) -> Any:
        return result.get(timeout=self._timeout)

    def _guard(self, doing: str) -> _Guard:
        return _Guard(self, doing)

    # -- the probe and the listener's own messages -----------------------------------

    def probe(self, channel: str, payload: str) -> None:
        path = self.backend.path(channel)
        with self._guard("probing"):
            self._ensure_container(path)
            transaction = self._client.transaction()
            transaction.create(
                path + "/p", payload.encode(), self.backend.acl, ephemeral=True, sequence=True
            )
            with self._lock:
                before = self._probe_nodes.pop(path, None)
            if before is not None:
                transaction.delete(before)
            transaction.commit_async().rawlink(lambda result: self._probed(path, result))

    def _probed(self, path: str, result: IAsyncResult) -> None:
        try:
            outcome = result.get()
        except Exception:
            return  # not sent: the probe goes unanswered and the listener reconnects
        if outcome and isinstance(outcome[0], str):
            with self._lock:
                self._probe_nodes[path] = outcome[0]

    def send_from_listener(self, channel: str, payload: str) -> None:
        # An introspection answer: ephemeral, so it goes with this session at the latest.
        path = self.backend.path(channel)
        with self._guard("answering"):
            self._ensure_container(path)
            self._client.create_async(
                path + "/m", payload.encode(), self.backend.acl, ephemeral=True, sequence=True
            )

    def _ensure_container(self, path: str) -> None:
        if path not in self._containers:
            create_container(self._client, path, self.backend.acl, self._timeout)
            self._containers.add(path)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.remove_listener(self._on_state)
        stop(self._client, self._timeout)
        close_fds(self._pipe_r, self._pipe_w)


class _Guard:
    """Turns kazoo's failures into the listener's ConnectionLost, saying what was going on."""

    def __init__(self, transport: ZookeeperTransport, doing: str) -> None:
        self.transport, self.doing = transport, doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, ConnectionLost):
            return
        if isinstance(exc, NoAuthError):
            user = self.transport.backend.where.username
            who = f"user {user!r}" if user else "no credentials"
            raise ConnectionLost(
                f"ZooKeeper refused {self.doing} under {self.transport.backend.base} "
                f"({who}): not allowed by the znodes' ACL"
            ) from exc
        if isinstance(exc, (KazooException, KazooTimeoutError, OSError)):
            cause = str(exc) or type(exc).__name__
            raise ConnectionLost(f"ZooKeeper failed while {self.doing}: {cause}") from exc
