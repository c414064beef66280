"""How this backend speaks to a Redis server: connections, replies, commands, errors.

Shared by the PUB/SUB side (:mod:`.backend`) and the targeted-delivery side
(:mod:`.groups`), which both read raw replies off connections of their own
instead of going through redis-py's clients. redis-py grew what is used here
over its releases; pulpcore allows 4.3 and later, so each is used only where it
exists (.ci/run runs the Redis tests on 4.3). Once dialled, the connections a subscriber
reads are read by :class:`Frames`, not by redis-py.
"""

from __future__ import annotations

import inspect
import math
import re
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Final, cast

import hiredis
import redis
from redis.connection import Connection, ConnectionPool, UnixDomainSocketConnection

from ...exceptions import ConnectionLost
from ..selfpipe import wait_readable

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


#: What :meth:`Frames.next` returns while no whole reply has come (a reply may be ``None``).
NOTHING: Final = object()
#: Bytes one read of a connection takes at most.
READ_SIZE = 65536
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Frames:
    """The replies of a connection this backend reads itself, taken without waiting.

    A subscriber reads every message this way, in the thread that dispatches it. redis-py's
    ``can_read()`` and ``read_response(timeout=)`` cost a poll, a peek and two changes of the
    socket's timeout for each reply (redis-py 8), which made a subscriber's reading dearer
    than the bare client's: the socket is made non-blocking once instead and read straight
    into a hiredis reader. redis-py still dials (TLS, AUTH, HELLO), sends nothing afterwards,
    and disconnects.
    """

    def __init__(self, conn: Connection, timeout: float) -> None:
        sock = conn._sock
        if sock is None:
            raise ConnectionLost("the connection closed before it was read")
        sock.settimeout(0)
        self._sock: socket.socket = sock
        self._timeout: float = timeout
        self._parser: Any = hiredis.Reader()
        # redis-py's own mapping of an error reply to its exception class (NOPERM and so on).
        self._error: Callable[[str], Exception] = conn._parser.parse_error
        self._buffer: bytearray = bytearray(READ_SIZE)

    def next(self) -> Any:
        """One whole reply, or :data:`NOTHING` when none can be had without waiting."""
        parser = self._parser
        while True:
            try:
                reply = parser.gets()
            except hiredis.ProtocolError as exc:
                raise ConnectionLost(f"Redis sent what is not RESP: {exc}") from exc
            if reply is not False:  # RESP2 has no boolean: False means no whole reply yet
                if isinstance(reply, hiredis.ReplyError):
                    raise self._error(str(reply))
                return reply
            try:
                size = self._sock.recv_into(self._buffer)
            except _WOULD_BLOCK:
                return NOTHING
            except OSError as exc:
                raise ConnectionLost(f"Redis connection failed: {exc}") from exc
            if not size:
                raise ConnectionLost("Redis closed the connection")
            parser.feed(self._buffer, 0, size)

    def wait(self, timeout: float) -> Any:
        """The next reply, waiting up to ``timeout`` seconds; raises redis.TimeoutError."""
        deadline = time.monotonic() + timeout
        while (reply := self.next()) is NOTHING:
            left = deadline - time.monotonic()
            if left <= 0:
                raise redis.TimeoutError("no reply in time")
            wait_readable([self._sock.fileno()], left)
        return reply

    def send(self, *args: str) -> None:
        """Send one command, waiting up to the connection's timeout while the socket is full."""
        data = memoryview(pack(*args))
        deadline = time.monotonic() + self._timeout
        sock = self._sock
        while data:
            try:
                data = data[sock.send(data) :]
            except _WOULD_BLOCK:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConnectionLost(
                        f"Redis did not take a command within {self._timeout} s"
                    ) from None
                writable = select.poll()  # not select(): descriptors may be above 1023
                writable.register(sock, select.POLLOUT)
                writable.poll(math.ceil(left * 1000))
            except OSError as exc:
                raise ConnectionLost(f"Redis connection failed: {exc}") from exc
