"""The bare client libraries, used the plain way, as the yardstick for the layer.

Each raw client holds what the layer holds for the same job (one connection
that listens, one that publishes) and is waited on the same way (``select()``
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

        self.listener = psycopg.connect(url, autocommit=True)
        self.publisher = psycopg.connect(url, autocommit=True)

    def subscribe(self, channel: str) -> None:
        from psycopg import sql

        self.listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))

    def fileno(self) -> int:
        return self.listener.fileno()

    def read(self) -> list[tuple[str, str]]:
        # timeout=0: take what has arrived, never wait (the caller's select() did).
        return [(n.channel, n.payload) for n in self.listener.notifies(timeout=0)]

    def publish(self, channel: str, payload: str) -> None:
        self.publisher.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def close(self) -> None:
        self.listener.close()
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
        from ..backends.etcd import parse_url
        from ..backends.etcdhttp import Connection, Endpoint

        hosts, tls, _, _ = parse_url(url)
        if tls:
            raise ValueError("the bare etcd client of the benchmark speaks plain HTTP only")
        self.endpoint = Endpoint(*hosts[0], None)
        self.publisher = Connection(self.endpoint)
        self.sock: Any = None
        self.reader: Any = None

    def subscribe(self, channel: str) -> None:
        import time

        from ..backends.etcdhttp import HttpReader, b64, request_bytes

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
        from ..backends.etcdhttp import unb64

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

        from ..backends.etcdhttp import b64

        body = {"key": b64(channel.encode()), "value": b64(payload.encode())}
        self.publisher.call("/v3/kv/put", body, time.monotonic() + 5)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.publisher.close()
