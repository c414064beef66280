"""Throwaway servers for tests, benchmarks and chaos runs.

Fault tests must stop, restart, freeze or cut servers without touching the shared ones on the
machine. Each server here runs the locally installed binary on a free loopback port in its own
temporary directory (on RAM-backed /dev/shm when it has room; ``$PUBSUB_TEST_TMPDIR``
overrides that), and ``cleanup()`` or interpreter exit removes it. Plain classes with no
pytest, so the benchmark and the chaos run use them too.
"""

from .etcd import EtcdCluster, EtcdServer
from .nats import NatsCluster, NatsServer
from .postgres import PgBouncerServer, PostgresServer
from .processes import LOOPBACK, free_port
from .proxy import TcpProxy
from .redis import RedisServer, SentinelCluster, SentinelServer
from .relay import RelayServer
from .zookeeper import ZookeeperEnsemble, ZookeeperServer

__all__ = [
    "LOOPBACK",
    "EtcdCluster",
    "EtcdServer",
    "NatsCluster",
    "NatsServer",
    "PgBouncerServer",
    "PostgresServer",
    "RedisServer",
    "RelayServer",
    "SentinelCluster",
    "SentinelServer",
    "TcpProxy",
    "ZookeeperEnsemble",
    "ZookeeperServer",
    "free_port",
]
