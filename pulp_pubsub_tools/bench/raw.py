"""The bare client libraries, used the plain way, as the yardstick for the layer.

Each raw client holds what the layer holds for the same job (one connection
that listens, one that publishes, opened on the first publish: a subscriber
that never publishes holds one, as a subscriber of the layer does) and is
waited on the same way (``select()``
on its descriptor, then drain), so the layer/raw ratio shows the layer's own
cost: its listener thread, queue and self-pipe.
"""

from __future__ import annotations

from typing import Any, Protocol


class RawClient(Protocol):
    def subscribe(self, channel: str) -> None: ...
    def fileno(self) -> int: ...
    def read(self) -> list[tuple[str, str]]: ...
    def publish(self, channel: str, payload: str) -> None: ...
    def close(self) -> None: ...


class PsycopgClient:
    """psycopg 3: LISTEN on one autocommit connection, ``pg_notify()`` on another."""

    label = "psycopg LISTEN / pg_notify"

    def __init__(self, url: str) -> None:
        import psycopg

        self.url = url
        self.listener = psycopg.connect(url, autocommit=True)
        self.publisher: Any = None

    def subscribe(self, channel: str) -> None:
        from psycopg import sql

        self.listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def fileno(self) -> int:
        return self.listener.fileno()

    def read(self) -> list[tuple[str, str]]:
        # timeout=0: take what has arrived, never wait (the caller's select() did).
        return [(n.channel, n.payload) for n in self.listener.notifies(timeout=0)]

    def publish(self, channel: str, payload: str) -> None:
        if self.publisher is None:
            import psycopg

            self.publisher = psycopg.connect(self.url, autocommit=True)
        self.publisher.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def close(self) -> None:
        self.listener.close()
        if self.publisher is not None:
            self.publisher.close()


class RedisClient:
    """redis-py: a ``PubSub`` connection that subscribes, the client's pool to publish."""

    label = "redis-py PUBLISH / SUBSCRIBE"

    def __init__(self, url: str) -> None:
        import redis

        self.client: Any = redis.Redis.from_url(url, decode_responses=True)
        self.pubsub: Any = self.client.pubsub()

    def subscribe(self, channel: str) -> None:
        self.pubsub.subscribe(channel)
        while True:  # the confirmation: after it, messages on the channel reach us
            message = self.pubsub.get_message(timeout=5)
            if message is None:
                raise TimeoutError(f"Redis did not confirm SUBSCRIBE {channel}")
            if message["type"] == "subscribe":
                return

    def fileno(self) -> int:
        return int(self.pubsub.connection._sock.fileno())

    def read(self) -> list[tuple[str, str]]:
        items = []
        # get_message() also sees replies already in the parser's buffer.
        while (message := self.pubsub.get_message(timeout=0)) is not None:
            if message["type"] == "message":
                items.append((message["channel"], message["data"]))
        return items

    def publish(self, channel: str, payload: str) -> None:
        self.client.publish(channel, payload)

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()


class EtcdRawClient:
    """etcd's v3 JSON gateway, used bare: one watch stream on the key, puts on another socket.

    No lease, no probe, no listener thread: a put of the payload and a watch
    read when its socket turns readable, what any client of the gateway does.
    """

    label = "etcd watch / put (v3 JSON gateway)"

    def __init__(self, url: str) -> None:
        from pulp_pubsub.backends.etcd.backend import parse_url
        from pulp_pubsub.backends.etcd.gateway import Connection, Endpoint

        hosts, tls, _, _ = parse_url(url)
        if tls:
            raise ValueError("the bare etcd client of the benchmark speaks plain HTTP only")
        self.endpoint = Endpoint(*hosts[0], None)
        self.publisher = Connection(self.endpoint)
        self.sock: Any = None
        self.reader: Any = None

    def subscribe(self, channel: str) -> None:
        import time

        from pulp_pubsub.backends.etcd.gateway import HttpReader, b64, request_bytes

        if self.sock is not None:
            raise ValueError("one channel per bare etcd client")
        self.sock = self.endpoint.connect(time.monotonic() + 5)
        create = {"create_request": {"key": b64(channel.encode())}}
        self.sock.sendall(request_bytes(self.endpoint, "/v3/watch", create, None))
        self.reader = HttpReader()
        while True:  # the confirmation: after it, puts on the key reach us
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("etcd closed the watch")
            self.reader.feed(data)
            if any(o.get("result", {}).get("created") for o in self.reader.take_json()):
                self.sock.setblocking(False)
                return

    def fileno(self) -> int:
        return int(self.sock.fileno())

    def read(self) -> list[tuple[str, str]]:
        from pulp_pubsub.backends.etcd.gateway import unb64

        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not data:
                raise ConnectionError("etcd closed the watch")
            self.reader.feed(data)
        return [
            (unb64(e["kv"]["key"]).decode(), unb64(e["kv"].get("value", "")).decode())
            for o in self.reader.take_json()
            for e in o.get("result", {}).get("events", ())
        ]

    def publish(self, channel: str, payload: str) -> None:
        import time

        from pulp_pubsub.backends.etcd.gateway import b64

        body = {"key": b64(channel.encode()), "value": b64(payload.encode())}
        self.publisher.call("/v3/kv/put", body, time.monotonic() + 5)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.publisher.close()


