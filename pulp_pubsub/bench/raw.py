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
