"""How this backend speaks to a Redis server: connections, replies, commands, errors.

Shared by the PUB/SUB side (:mod:`.backend`) and the targeted-delivery side
(:mod:`.groups`), which both read raw replies off connections of their own
instead of going through redis-py's clients. redis-py grew what is used here
over its releases; pulpcore allows 4.3 and later, so each is used only where it
exists (tests/test_redis_floor.py runs the suite on 4.3).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, cast

import redis
from redis.connection import Connection, ConnectionPool, UnixDomainSocketConnection

from ...exceptions import ConnectionLost

_READ_PARAMS = inspect.signature(Connection.read_response).parameters
#: read_response(timeout=) (redis-py 8): without it, can_read(timeout) waits first.
_READ_TAKES_TIMEOUT = "timeout" in _READ_PARAMS
#: read_response(disconnect_on_error=) (redis-py 4.5): keep the socket on a timeout.
_KEEP_ON_ERROR = {"disconnect_on_error": False} if "disconnect_on_error" in _READ_PARAMS else {}
#: protocol= (redis-py 5, with RESP3): pin RESP2; before it, RESP2 was all there was.
RESP2: dict[str, Any] = {"protocol": 2} if int(redis.__version__.split(".")[0]) >= 5 else {}
#: UnixDomainSocketConnection(socket_connect_timeout=) (redis-py 4.4 or so).
UNIX_CONNECT_TIMEOUT = (
    "socket_connect_timeout" in inspect.signature(UnixDomainSocketConnection.__init__).parameters
    or "kwargs" in inspect.signature(UnixDomainSocketConnection.__init__).parameters
)

#: How redis-py 7 and later name each sentinel that failed in "No master found": the whole
#: client, pool and connection, where only the address says anything.
_SENTINEL_CLIENT = re.compile(r"<redis\.client\.Redis\(<.*?\bhost=([^,]+),port=(\d+).*?\)>\)>\)>")


def explain(exc: BaseException, prefix: str = "") -> str:
    """The redis-py error with a hint where the usual cause is a setting."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, redis.sentinel.MasterNotFoundError):
        text = _SENTINEL_CLIENT.sub(r"\1:\2", text)
    if isinstance(exc, redis.ResponseError) and str(exc).startswith("WRONGPASS"):
        # redis-py before 4.4 reports a refused AUTH as a plain ResponseError.
        text = f"AuthenticationError: {exc}"
    if isinstance(exc, redis.AuthenticationError) or text.startswith("AuthenticationError"):
        return f"{text} (check the user name and password in PUBSUB_URL or PUBSUB_OPTIONS)"
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (
            f"{text} (the Redis ACL user needs +publish +subscribe +unsubscribe "
            f"+pubsub|numsub and the channels &{prefix}*)"
        )
    return text


def dial(pool: ConnectionPool, where: str) -> tuple[Connection, int]:
    """A new connection of ``pool``, connected, and its descriptor for the listener's select().

    Made outside the pool's bookkeeping: it is read by hand, never handed back.
    """
    conn = cast(Connection, pool.make_connection())
    try:
        conn.connect()
    except Exception as exc:
        conn.disconnect()
        raise ConnectionLost(f"could not connect to {where}: {explain(exc)}") from exc
    sock = conn._sock
    if sock is None:  # connect() returned without a socket: never expected
        raise ConnectionLost(f"could not connect to {where}")
    return conn, sock.fileno()


def read_reply(conn: Connection, timeout: float) -> Any:
    """One reply, or redis.TimeoutError when none is complete within ``timeout``.

    Before redis-py 8 read_response() takes no timeout: can_read() waits for the first byte,
    and the rest of a reply that has begun to arrive is read within the socket timeout.
    """
    if _READ_TAKES_TIMEOUT:
        return conn.read_response(timeout=timeout, **_KEEP_ON_ERROR)
    if not conn.can_read(timeout=timeout):
        raise redis.TimeoutError("no reply in time")
    return conn.read_response(**_KEEP_ON_ERROR)


def pubsub_frame(frame: object) -> tuple[bytes, str, str]:
    """(kind, channel, payload) of a RESP2 pub/sub reply; payloads are UTF-8 text."""
    if isinstance(frame, list) and len(frame) == 3 and isinstance(frame[0], bytes):
        name = frame[1].decode("utf-8", "replace") if isinstance(frame[1], bytes) else ""
        data = frame[2].decode("utf-8", "replace") if isinstance(frame[2], bytes) else ""
        return frame[0], name, data
    return b"", "", ""


def pack(*args: str) -> bytes:
    """One command in RESP, as redis-py would send it."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
