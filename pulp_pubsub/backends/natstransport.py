"""One NATS subscriber connection, hosted on the process's NATS loop, read through a pipe.

nats-py calls back on the loop thread; the transport queues what arrives and pokes a
self-pipe, the descriptor the shared listener waits on. With JetStream each channel is an
ephemeral push consumer that starts just after the last stream sequence seen, which is
how a reconnecting subscriber is handed its gap instead of a resync.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.api
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from ..exceptions import ConnectionLost, PubSubError
from .base import Transport
from .natsloop import loop_runner
from .selfpipe import close_fds, drain, make_pipe, poke

if TYPE_CHECKING:
    from .nats import NatsBackend


class NatsTransport(Transport):
    """One NATS connection of one subscriber; messages reach the listener through a pipe."""

    backend: NatsBackend

    def __init__(self, backend: NatsBackend) -> None:
        super().__init__(backend)
        self._lock = threading.Lock()
        self._inbox: deque[tuple[str, str | None]] = deque()
        self._dead: str | None = None
        self._closed = False
        self._pipe_r, self._pipe_w = make_pipe()
        self._subs: dict[str, Any] = {}
        # JetStream: the last stream sequence seen per wire channel, the
        # position an earlier transport reached, and the consumers' liveness.
        self._seen: dict[str, int] = {}
        self._resume_from: dict[str, int] = {}
        self._heard: dict[str, float] = {}
        self._runner = loop_runner()
        self._timeout = backend.config["connect_timeout"]
        self._established = False
        try:
            self._nc: Client = self._runner.run(
                backend.connect(
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
                f"could not connect to {backend.where()}: {backend.explain(exc)}"
            ) from exc
        self._established = True

    # -- callbacks on the loop thread --------------------------------------------

    def _push(self, item: tuple[str, str | None] | None = None, dead: str | None = None) -> None:
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
            self._push((exc.subject, None))
        elif self._established and isinstance(
            exc, nats.errors.StaleConnectionError | ConnectionError | OSError
        ):
            # Before connect() returns, errors are those of servers it tried and passed over.
            self._push(dead=self.backend.explain(exc))

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
        self._run(self._listen(list(channels)))

    async def _listen(self, channels: list[str]) -> None:
        # Broadcast: a plain subscription (or consumer) per subscriber. Targeted delivery
        # would subscribe with ``queue=<group>`` here (JetStream: one durable consumer per
        # group with ``deliver_group``), so the server hands each message to one member.
        nc = self._nc
        for wire in channels:
            if wire in self._subs:
                continue
            if self.backend.jetstream:
                self._subs[wire] = await self._add_consumer(wire)
            else:
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

    async def _add_consumer(self, wire: str) -> Any:
        backend = self.backend
        js = self._nc.jsm(timeout=self._timeout)
        info = await backend.ensure_stream(self._nc)
        last = info.state.last_seq
        start = self._resume_from.pop(wire, None)
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
        deliver = self._nc.new_inbox()
        sub = await self._nc.subscribe(deliver, cb=self._consumer_callback(wire))
        heartbeat = backend.config["probe_interval"]
        config = nats.js.api.ConsumerConfig(
            deliver_subject=deliver,
            filter_subject=wire,
            deliver_policy=nats.js.api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start + 1,
            ack_policy=nats.js.api.AckPolicy.NONE,
            idle_heartbeat=heartbeat,
            flow_control=True,
            inactive_threshold=max(5.0, 3 * heartbeat),
            mem_storage=True,
        )
        consumer = await js.add_consumer(backend.stream_name, config)
        self._heard[wire] = time.monotonic()
        return (sub, consumer.name)

    def unlisten(self, channels: Collection[str]) -> None:
        self._run(self._unlisten(list(channels)))

    async def _unlisten(self, channels: list[str]) -> None:
        for wire in channels:
            sub = self._subs.pop(wire, None)
            self._heard.pop(wire, None)
            if isinstance(sub, tuple):
                await sub[0].unsubscribe()
                try:
                    await self._nc.jsm(timeout=self._timeout).delete_consumer(
                        self.backend.stream_name, sub[1]
                    )
                except nats.js.errors.NotFoundError:
                    pass
            elif sub is not None:
                await sub.unsubscribe()

    def read(self) -> list[tuple[str, str | None]]:
        drain(self._pipe_r)
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            dead = self._dead
        if dead:
            if items:
                poke(self._pipe_w)  # hand these out first; raise on the next read
                return items
            raise ConnectionLost(dead)
        return items

    def position(self) -> Any:
        if not self.backend.jetstream:
            return None
        with self._lock:
            return {"stream": self.backend.stream_name, "seen": dict(self._seen)}

    def resume(self, position: Any) -> bool:
        if not (self.backend.jetstream and isinstance(position, dict)):
            return False
        if position.get("stream") != self.backend.stream_name:
            return False
        self._resume_from = dict(position.get("seen") or {})
        return True

    def probe(self, channel: str, payload: str) -> None:
        if self.backend.jetstream:
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
            await self.backend.publish_on(self._nc, channel, payload.encode())
        except Exception as exc:
            self._push(dead=f"probe not sent: {self.backend.explain(exc)}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._runner.run(self._nc.close(), self._timeout)
        except BaseException:
            pass  # closing a dead connection: nothing to save
        finally:
            close_fds(self._pipe_r, self._pipe_w)

    def _run(self, coro: Any) -> Any:
        try:
            return self._runner.run(coro, self._timeout + 1)
        except PubSubError:
            raise
        except BaseException as exc:
            raise ConnectionLost(self.backend.explain(exc)) from exc
