"""The subscriber's own reading of a Redis connection (``wire.Frames``), against a real server.

The connection is non-blocking once redis-py has dialled it: a reply may come in pieces over
several reads, and a command may not fit the socket's buffer at once.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis

from pulp_pubsub.backends.redis.backend import RedisBackend
from pulp_pubsub.backends.redis.wire import READ_SIZE
from pulp_pubsub.backends.selfpipe import wait_readable
from pulp_pubsub.exceptions import ConnectionLost
from pulp_pubsub_tools.testing import RedisServer

pytestmark = [pytest.mark.backend, pytest.mark.servers]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
def transport(server):
    backend = RedisBackend(url=server.url, options={})
    transport = backend.open_transport()
    yield transport
    transport.close()
    backend.close()


def read_until(transport, count: int) -> list[tuple[str, str]]:
    got: list[tuple[str, str]] = []
    while len(got) < count:
        batch = transport.read()
        if not batch:
            assert wait_readable([transport.fileno()], 10), f"stuck at {len(got)} of {count}"
        got.extend(batch)
    return got


def test_a_message_larger_than_one_read_arrives_whole(server, transport):
    transport.listen(["big"])
    payload = "".join(chr(ord("a") + i % 26) for i in range(3 * READ_SIZE + 17))
    with redis.Redis.from_url(server.url, socket_timeout=5) as client:
        client.publish("big", payload)
        client.publish("big", "after")
    assert read_until(transport, 2) == [("big", payload), ("big", "after")]


def test_a_subscribe_larger_than_the_socket_buffer_is_sent_whole_and_confirmed(server, transport):
    # About 2 MB of SUBSCRIBE through a send buffer made small: the non-blocking socket
    # takes it in many sends, waiting for room between them.
    with socket.fromfd(transport.fileno(), socket.AF_INET, socket.SOCK_STREAM) as same:
        same.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    channels = [f"channel-{i:06d}-" + "x" * 40 for i in range(40000)]
    transport.listen(channels)
    with redis.Redis.from_url(server.url, socket_timeout=5) as client:
        assert client.pubsub_numsub(channels[-1]) == [(channels[-1].encode(), 1)]
        client.publish(channels[-1], "last")
    assert read_until(transport, 1) == [(channels[-1], "last")]


def test_a_connection_the_server_closes_is_lost_not_read_as_empty(server, transport):
    transport.listen(["closing"])
    with redis.Redis.from_url(server.url, socket_timeout=5) as client:
        assert client.client_kill_filter(_type="pubsub") >= 1
    assert wait_readable([transport.fileno()], 10)
    with pytest.raises(ConnectionLost, match="closed"):
        transport.read()
