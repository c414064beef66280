"""One NATS subscriber connection, hosted on the process's NATS loop, read through a pipe.

nats-py calls back on the loop thread; the transport queues what arrives and pokes a
self-pipe, the descriptor the shared listener waits on.

With JetStream, on the stream the layer makes, a channel needs no consumer: the stream
republishes each message it stores to ``<prefix>._live.<channel>`` with its stream sequence
and the sequence of the channel's previous message, and answers direct gets from any caught
up replica. A transport subscribes to the channel's live subject (plain NATS), then reads
what it missed from the stream with direct gets, from just after the last sequence seen,
holding the live messages meanwhile; a live message whose previous sequence is not the last
one delivered shows a gap, filled the same way. Neither needs a leader: after a node's loss a
subscriber is back as soon as it has reconnected, and hears new messages once the stream
stores again (the stream's own election, when the lost node led it). Until then a publisher
waiting for the stream sends a notice to the live subject (see .storing): one that carries
a message and its ``Nats-Msg-Id`` is delivered at once and the id remembered for a while,
so that the stored copy, live or replayed (both keep the header), moves the position on
without being delivered a second time; one without (a targeted publish, an older
release's) resyncs the channel. On a stream without
republish and direct gets (an operator's own, or one made by an older release) each channel
is an ephemeral push consumer that starts just after the last stream sequence seen, made
through the meta group's leader.

Targeted delivery (JetStream only) uses the (channel, group)'s durable pull consumer: while
the listener wants messages of a group, the transport keeps one pull request for one
message waiting at the server, answered on an inbox of its own. A message that arrives
when the listener no longer wants it (it took another, was paused, or is leaving) is given
back at once with a NAK; ack() is an ACK and release() a NAK. A member that dies holding a
message never acks it: the server hands it to another member after ``ack_wait``, the
``claim_timeout``.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Collection
from typing import Any, Protocol

import nats.errors
import nats.js.api
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from ...exceptions import ConnectionLost, PubSubError
from ...metrics import count
from ..base import BaseBackend, Handed, Transport
from ..selfpipe import close_fds, drain, make_pipe, poke
from .jsapi import INTERVAL, PATIENCE, direct_get, patiently
from .loop import loop_runner
from .names import MSG_ID, UNSTORED_HEADER

logger = logging.getLogger(__name__)

Pair = tuple[str, str]
#: Seconds between a broadcast consumer's idle heartbeats (at most; ``probe_interval`` when
#: shorter). A consumer lost with its server while this connection lives (a push consumer
#: lives on one server) says so only by falling silent: the transport reconnects after
#: ``SILENT_BEATS`` of them are missed, within seconds, not at the listener's next probe.
CONSUMER_HEARTBEAT = 1.0
SILENT_BEATS = 3
#: Seconds a pull request waits at the server at most (``2 * probe_interval`` when shorter);
#: an idle member renews it when it expires. The server ends a request whose consumer lost
#: its leader (409), but one it forgets without a word is found by its expiry: the request
#: then neither ends nor is answered. It carries no idle heartbeat: nats-server goes
#: through every request waiting at the consumer for each heartbeat or expiry that falls
#: due, work that grows with the square of the fleet.
PULL_EXPIRES = 30.0
#: Pull-request answers that end it without a message and say nothing is wrong:
#: 404 no messages, 408 expired; a 409 for a limit (max waiting, a leader change) is
#: followed by a new request after a pause, and one saying the consumer is gone is a loss.
_PULL_OVER = {"404", "408"}
_CONSUMER_GONE = ("consumer deleted", "push based")
PULL_RETRY = 0.5
#: Seconds between two resyncs of a channel for publishes the stream has not stored yet.
UNSTORED_GAP = 1.0
#: Seconds of no such resync (or early delivery) after which the next is said at INFO again.
UNSTORED_QUIET = 60.0
#: Seconds a transport remembers the id of a message it delivered early (a publisher told
#: it while waiting for the stream to store it), at least; twice ``publish_timeout`` when
#: that is longer. The stored copy comes, if ever, from a try sent within the publisher's
#: ``publish_timeout`` of the first notice; twice that leaves room for a try answered late
#: and for a replay after a reconnect. Forgotten too soon, the stored copy is delivered a
#: second time (a spare wake-up), never lost.
TOLD_KEEP = 60.0
#: At most this many such ids per transport, the oldest forgotten first: each waiting
#: publish is one id, and thousands are more than a fleet's publishers wait for at once.
TOLD_MAX = 4096


class NatsHost(Protocol):
    """What a transport needs of the NATS backend beyond the contract's :class:`BaseBackend`.

    A protocol, so that this module does not import the backend that imports it.
    """

    jetstream: bool
    stream_name: str
    work_stream_name: str
    live: bool

    @property
    def stream_subjects(self) -> str: ...

    @property
    def stream_checked(self) -> bool: ...

    def live_subject(self, wire: str) -> str: ...

    def where(self) -> str: ...

    def explain(self, exc: BaseException) -> str: ...

    async def connect(self, role: str = ..., **kwargs: Any) -> Client: ...

    async def ensure_stream(self, nc: Client, timeout: float | None = None) -> Any: ...

    async def ensure_work_stream(self, nc: Client) -> None: ...

    async def ensure_work_consumer(self, nc: Client, wire: str, group: str) -> tuple[str, bool]: ...

    def work_subject(self, wire: str, group: str) -> str: ...

    async def publish_on(
        self, nc: Client, wire: str, data: bytes, deadline: float | None = None
    ) -> None: ...


class NatsTransport(Transport):
    """One NATS connection of one subscriber; messages reach the listener through a pipe.

    ``backend`` and ``host`` are the NATS backend twice over: as every transport's
    backend, and as what only a NATS transport asks of it.
    """

    # read() takes the whole inbox; what the loop thread adds after it pokes the pipe.
    drained = True

    def __init__(self, backend: BaseBackend, host: NatsHost) -> None:
        super().__init__(backend)
        self.host = host
        self._lock = threading.Lock()
        self._inbox: deque[tuple[str, str | None] | Handed] = deque()
        self._dead: str | None = None
        self._closed = False
        self._pipe_r, self._pipe_w = make_pipe()
        self._subs: dict[str, Any] = {}
        # JetStream: the last stream sequence seen per wire channel, the
        # position an earlier transport reached, and the consumers' liveness.
        self._seen: dict[str, int] = {}
        self._resume_from: dict[str, int] = {}
        self._heard: dict[str, float] = {}
        # Live subjects (republished): the messages held per wire while what it missed is
        # read from the stream, as (sequence, previous sequence, payload); the wire of each
        # live subject; the tasks filling a gap.
        # (and the message's Nats-Msg-Id, "" when it has none);
        self._held: dict[str, list[tuple[int, int, str, str]]] = {}
        self._live_wires: dict[str, str] = {}
        self._fills: set[asyncio.Task[None]] = set()
        # When each channel last resynced because a publisher's message was not stored yet,
        # and last delivered such a message early (told with it).
        self._told: dict[str, float] = {}
        self._told_early: dict[str, float] = {}
        # (wire, Nats-Msg-Id) of the messages delivered early -> (when, whether the stored
        # copy came since), oldest first: see TOLD_KEEP.
        self._early: dict[tuple[str, str], tuple[float, bool]] = {}
        # Told while the channel catches up (replay, gap): id -> payload, delivered after
        # what the stream holds before it, unless its stored copy comes first.
        self._early_waiting: dict[str, dict[str, str]] = {}
        self._early_keep = max(TOLD_KEEP, 2 * float(backend.config["publish_timeout"]))
        # Targeted delivery: the inbox our pull requests are answered on, each request's
        # (wire, group) and end, the request waiting per pair, what the listener wants
        # now, the pairs whose handed message it has not read yet, and the pairs handed
        # one since its last want() (none more until it asks again, having read it).
        self._pull_inbox: str | None = None
        self._consumers: dict[Pair, str] = {}
        self._work_pairs: dict[str, Pair] = {}
        # Request id -> (wire, group), when it was sent.
        self._pulls: dict[str, tuple[Pair, float]] = {}
        self._pulling: dict[Pair, str] = {}
        # Pairs whose last request was given up unanswered (see want()).
        self._silent: set[Pair] = set()
        self._wanted: frozenset[Pair] = frozenset()
        self._unread: set[Pair] = set()
        self._handed: set[Pair] = set()
        self._pull_ids = itertools.count(1)
        self._resumed = False
        # Until the first listen() of a resumed transport is done (see _add_consumer).
        self._resuming = False
        self._dead_read = False
        self._expires = min(2 * float(backend.config["probe_interval"]), PULL_EXPIRES)
        self._beat = min(float(backend.config["probe_interval"]), CONSUMER_HEARTBEAT)
        self._watcher: asyncio.Task[None] | None = None
        self._runner = loop_runner()
        self._timeout = backend.config["connect_timeout"]
        self._established = False
        try:
            self._nc: Client = self._runner.run(
                host.connect(
                    role="subscriber",
                    allow_reconnect=False,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    closed_cb=self._on_disconnected,
                ),
                self._timeout,
            )
        except BaseException as exc:
            close_fds(self._pipe_r, self._pipe_w)
            raise ConnectionLost(
                f"could not connect to {host.where()}: {host.explain(exc)}"
            ) from exc
        self._established = True

    # -- callbacks on the loop thread --------------------------------------------

    def _push(
        self, item: tuple[str, str | None] | Handed | None = None, dead: str | None = None
    ) -> None:
        with self._lock:
            if self._closed:
                return
            if item is not None:
                self._inbox.append(item)
            if dead and self._dead is None:
                self._dead = dead
            poke(self._pipe_w)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # nats-py dropped a message it could not queue: that channel resyncs.
            self._push((self._live_wires.get(exc.subject, exc.subject), None))
        elif "permissions violation" in str(exc).lower() and any(
            live in str(exc) for live in self._live_wires
        ):
            # Without it the live messages never come: said, and each reconnect replays.
            self._push(
                dead=f"{exc}: the NATS user needs subscribe permission on the subjects the "
                "JetStream stream republishes to (<prefix>._live.>)"
            )
        elif self._established and isinstance(
            exc, nats.errors.StaleConnectionError | ConnectionError | OSError
        ):
            # Before connect() returns, errors are those of servers it tried and passed over.
            self._push(dead=self.host.explain(exc))

    async def _on_disconnected(self) -> None:
        self._push(dead="the NATS server closed the connection")

    async def _on_message(self, msg: Msg) -> None:
        self._push((msg.subject, msg.data.decode("utf-8", "replace")))

    def _consumer_callback(self, wire: str) -> Any:
        async def on_message(msg: Msg) -> None:
            self._heard[wire] = time.monotonic()
            if msg.headers and msg.headers.get("Status"):
                # An idle heartbeat, or a flow-control request (it has a reply subject).
                if msg.reply:
                    await self._nc.publish(msg.reply)
                return
            if not msg.reply:
                return
            # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
            tokens = msg.reply.split(".")
            try:
                sequence = int(tokens[-4])
            except (IndexError, ValueError):
                return
            with self._lock:
                if sequence <= self._seen.get(wire, 0):
                    return  # redelivered after a consumer restart: already had it
                self._seen[wire] = sequence
            self._push((msg.subject, msg.data.decode("utf-8", "replace")))

        return on_message

    # -- the listener's side -----------------------------------------------------

    def fileno(self) -> int:
        return self._pipe_r

    def listen(self, channels: Collection[str]) -> None:
        # With JetStream, the requests may wait out leader elections (see .jsapi).
        patience = max(PATIENCE, self._timeout) if self.host.jetstream else 0.0
        self._run(self._listen(list(channels), patience), patience + self._timeout + 1)

    async def _listen(self, channels: list[str], patience: float) -> None:
        # Broadcast: a plain subscription (or consumer) per subscriber. Targeted delivery
        # would subscribe with ``queue=<group>`` here (JetStream: one durable consumer per
        # group with ``deliver_group``), so the server hands each message to one member.
        nc = self._nc
        new = [wire for wire in channels if wire not in self._subs]
        resuming, self._resuming = self._resuming, False
        if self.host.jetstream and new:
            deadline = time.monotonic() + patience
            info = None
            if not (self.host.stream_checked and self.host.live):
                # The stream's info needs its leader: asked only until it is known to
                # republish (then a reconnected transport needs no leader at all).
                info = await patiently(
                    lambda timeout: self.host.ensure_stream(nc, timeout),
                    f"the info of the stream {self.host.stream_name!r}",
                    deadline,
                    self._timeout,
                )
            if self.host.live:
                await self._add_live(new, deadline, resuming)
                return
            # All at once: a try that waits out an election, or a consumer placed on a server
            # that has just died, then delays the others by nothing.
            made = await asyncio.gather(
                *(self._add_consumer(w, info, deadline, resuming) for w in new)
            )
            self._subs.update(zip(new, made, strict=True))
            self._watch()
        else:
            for wire in new:
                self._subs[wire] = await nc.subscribe(wire, cb=self._on_message)
        await self._confirm()

    async def _confirm(self) -> None:
        """Return once the server has processed every command sent so far on this connection.

        A message to ourselves on a fresh inbox comes back only after the server has read
        what preceded it (our SUBs): proof that a publish from now on reaches us. A PING
        (``flush()``) is not: with nats-py 2.16 and nats-server 2.9 about 1 flush in 100
        returned before the SUB before it took effect (measured: the server counted the
        next publish in, and not out, to a connection that held the subscription).
        """
        nc = self._nc
        arrived = asyncio.get_running_loop().create_future()

        async def on_confirm(msg: Msg) -> None:
            if not arrived.done():
                arrived.set_result(True)

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_confirm, max_msgs=1)
        try:
            await nc.publish(inbox, b"")
            await asyncio.wait_for(arrived, self._timeout)
        finally:
            if not arrived.done():
                await sub.unsubscribe()

    # -- JetStream without consumers: live subjects and direct gets ----------------------

    async def _add_live(self, wires: list[str], deadline: float, resuming: bool) -> None:
        started = time.monotonic()
        starts = {wire: self._resume_from.pop(wire, None) for wire in wires}
        for wire in wires:
            self._held[wire] = []  # until what it missed is delivered
            live = self.host.live_subject(wire)
            self._live_wires[live] = wire
            self._subs[wire] = await self._nc.subscribe(live, cb=self._live_callback(wire))
        # From here on, whatever the stream stores on these channels also comes live.
        await self._confirm()
        replayed = await asyncio.gather(
            *(self._catch_up(wire, starts[wire], deadline, resuming) for wire in wires)
        )
        if resuming:
            logger.info(
                "Replayed %d messages on %d channels from the stream's replicas (direct gets, "
                "no leader needed) in %.2f s; new messages follow as the stream stores them.",
                sum(replayed),
                len(wires),
                time.monotonic() - started,
            )

    async def _get(
        self, wire: str, deadline: float, what: str, **request: Any
    ) -> tuple[int, bytes, dict[str, str]] | None:
        return await direct_get(
            self._nc,
            self.host.stream_name,
            request,
            f"{what} of {wire!r}",
            deadline,
            min(self._timeout, 2.0),
        )

    async def _catch_up(self, wire: str, start: int | None, deadline: float, resuming: bool) -> int:
        """Deliver what ``wire`` missed since ``start`` (a stream sequence), then its live ones."""
        if start is None and resuming:
            # Listened to before, but no position survived (see _add_consumer).
            self._push((wire, None))
        elif start is not None:
            # The history is trimmed at the front only: it reaches back if the first message
            # the stream still holds comes at most just after the last one seen.
            first = await self._get(
                wire, deadline, "the first message", seq=1, next_by_subj=self.host.stream_subjects
            )
            if first is None or first[0] > start + 1:
                logger.info(
                    "The JetStream stream no longer holds what %r may have missed (its first "
                    "message: %s; the last seen: %d): resyncing the channel.",
                    wire,
                    first[0] if first else "none",
                    start,
                )
                self._push((wire, None))
                start = None
        if start is None:
            # From the stream's last message on (any channel's: a quiet channel's position
            # then stays within the history as long as the stream's does).
            last = await self._get(
                wire, deadline, "the last sequence", last_by_subj=self.host.stream_subjects
            )
            start = last[0] if last else 0
        with self._lock:
            self._seen[wire] = max(self._seen.get(wire, 0), start)
        return await self._drain(wire, deadline)

    def _deliver(self, wire: str, sequence: int, payload: str, msg_id: str = "") -> bool:
        """Deliver the stored message at ``sequence`` unless seen; with ``msg_id``, unless
        it was delivered early (its position still moves on)."""
        with self._lock:
            if sequence <= self._seen.get(wire, 0):
                return False
            self._seen[wire] = sequence
            early = self._early.get((wire, msg_id)) if msg_id else None
            if early is not None:
                # Kept, marked: a notice of it still on its way is not delivered either.
                self._early[(wire, msg_id)] = (early[0], True)
                return True
            if msg_id and self._early_waiting.get(wire, {}).pop(msg_id, None) is not None:
                self._early[(wire, msg_id)] = (time.monotonic(), True)
        self._push((wire, payload))
        return True

    def _deliver_waiting(self, wire: str) -> None:
        """The channel has caught up: what was told meanwhile follows what it replayed."""
        with self._lock:
            waiting = self._early_waiting.pop(wire, None) or {}
            now = time.monotonic()
            for msg_id in waiting:
                self._early[(wire, msg_id)] = (now, False)
        for payload in waiting.values():
            self._push((wire, payload))

    async def _drain(self, wire: str, deadline: float) -> int:
        """Deliver ``wire``'s stored messages after the last seen, then those held, in order.

        Returns how many came from the stream. A live message arriving meanwhile is held
        (see _live_callback); once the stream has nothing more, the held ones follow, each
        only when its previous sequence was delivered. A replica behind the leader may not
        have that one yet: it is asked again until ``deadline``, then the channel resyncs.
        """
        replayed = 0
        looked = False
        while not self._closed:
            held = self._held.get(wire)
            if held is None:
                return replayed  # unlistened meanwhile
            seen = self._seen.get(wire, 0)
            while held and held[0][0] <= seen:
                held.pop(0)
            if held and held[0][1] <= seen:
                sequence, _, payload, msg_id = held.pop(0)
                self._deliver(wire, sequence, payload, msg_id)
                continue
            if looked and not held:
                del self._held[wire]
                self._deliver_waiting(wire)
                return replayed
            got = await self._get(wire, deadline, "the replay", seq=seen + 1, next_by_subj=wire)
            if got is not None and not (held and got[0] >= held[0][0]):
                self._deliver(
                    wire, got[0], got[1].decode("utf-8", "replace"), got[2].get(MSG_ID, "")
                )
                replayed += 1
                looked = False
                continue
            looked = True
            if held and got is not None and got[0] == held[0][0]:
                # The stream holds nothing of this channel between the last one delivered
                # and the held one: it follows, whatever its previous sequence said.
                sequence, _, payload, msg_id = held.pop(0)
                self._deliver(wire, sequence, payload, msg_id)
                continue
            if held and (got is not None or time.monotonic() >= deadline):
                # What came between is gone from the stream (trimmed), or the replicas
                # never had it in time: the channel resyncs, and goes on from the held one.
                logger.info(
                    "The JetStream stream has no message of %r between sequences %d and %d "
                    "(the next it holds: %s; the previous one the live message names: %d): "
                    "resyncing the channel.",
                    wire,
                    seen,
                    held[0][0],
                    got[0] if got else "none",
                    held[0][1],
                )
                self._push((wire, None))
                with self._lock:
                    self._seen[wire] = held[0][1]
            elif held:
                await asyncio.sleep(INTERVAL)  # the replica asked is behind: ask again
        return replayed

    def _live_callback(self, wire: str) -> Any:
        async def on_message(msg: Msg) -> None:
            headers = msg.headers or {}
            msg_id = headers.get(MSG_ID) or ""
            if UNSTORED_HEADER in headers:
                if msg_id:
                    self._deliver_early(wire, msg_id, msg.data.decode("utf-8", "replace"))
                else:
                    self._unstored(wire)
                return
            try:
                sequence = int(headers["Nats-Sequence"])
                previous = int(headers.get("Nats-Last-Sequence") or 0)
            except (KeyError, ValueError):
                return
            payload = msg.data.decode("utf-8", "replace")
            held = self._held.get(wire)
            if held is not None:
                bisect.insort(held, (sequence, previous, payload, msg_id))
                return
            if sequence <= self._seen.get(wire, 0):
                return
            if previous > self._seen.get(wire, 0):
                # One before it never came (dropped on the way): the stream's copy first.
                logger.info(
                    "A live message of %r at stream sequence %d follows %d, not %d: reading "
                    "the gap from the stream.",
                    wire,
                    sequence,
                    previous,
                    self._seen.get(wire, 0),
                )
                self._held[wire] = [(sequence, previous, payload, msg_id)]
                task = asyncio.ensure_future(self._fill(wire))
                self._fills.add(task)
                task.add_done_callback(self._fills.discard)
                return
            self._deliver(wire, sequence, payload, msg_id)

        return on_message

    def _deliver_early(self, wire: str, msg_id: str, payload: str) -> None:
        """A publisher says the stream cannot store its message ``msg_id`` of ``wire`` yet
        (it has no leader), and sends it: delivered now, once whatever the number of
        notices, and its stored copy, when it comes, not delivered again (see _deliver).

        A notice that comes after its stored copy (the publisher told the channel as an
        earlier try was being stored; the two travel different routes) is delivered: a
        duplicate, which a wake-up allows; remembering every stored id to rule it out
        would cost memory on every message for a race seen on none here.
        """
        now = time.monotonic()
        key = (wire, msg_id)
        with self._lock:
            while self._early:
                oldest = next(iter(self._early))
                if len(self._early) < TOLD_MAX and now - self._early[oldest][0] < self._early_keep:
                    break
                del self._early[oldest]
            waiting = self._early_waiting.get(wire)
            if key in self._early or (waiting is not None and msg_id in waiting):
                return
            if wire in self._held:
                # Catching up (see _drain): after what the stream holds before it. Not
                # remembered as delivered until it is (a position taken meanwhile must
                # not skip its stored copy).
                self._early_waiting.setdefault(wire, {})[msg_id] = payload
                catching_up = True
            else:
                self._early[key] = (now, False)
                catching_up = False
        count(self.backend.stats, "unstored_deliveries", self.backend.name)
        last = self._told_early.get(wire)
        self._told_early[wire] = now
        if last is None or now - last > UNSTORED_QUIET:
            logger.info(
                "A publisher waits for the JetStream stream to store a message of %r (no "
                "leader), and sent it here: delivered now; its stored copy will not be "
                "delivered again.",
                wire,
            )
        if not catching_up:
            self._push((wire, payload))

    def _unstored(self, wire: str) -> None:
        """A publisher says the stream cannot store a message of ``wire`` yet (it has no
        leader) without sending it (a targeted publish, or an older release's): the channel
        resyncs now, at most once per :data:`UNSTORED_GAP`; the message follows once stored
        (a targeted one, to its group's member)."""
        now = time.monotonic()
        last = self._told.get(wire)
        if last is not None and now - last < UNSTORED_GAP:
            return
        self._told[wire] = now
        count(self.backend.stats, "unstored_resyncs", self.backend.name)
        if last is None or now - last > UNSTORED_QUIET:
            logger.info(
                "A publisher waits for the JetStream stream to store a message of %r (no "
                "leader): resyncing the channel now, once a second at most while it waits; "
                "the message follows once stored.",
                wire,
            )
        self._push((wire, None))

    async def _fill(self, wire: str) -> None:
        try:
            await self._drain(wire, time.monotonic() + PATIENCE)
        except Exception as exc:
            self._push(dead=f"the gap of {wire!r} not read: {self.host.explain(exc)}")

    async def _add_consumer(self, wire: str, info: Any, deadline: float, resuming: bool) -> Any:
        backend, host = self.backend, self.host
        js = self._nc.jsm(timeout=self._timeout)
        last = info.state.last_seq
        start = self._resume_from.pop(wire, None)
        if start is None and resuming:
            # Listened to before (the listener replays rather than resyncs every channel),
            # but no position of it survived: a subscribe() that gave up waiting for its
            # consumer. What it missed is unknown, so it is resynced.
            self._push((wire, None))
        if start is not None and (start > last or (start + 1 < info.state.first_seq)):
            if start != last:
                # The stream no longer holds what this channel may have missed (or was
                # made anew, its sequence starting again below ours).
                self._push((wire, None))
            start = None
        if start is None:
            start = last
        with self._lock:
            self._seen[wire] = max(self._seen.get(wire, 0), start)

        async def attempt(timeout: float) -> tuple[Any, str]:
            # Each try on a delivery subject of its own: a consumer that an unanswered try
            # made after all (placed on a server that has just died, or answered late)
            # delivers to no one, and the server drops it after its inactive_threshold.
            deliver = self._nc.new_inbox()
            sub = await self._nc.subscribe(deliver, cb=self._consumer_callback(wire))
            config = nats.js.api.ConsumerConfig(
                deliver_subject=deliver,
                filter_subject=wire,
                deliver_policy=nats.js.api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start + 1,
                ack_policy=nats.js.api.AckPolicy.NONE,
                idle_heartbeat=self._beat,
                flow_control=True,
                inactive_threshold=max(5.0, 3 * backend.config["probe_interval"]),
                mem_storage=True,
            )
            try:
                consumer = await js.add_consumer(host.stream_name, config, timeout=timeout)
            except BaseException:
                await sub.unsubscribe()
                raise
            return sub, consumer.name

        made = await patiently(
            attempt,
            f"the creation of a consumer for {wire!r} from stream sequence {start + 1}",
            deadline,
            self._timeout,
        )
        self._heard[wire] = time.monotonic()
        return made

    def _watch(self) -> None:
        """Start the loop's watch over this connection's consumers' heartbeats (once)."""
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_heartbeats())

    async def _watch_heartbeats(self) -> None:
        limit = SILENT_BEATS * self._beat
        while not self._closed and self._dead is None:
            await asyncio.sleep(self._beat / 2)
            now = time.monotonic()
            for wire, heard in list(self._heard.items()):
                if now - heard > limit:
                    logger.info(
                        "The JetStream consumer for %r sent nothing for %.1f s (heartbeats "
                        "every %g s): lost with its server; reconnecting.",
                        wire,
                        now - heard,
                        self._beat,
                    )
                    self._push(dead=f"the JetStream consumer for {wire!r} fell silent")
                    return

    def unlisten(self, channels: Collection[str]) -> None:
        self._run(self._unlisten(list(channels)))

    async def _unlisten(self, channels: list[str]) -> None:
        for wire in channels:
            sub = self._subs.pop(wire, None)
            self._heard.pop(wire, None)
            self._held.pop(wire, None)
            self._early_waiting.pop(wire, None)
            self._live_wires.pop(self.host.live_subject(wire), None)
            if isinstance(sub, tuple):
                await sub[0].unsubscribe()
                try:
                    await self._nc.jsm(timeout=self._timeout).delete_consumer(
                        self.host.stream_name, sub[1]
                    )
                except nats.js.errors.NotFoundError:
                    pass
            elif sub is not None:
                await sub.unsubscribe()

    def read(self) -> list[tuple[str, str | None] | Handed]:
        drain(self._pipe_r)
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            dead = self._dead
            for item in items:
                if isinstance(item, Handed):
                    self._unread.discard((item.wire, item.group))
        if dead:
            if items or not self._dead_read:
                # Hand these out first, and once even with nothing: the listener takes our
                # position() after a read, so a channel whose consumer was made since its
                # last read is replayed from there, not started afresh. Raise next time.
                self._dead_read = True
                poke(self._pipe_w)
                return items
            raise ConnectionLost(dead)
        return items

    # -- targeted delivery ----------------------------------------------------------

    def join(self, members: Collection[Pair]) -> None:
        self._run(self._join(list(members)))

    async def _join(self, members: list[Pair]) -> None:
        host = self.host
        if self._pull_inbox is None:
            await host.ensure_work_stream(self._nc)
            inbox = self._nc.new_inbox()
            await self._nc.subscribe(inbox + ".*", cb=self._on_pulled)
            self._pull_inbox = inbox
        for wire, group in members:
            name, made = await host.ensure_work_consumer(self._nc, wire, group)
            if made and self._resumed:
                # Reconnected, and the group's consumer was gone (deleted, or lost with
                # its stream): targeted messages published meanwhile reached nobody.
                self._push((wire, None))
            with self._lock:
                self._consumers[(wire, group)] = name
                self._work_pairs[host.work_subject(wire, group)] = (wire, group)

    def want(self, members: frozenset[Pair], consumer: str) -> None:
        now = time.monotonic()
        # A request neither answered nor ended well after its expiry: the server forgot
        # it, its consumer is gone, or the answer is late to a busy process. It is asked
        # once more (a reconnect adds to the load); a second silence costs the connection.
        limit = 1.5 * self._expires + self._timeout
        with self._lock:
            self._wanted = members
            self._handed &= self._unread
            for request, (pair, sent) in list(self._pulls.items()):
                if now - sent <= limit:
                    continue
                if pair in self._silent:
                    raise ConnectionLost(
                        f"the JetStream consumer of {pair!r} answered neither of two pull "
                        f"requests within {limit:g} s"
                    )
                self._end_pull(request)
                self._silent.add(pair)
            requests = self._new_pulls(now)
        if requests:
            self._runner.submit(self._pull(requests))

    def _new_pulls(self, now: float) -> list[tuple[str, str]]:
        """Pull requests to send for wanted pairs that have none waiting (lock held)."""
        requests = []
        for pair in self._wanted:
            name = self._consumers.get(pair)
            if name is None or pair in self._pulling or pair in self._handed or self._closed:
                continue
            request = str(next(self._pull_ids))
            self._pulls[request] = (pair, now)
            self._pulling[pair] = request
            requests.append((request, name))
        return requests

    def _end_pull(self, request: str) -> Pair | None:
        """Forget a pull request that was answered or ended (lock held)."""
        entry = self._pulls.pop(request, None)
        if entry is None:
            return None
        self._silent.discard(entry[0])
        if self._pulling.get(entry[0]) == request:
            del self._pulling[entry[0]]
        return entry[0]

    async def _pull(self, requests: list[tuple[str, str]]) -> None:
        body = json.dumps(
            {
                "batch": 1,
                "expires": int(self._expires * 1e9),
            }
        ).encode()
        stream = self.host.work_stream_name
        try:
            for request, name in requests:
                await self._nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
                    body,
                    reply=f"{self._pull_inbox}.{request}",
                )
        except Exception as exc:
            self._push(dead=f"pull request not sent: {self.host.explain(exc)}")

    async def _on_pulled(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            # Sent to the request's own reply subject.
            request = msg.subject.rpartition(".")[2]
            description = (msg.headers or {}).get("Description", "")
            with self._lock:
                pair = self._end_pull(request)
            if status in _PULL_OVER:
                await self._renew_pulls()
                return
            if status == "409" and not any(s in description.lower() for s in _CONSUMER_GONE):
                loop = asyncio.get_running_loop()
                loop.call_later(PULL_RETRY, lambda: loop.create_task(self._renew_pulls()))
                return
            self._push(
                dead=f"JetStream ended the pull for {pair!r}: {status} {description}".strip()
            )
            return
        if not msg.reply:
            return
        # A message keeps its own subject; each consumer has exactly one.
        with self._lock:
            pair = self._work_pairs.get(msg.subject)
            waiting = self._pulling.get(pair) if pair is not None else None
            if waiting is not None:
                self._end_pull(waiting)
            take = (
                pair is not None
                and pair in self._wanted
                and pair not in self._handed
                and not self._closed
            )
            if take and pair is not None:
                self._unread.add(pair)
                self._handed.add(pair)
                handed = Handed(pair[0], pair[1], msg.data.decode("utf-8", "replace"), msg.reply)
                self._inbox.append(handed)
                poke(self._pipe_w)
        if not take:
            # No longer wanted (the member took another, was paused or is leaving):
            # straight back, for another member. Not sent (the connection is going):
            # the server hands it out again after ack_wait.
            try:
                await self._nc.publish(msg.reply, b"-NAK")
            except Exception:
                pass

    async def _renew_pulls(self) -> None:
        """A pull request ended without a message: a new one for what is still wanted."""
        with self._lock:
            requests = self._new_pulls(time.monotonic())
        if requests:
            await self._pull(requests)

    def ack(self, handed: Collection[Handed]) -> None:
        self._answer(handed, b"+ACK")

    def release(self, handed: Collection[Handed]) -> None:
        self._answer(handed, b"-NAK")

    def _answer(self, handed: Collection[Handed], verdict: bytes) -> None:
        if handed:
            # An ack subject works from any connection: what an earlier one was handed
            # is acked (or given back) on this one.
            self._run(self._publish_all([item.token for item in handed], verdict))

    async def _publish_all(self, subjects: list[str], data: bytes) -> None:
        for subject in subjects:
            await self._nc.publish(subject, data)
        await self._nc.flush(self._timeout)

    def position(self) -> Any:
        if not self.host.jetstream:
            return None
        with self._lock:
            # The ids delivered early go along: a new connection that replays a stored copy
            # does not deliver it again.
            told = dict(self._early) if self._early else {}
            return {"stream": self.host.stream_name, "seen": dict(self._seen), "told": told}

    def resume(self, position: Any) -> bool:
        if not (self.host.jetstream and isinstance(position, dict)):
            return False
        if position.get("stream") != self.host.stream_name:
            return False
        self._resume_from = dict(position.get("seen") or {})
        with self._lock:
            self._early = {**(position.get("told") or {}), **self._early}
        self._resumed = self._resuming = True
        return True

    def probe(self, channel: str, payload: str) -> None:
        if self.host.jetstream:
            # A push consumer whose server went away without taking this
            # connection along says so only by falling silent.
            limit = 3 * self.backend.config["probe_interval"] + self._timeout
            now = time.monotonic()
            for wire, heard in list(self._heard.items()):
                if now - heard > limit:
                    raise ConnectionLost(f"the JetStream consumer for {wire!r} fell silent")
        self._runner.submit(self._probe(channel, payload))

    def send_from_listener(self, channel: str, payload: str) -> None:
        self._runner.submit(self._probe(channel, payload))

    async def _probe(self, channel: str, payload: str) -> None:
        try:
            await self.host.publish_on(self._nc, channel, payload.encode())
        except Exception as exc:
            self._push(dead=f"probe not sent: {self.host.explain(exc)}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Handed over but never read by the listener: back for another member now.
            unread = [item.token for item in self._inbox if isinstance(item, Handed)]
        try:
            if unread and self._nc.is_connected:
                self._runner.run(self._publish_all(unread, b"-NAK"), self._timeout)
        except BaseException:
            pass  # not given back: the server hands them out again after ack_wait
        try:
            self._runner.run(self._nc.close(), self._timeout)
        except BaseException:
            pass  # closing a dead connection: nothing to save
        finally:
            close_fds(self._pipe_r, self._pipe_w)

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        try:
            return self._runner.run(coro, timeout or self._timeout + 1)
        except PubSubError:
            raise
        except BaseException as exc:
            raise ConnectionLost(self.host.explain(exc)) from exc
