"""redis-py connections whose host name lookup gives up in time.

redis-py looks the host up with no timeout of its own (see :mod:`.lookup`).
These look it up first, within ``socket_connect_timeout``: a resolver that
does not answer fails the connect in time, with a message that says so. The
lookup redis-py then makes goes to a resolver that has just answered.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis.connection import Connection, ConnectionPool, SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.sentinel import Sentinel, SentinelManagedConnection, SentinelManagedSSLConnection

from ..lookup import LookupTimeout, lookup

if TYPE_CHECKING:
    _Base = Connection
else:
    _Base = object  # a mixin: the connection class comes after it


class _LookUpFirst(_Base):
    def _connect(self) -> Any:
        timeout = self.socket_connect_timeout
        if timeout:
            try:
                lookup(str(self.host), self.port, float(timeout))
            except LookupTimeout as exc:
                # As it is: redis-py would put its own words around an OSError's.
                raise RedisConnectionError(str(exc)) from None
        return super()._connect()


class LookupConnection(_LookUpFirst, Connection):
    pass


class LookupSSLConnection(_LookUpFirst, SSLConnection):
    pass


class LookupSentinelManagedConnection(_LookUpFirst, SentinelManagedConnection):
    """Looks up the name the sentinels give for the master (or a replica)."""


class LookupSentinelManagedSSLConnection(_LookUpFirst, SentinelManagedSSLConnection):
    pass


def bound_sentinel_lookups(sentinel: Sentinel) -> None:
    """Give the clients ``Sentinel`` made for each sentinel the same bounded lookup.

    It builds them itself, from ``sentinel_kwargs``, which cannot name a
    connection class; none of them has connected yet.
    """
    for client in sentinel.sentinels:
        pool: ConnectionPool = client.connection_pool
        tls = issubclass(pool.connection_class, SSLConnection)
        pool.connection_class = LookupSSLConnection if tls else LookupConnection
