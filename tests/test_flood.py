"""A Redis subscriber under a flood: bounded reads, a probe that keeps running, bounded memory.

The figures of a longer flood come from ``python -m pulp_pubsub_tools.chaos.flood`` (see
docs/reliability.md); these tests hold what must be true at any speed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from pulp_pubsub.backends.redis.backend import READ_BATCH, RedisBackend
from pulp_pubsub.backends.selfpipe import wait_readable
from pulp_pubsub_tools.chaos.flood import flood
from pulp_pubsub_tools.testing import RedisServer

pytestmark = [pytest.mark.backend, pytest.mark.servers]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


def test_a_backlog_is_read_in_bounded_batches_and_in_order(server):
    backend = RedisBackend(url=server.url, options={})
    transport = backend.open_transport()
    total = 5 * READ_BATCH
    try:
        transport.listen(["flood"])
        with redis.Redis.from_url(server.url, socket_timeout=5) as client:
            pipe = client.pipeline(transaction=False)
            for i in range(total):
                pipe.publish("flood", str(i))
            pipe.execute()  # the server has sent them all to the subscriber's socket
        assert wait_readable([transport.fileno()], 10)
        batches = [transport.read()]
        got = list(batches[0])
        while len(got) < total:
            batch = transport.read()  # what the parser holds leaves the socket unreadable
            if not batch:
                assert wait_readable([transport.fileno()], 10), f"stuck at {len(got)}"
            batches.append(batch)
            got.extend(batch)
        assert len(batches[0]) == READ_BATCH
        assert max(len(batch) for batch in batches) <= READ_BATCH
        assert [payload for _, payload in got] == [str(i) for i in range(total)]
    finally:
        transport.close()
        backend.close()


def test_under_a_flood_the_probe_runs_and_memory_stays_bounded(server):
    result = flood(server.url, seconds=4.0)
    text = str(result)
    # The handler is far slower than the publisher: the bounded queue dropped, then resynced.
    assert result["dropped"] > 0 and result["resyncs"] > 0, text
    # The listener went on probing through the flood, and its probes came back (how fast
    # depends on the machine: a backlog longer than probe_timeout is a reconnect and a resync).
    assert result["probes_sent"] >= 2 and result["probe_rtts"] >= 2, text
    assert result["rss_growth_mb"] < 16, text
