"""The relay: one LISTEN for many subscribers, fanned out over WebSocket.

Each relay holds one PostgreSQL session (see :mod:`.pglink`) that LISTENs to
the union of the channels its clients ask for. Several relays run side by
side, each on its own: nothing is elected and no relay knows another. A
client that loses its relay moves to another one and resyncs, so a relay can
be killed at any time. Publishers either NOTIFY (and PostgreSQL reaches every
relay) or send to every relay themselves (``publish`` frames, no NOTIFY).

Wire protocol: :mod:`pulp_pubsub.backends.relay.protocol`.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event, State

from ..backends.relay.protocol import MAX_FRAME, SUBPROTOCOL, TOO_SLOW, WIRE_LOGGER, decode, encode
from ..conf import Secret
from ..exceptions import InvalidChannel, InvalidPayload
from ..validation import encode_payload, validate_channel
from .pglink import Batch, PgLink

logger = logging.getLogger(__name__)

#: NOTIFY's own limits, for publishes the relay sends to PostgreSQL.
NOTIFY_LIMIT = 7999


class Client:
    """One connected subscriber or publisher, with its bounded send queue."""

    def __init__(self, ws: ServerConnection, queue_size: int) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str] = asyncio.Queue(queue_size)
        self.channels: set[str] = set()
        self.local: set[str] = set()
        self.dropped = False

    def push(self, frame: str) -> bool:
        if self.dropped:
            return False
        try:
            self.queue.put_nowait(frame)
            return True
        except asyncio.QueueFull:
            self.dropped = True
            return False


class PromptConnection(ServerConnection):
    """Answers a frame inside the read callback when nothing is ahead of it.

    A publisher waits on the answer to every batch: the handler task would cost
    one more pass of the event loop and websockets' send bookkeeping for each,
    about a fifth of a batch's CPU on the relay. A frame that must wait
    (``subscribe``), or that arrives while an earlier one is still in the
    handler or while the socket's write buffer is not empty (the client is not
    reading: the handler's ``send()`` waits for it to drain), goes the usual way,
    so order and back-pressure hold.
    """

    client: Client | None = None
    relay: Relay | None = None
    #: Messages handed to the handler task and not yet answered by it.
    queued = 0

    def process_event(self, event: Event) -> None:
        if not isinstance(event, Frame):
            super().process_event(event)  # the handshake
            return
        client, relay = self.client, self.relay
        if client is not None and relay is not None and self._may_answer(event, client):
            answer = relay.answer_now(client, bytes(event.data))
            if answer is not None:
                if answer and client.queue.empty():
                    self.protocol.send_text(answer.encode())
                    self.send_data()
                elif answer:  # it published to itself: the answer goes after those messages
                    relay.queue_frame(client, answer)
                return
        if event.fin and event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            self.queued += 1
        super().process_event(event)

    def _may_answer(self, event: Frame, client: Client) -> bool:
        return (
            event.opcode is Opcode.TEXT
            and event.fin
            and self.queued == 0
            and client.queue.empty()
            and not client.dropped
            and self.protocol.state is State.OPEN
            and not self.transport.get_write_buffer_size()
        )


class Relay:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        token: str | None,
        ssl_context: Any = None,
        max_clients: int = 1000,
        queue_size: int = 1000,
        pg_factory: Callable[[Relay], PgLink] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self._token = Secret(token) if token is not None else None
        self._ssl = ssl_context
        self.max_clients = max_clients
        self.queue_size = queue_size
        self._pg_factory = pg_factory
        self.pg: PgLink | None = None
        self.clients: set[Client] = set()
        self.by_channel: dict[str, set[Client]] = {}
        # How many clients LISTEN through PostgreSQL to each channel (their ``channels``,
        # not ``local``): kept as clients come and go, so what PostgreSQL must LISTEN to
        # is known without going through every client's channels (a fleet's private
        # probe channels among them) on each subscribe.
        self.listened: dict[str, int] = {}
        self.started_at = time.time()
        self.stats = {"messages": 0, "too_slow": 0, "refused": 0, "resyncs": 0}
        self._server: Server | None = None
        self._closing: set[asyncio.Future[None]] = set()

    def __repr__(self) -> str:
        # Never the token.
        return f"<Relay {self.host}:{self.port} clients={len(self.clients)}>"

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._pg_factory is not None:
            self.pg = self._pg_factory(self)
            self.pg.start()
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            ssl=self._ssl,
            process_request=self._check_request,
            subprotocols=[SUBPROTOCOL],
            max_size=MAX_FRAME,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=2,
            compression=None,
            logger=WIRE_LOGGER,
            create_connection=PromptConnection,
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.pg is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pg.stop)

    # -- PostgreSQL events (on the loop) ---------------------------------------------

    def pg_up(self) -> None:
        """(Re)connected and hearing: whatever was sent meanwhile may be lost."""
        for client in list(self.clients):
            channels = sorted(client.channels)
            if channels:
                self.stats["resyncs"] += 1
                self.queue_frame(client, encode(type="resync", channels=channels))

    def pg_down(self, cause: str) -> None:
        logger.debug("Relay: PostgreSQL down: %s", cause)

    def pg_batch(self, batch: Batch) -> None:
        for channel, payload in batch:
            self.deliver(channel, payload)

    def deliver(self, channel: str, payload: str) -> None:
        clients = self.by_channel.get(channel)
        if not clients:
            return
        frame = encode(type="message", channel=channel, payload=payload)
        self.stats["messages"] += 1
        for client in list(clients):
            self.queue_frame(client, frame)

    def queue_frame(self, client: Client, frame: str) -> None:
        if client.push(frame) or client.ws.state.name != "OPEN":
            return
        if client.dropped and client in self.clients:
            # Too slow: it reconnects (here or elsewhere) and resyncs.
            self.stats["too_slow"] += 1
            logger.warning(
                "Relay: a client at %s fell %d messages behind; disconnecting it.",
                _peer(client.ws),
                self.queue_size,
            )
            self._forget(client)
            closing = asyncio.ensure_future(client.ws.close(TOO_SLOW, "too slow: send queue full"))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    # -- connections -----------------------------------------------------------------

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if self._token is not None:
            given = request.headers.get("Authorization", "")
            expected = f"Bearer {self._token}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                self.stats["refused"] += 1
                logger.warning("Relay: refused %s: missing or wrong token.", _peer(connection))
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
        if len(self.clients) >= self.max_clients:
            self.stats["refused"] += 1
            logger.warning("Relay: refused %s: %d clients.", _peer(connection), self.max_clients)
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "relay full\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, PromptConnection)  # serve(create_connection=...)
        client = Client(ws, self.queue_size)
        self.clients.add(client)
        ws.client, ws.relay = client, self
        writer = asyncio.ensure_future(self._write(client))
        try:
            async for raw in ws:
                try:
                    frame = decode(raw)
                except ValueError:
                    answer: str | None = encode(type="error", error="not a relay frame")
                else:
                    answer = await self._on_frame(client, frame)
                if answer is not None:
                    await self._answer(client, answer)
                ws.queued -= 1
        except ConnectionClosed:
            pass
        finally:
            self._forget(client)
            writer.cancel()

    def answer_now(self, client: Client, data: bytes) -> str | None:
        """The answer to a frame that needs no waiting ("" for none); None to queue it."""
        try:
            frame = decode(data.decode())
        except ValueError:  # UnicodeDecodeError too: the usual path closes with 1007
            return None
        if frame["type"] == "subscribe":
            return None
        try:
            return self._frame_now(client, frame) or ""
        except Exception:
            # Inside websockets' read callback an exception would end the connection
            # with nothing said; the handler task would have failed the same way.
            logger.exception("Relay: a %r frame failed.", frame["type"])
            return encode(type="error", id=frame.get("id"), error="the relay failed on it")

    async def _answer(self, client: Client, frame: str) -> None:
        """An answer with nothing queued ahead of it goes out at once, not through the
        writer task: one pass of the loop less for every publish a publisher waits on.

        Order holds: websockets writes a frame before its ``send()`` first waits, and
        a frame still in the queue (the writer has not taken it) sends this one there.
        """
        if client.queue.empty() and not client.dropped:
            await client.ws.send(frame)
        else:
            self.queue_frame(client, frame)

    async def _write(self, client: Client) -> None:
        try:
            while True:
                frame = await client.queue.get()
                await client.ws.send(frame)
        except (ConnectionClosed, asyncio.CancelledError):
            pass

    def _forget(self, client: Client) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        gone = self._leave(client, client.channels | client.local)
        if gone:
            self._relisten()

    def _leave(self, client: Client, channels: set[str]) -> bool:
        """Drop ``client`` from ``channels``; True when PostgreSQL should stop LISTENing to one."""
        changed = False
        for channel in channels:
            members = self.by_channel.get(channel)
            if members is not None:
                members.discard(client)
                if not members:
                    del self.by_channel[channel]
            if channel in client.channels:
                left = self.listened[channel] - 1
                if left:
                    self.listened[channel] = left
                else:
                    del self.listened[channel]
                    changed = True
        client.channels -= channels
        client.local -= channels
        return changed

    def _wanted(self) -> frozenset[str]:
        return frozenset(self.listened)

    def _relisten(self) -> None:
        if self.pg is not None:
            self.pg.update(self._wanted())

    async def _on_frame(self, client: Client, frame: dict[str, Any]) -> str | None:
        if frame["type"] != "subscribe":
            return self._frame_now(client, frame)
        try:
            channels = _channels(frame)
        except InvalidChannel as exc:
            return encode(type="error", id=frame.get("id"), error=str(exc))
        local = bool(frame.get("local"))
        for channel in channels:
            self.by_channel.setdefault(channel, set()).add(client)
            if local:
                client.local.add(channel)
            elif channel not in client.channels:
                client.channels.add(channel)
                self.listened[channel] = self.listened.get(channel, 0) + 1
        if not local and self.pg is not None:
            # Answered once PostgreSQL LISTENs (or is found down: then the
            # reconnect sends a resync); messages queued before it stay in order.
            await asyncio.wrap_future(self.pg.update(self._wanted()))
        return encode(type="subscribed", id=frame.get("id"))

    def _frame_now(self, client: Client, frame: dict[str, Any]) -> str | None:
        """Every frame but ``subscribe``: nothing here waits."""
        kind, request_id = frame["type"], frame.get("id")
        try:
            if kind == "unsubscribe":
                if self._leave(client, set(_channels(frame))):
                    self._relisten()
                return None
            elif kind == "publish":
                channel = validate_channel(frame.get("channel"))
                payload = frame.get("payload")
                if not isinstance(payload, str):
                    raise InvalidPayload("'payload' must be a string")
                if frame.get("notify"):
                    encode_payload(payload, limit=NOTIFY_LIMIT, allow_nul=False, backend="relay")
                    if self.pg is None:
                        raise InvalidPayload("this relay runs without PostgreSQL (--no-postgres)")
                    if not self.pg.notify(channel, payload):
                        raise InvalidPayload("the relay's PostgreSQL session is down")
                else:
                    self.deliver(channel, payload)
                return encode(type="published", id=request_id)
            elif kind == "publish_many":
                # Several direct publishes in one frame, delivered in order, answered once;
                # checked whole first, so a refused frame delivered nothing.
                messages = frame.get("messages")
                if not isinstance(messages, list):
                    raise InvalidPayload("'messages' must be a list of [channel, payload]")
                # A batch usually repeats one channel: each name is checked once.
                names: set[str] = set()
                for item in messages:
                    if not (isinstance(item, list) and len(item) == 2):
                        raise InvalidPayload("each message must be [channel, payload]")
                    channel, payload = item
                    if not isinstance(payload, str):
                        raise InvalidPayload("'payload' must be a string")
                    if type(channel) is not str or channel not in names:
                        names.add(validate_channel(channel))
                if not names.isdisjoint(self.by_channel):  # else none of its clients listens
                    for channel, payload in messages:
                        self.deliver(channel, payload)
                return encode(type="published", id=request_id, count=len(messages))
            elif kind == "ping":
                return encode(type="pong", id=request_id, **self.health())
            else:
                raise InvalidPayload(f"unknown frame type {kind!r}")
        except (InvalidChannel, InvalidPayload) as exc:
            return encode(type="error", id=request_id, error=str(exc))

    def health(self) -> dict[str, Any]:
        pg = self.pg
        return {
            "postgres": "off" if pg is None else pg.state,
            "postgres_error": None if pg is None else pg.last_error,
            "postgres_probe_rtt": None if pg is None else pg.probe_rtt,
            "clients": len(self.clients),
            "channels": len(self.by_channel),
            "uptime": round(time.time() - self.started_at, 3),
            **self.stats,
        }


def _channels(frame: dict[str, Any]) -> list[str]:
    channels = frame.get("channels")
    if not isinstance(channels, list):
        raise InvalidChannel("'channels' must be a list of channel names")
    return [validate_channel(c) for c in channels]


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError, AttributeError):
        return "?"