class NatsClient:
    """nats-py as a plain asyncio program would use it, its loops run in the caller's thread.

    Like the layer, one connection listens and one publishes, each on an event loop of its
    own that runs only inside these calls (no thread): ``fileno()`` is the listening socket,
    ``read()`` turns its loop until what left the socket is parsed, and running the
    publisher's loop never reads the listener's socket behind select()'s back.
    ``publish()`` flushes, as the layer does, so both wait for the server alike.
    """

    label = "nats-py PUB / SUB (asyncio, no thread)"

    def __init__(self, url: str) -> None:
        import asyncio

        import nats

        self.url = url
        self.loops = [asyncio.new_event_loop()]
        self.listener: Any = self.loops[0].run_until_complete(
            nats.connect(url, allow_reconnect=False)
        )
        self.publisher: Any = None
        self.subs: list[Any] = []

    def subscribe(self, channel: str) -> None:
        listen = self.loops[0].run_until_complete
        self.subs.append(listen(self.listener.subscribe(channel)))
        listen(self.listener.flush(5))

    def fileno(self) -> int:
        sock = self.listener._transport._io_writer.get_extra_info("socket")
        return int(sock.fileno())

    def read(self) -> list[tuple[str, str]]:
        return self.loops[0].run_until_complete(self._read())

    async def _read(self) -> list[tuple[str, str]]:
        import asyncio

        # Once the socket is drained select() would not wake us for what it held.
        reader = self.listener._transport._io_reader
        for turn in range(1000):
            await asyncio.sleep(0)
            if turn >= 2 and not reader._buffer:
                break
        await asyncio.sleep(0)
        items = []
        for sub in self.subs:
            while sub.pending_msgs:
                msg = await sub.next_msg(timeout=1)
                items.append((msg.subject, msg.data.decode()))
        return items

    def publish(self, channel: str, payload: str) -> None:
        if self.publisher is None:
            import asyncio

            import nats

            self.loops.append(asyncio.new_event_loop())
            self.publisher = self.loops[1].run_until_complete(
                nats.connect(self.url, allow_reconnect=False)
            )

        async def send() -> None:
            await self.publisher.publish(channel, payload.encode())
            await self.publisher.flush(5)

        self.loops[1].run_until_complete(send())

    def close(self) -> None:
        clients = [c for c in (self.listener, self.publisher) if c is not None]
        for loop, nc in zip(self.loops, clients, strict=True):
            loop.run_until_complete(nc.close())
            loop.close()


class KazooRawClient:
    """kazoo as its documentation shows it: a ``ChildrenWatch`` on the channel's node, and
    ``create(..., sequence=True)`` to publish, each on a session of its own.

    kazoo calls the watch on its own thread; what it fetches there (the new children's
    data, in sequence order) is handed over through a pipe, the descriptor ``select()``
    waits on. No probe, no replay position across sessions, no trimming.
    """

    label = "kazoo ChildrenWatch / create(sequence=True)"
    root = "/pubsub-bench-raw"

    def __init__(self, url: str) -> None:
        import os
        import threading

        from kazoo.client import KazooClient

        from pulp_pubsub.backends.zookeeper.names import parse_url

        hosts = parse_url(url).connect_string
        self.listener: Any = KazooClient(hosts)
        self.publisher: Any = KazooClient(hosts)
        self.listener.start(timeout=10)
        self.publisher.start(timeout=10)
        self.pipe_r, self.pipe_w = os.pipe()
        os.set_blocking(self.pipe_r, False)
        self.lock = threading.Lock()
        self.items: list[tuple[str, str]] = []
        self.seen: dict[str, str] = {}

    def subscribe(self, channel: str) -> None:
        from kazoo.recipe.watchers import ChildrenWatch

        path = f"{self.root}/{channel}"
        self.publisher.ensure_path(path)
        existing = sorted(self.listener.get_children(path))
        self.seen[channel] = existing[-1] if existing else ""

        def changed(children: list[str]) -> None:
            new = sorted(c for c in children if c > self.seen[channel])
            for name in new:
                data, _ = self.listener.get(f"{path}/{name}")
                with self.lock:
                    self.items.append((channel, data.decode()))
                self.seen[channel] = name
            if new:
                import os

                os.write(self.pipe_w, b"\0")

        ChildrenWatch(self.listener, path, changed)

    def fileno(self) -> int:
        return self.pipe_r

    def read(self) -> list[tuple[str, str]]:
        import os

        try:
            os.read(self.pipe_r, 65536)
        except BlockingIOError:
            pass
        with self.lock:
            items, self.items = self.items, []
        return items

    def publish(self, channel: str, payload: str) -> None:
        path = f"{self.root}/{channel}/m"
        self.publisher.create(path, payload.encode(), sequence=True, makepath=True)

    def close(self) -> None:
        import os

        for client in (self.listener, self.publisher):
            client.stop()
            client.close()
        os.close(self.pipe_r)
        os.close(self.pipe_w)
