"""Redis PUB/SUB: wake-ups that hold no PostgreSQL session.

Each subscriber owns one plain redis-py connection in subscribe mode, read
through the shared listener's ``select()``; each process owns one publish
connection pool. The subscriber side deliberately bypasses ``redis.client.PubSub``:
its built-in retry reconnects and re-subscribes behind the caller's back,
which would hide exactly the reconnect that must end in a ``resync``. So
every connection here is built with retries off, and every failure reaches
the listener, which reconnects with backoff and resyncs.

Where the server is (the first that is set wins):

1. ``PUBSUB_URL``: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://``
   (TLS) or ``unix://[[user]:password@]/path/to/socket``; redis-py query
   arguments such as ``?ssl_ca_certs=/etc/pki/ca.pem`` are accepted. For Redis
   Sentinel: ``redis+sentinel://[[user]:password@]host1[:26379],host2[:26379]/service_name``
   (``rediss+sentinel://`` uses TLS to the sentinels and the master). The
   credentials in a sentinel URL are the master's; the sentinels' own come
   from the ``sentinel_username`` / ``sentinel_password`` options.
2. Pulp's ``REDIS_URL``.
3. Pulp's ``REDIS_HOST``, ``REDIS_PORT``, ``REDIS_DB``, ``REDIS_PASSWORD``,
   ``REDIS_SSL`` and ``REDIS_SSL_CA_CERTS``.
4. ``redis://localhost:6379/0``.

Pub/sub ignores the database number, so this backend always talks to db 0
(an ACL user then needs no ``SELECT``) and two installs on one server need
different ``PUBSUB_CHANNEL_PREFIX`` values; ``describe()`` warns when a
database number suggests otherwise.

An ACL user needs ``+publish +subscribe +unsubscribe +pubsub|numsub`` and
the channels ``&<prefix>*`` (the liveness probe uses a channel under the
prefix too).

Targeted delivery uses one stream per (channel, group), ``<wire channel>#<group>``,
with one consumer group in it. A publish adds ``receivers`` entries; each
member blocks in ``XREADGROUP`` on its own second connection, taking one entry
at a time, and acknowledges it (``XACK`` + ``XDEL``) when the subscriber says
so. A member that takes nothing for about ``claim_timeout`` seconds looks for
entries another member has held longer than ``claim_timeout`` (``XAUTOCLAIM``),
so an entry whose member died or hangs reaches a live one. For this an ACL
user also needs ``+xadd +xack +xdel +xreadgroup +xautoclaim +xgroup|create
+client|id +client|unblock`` and the keys ``~<prefix>*``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast
from urllib.parse import quote, unquote

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ...conf import Options, SecretURL, hide_password
from ...exceptions import ConnectionLost, MissingDependency, PublishError, PubSubError
from ...metrics import count
from ..aftercommit import Deferred
from ..base import BaseBackend, Handed, Transport
from ..perprocess import PerProcess

try:
    import hiredis  # noqa: F401  (the subscriber's reader, see .wire.Frames)
    import redis
    from redis.backoff import NoBackoff
    from redis.connection import (
        Connection,
        ConnectionPool,
        SSLConnection,
        parse_url,
    )
    from redis.retry import Retry
    from redis.sentinel import (
        Sentinel,
        SentinelConnectionPool,
    )
    from redis.utils import HIREDIS_AVAILABLE
except ImportError as exc:
    raise MissingDependency("redis", "redis", exc) from exc

# Needs redis-py too: after the check that names the pip extra.
from .groups import (
    CONSUMER_GROUP,
    STREAM_MAXLEN,
    TIDY_INTERVAL,
    GroupReader,
    marks_ms,
    member_base,
    stream_key,
)
from .scripts import HAND_OUT, PRUNE
from .sentinel import (
    LookupConnection,
    LookupSentinelManagedConnection,
    LookupSentinelManagedSSLConnection,
    LookupSSLConnection,
    bound_sentinel_lookups,
)
from .wire import (
    NOTHING,
    RESP2,
    UNIX_CONNECT_TIMEOUT,
    Frames,
    dial,
    explain,
    pack,
    pubsub_frame,
)

logger = logging.getLogger(__name__)

DEFAULT_URL = "redis://localhost:6379/0"
SENTINEL_PORT = 26379
_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
_TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
)


@dataclass
class _Target:
    """Where the server is, resolved once from the settings."""

    url: str
    source: str
    kwargs: dict[str, Any]
    tls: bool
    db: int = 0
    sentinels: list[tuple[str, int]] = field(default_factory=list)
    service_name: str | None = None

    def __post_init__(self) -> None:
        # Both may hold the password: keep it out of every repr().
        self.url = SecretURL(self.url)
        self.kwargs = Options(self.kwargs)


class _ProcessClients:
    """The connections one process may use; rebuilt in a forked child."""

    def __init__(self, backend: RedisBackend) -> None:
        config = backend.config
        self.sentinel: Sentinel | None = None
        target = backend.target
        if target.sentinels:
            self.sentinel = Sentinel(target.sentinels, sentinel_kwargs=backend.sentinel_kwargs())
            bound_sentinel_lookups(self.sentinel)
        publish_timeout = config["publish_timeout"]
        pool = backend.new_pool(
            self.sentinel,
            read_timeout=publish_timeout,
            connect_timeout=min(config["connect_timeout"], publish_timeout),
        )
        self.publisher = redis.Redis(connection_pool=pool)
        #: Publishes after commit, made by their thread on first use.
        self.after_commit: Connection | None = None
        #: Publishes now, by whichever thread holds ``direct_lock`` (see publish()).
        self.direct: Connection | None = None
        self.direct_lock = threading.Lock()

    def publish(self, channel: str, payload: str) -> None:
        """PUBLISH, on the process's own connection when no other thread is using it.

        A wake-up is one command and one integer reply: redis-py's client path (the pool,
        its bookkeeping and events, the retry wrapper) costs more CPU than the message
        itself, and that CPU is in every round trip. A thread that finds the connection
        busy takes the pool's path instead, so publishing threads never wait for each
        other. The connection is made by the same pool, with the same timeouts.
        """
        if not self.direct_lock.acquire(blocking=False):
            self.publisher.publish(channel, payload)
            return
        try:
            conn = self.direct
            if conn is None:
                conn = self.direct = cast(
                    Connection, self.publisher.connection_pool.make_connection()
                )
            # As the pool does before handing out a connection: connect() (a sentinel-managed
            # one asks the sentinels for the master; send_packed_command() would not), and
            # one with a reply waiting, or closed by the server while idle, is made again.
            conn.connect()
            try:
                stale = conn.can_read()
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                stale = True
            if stale:
                conn.disconnect()
                conn.connect()
            try:
                conn.send_packed_command(
                    conn.pack_command("PUBLISH", channel, payload), check_health=False
                )
                conn.read_response()
            except redis.ResponseError:
                raise  # refused (an ACL, say): the connection itself is fine
            except BaseException:
                conn.disconnect()  # a reply may be left unread; it reconnects on next use
                raise
        finally:
            self.direct_lock.release()

    def close(self) -> None:
        if self.after_commit is not None:
            self.after_commit.disconnect()
        if self.direct is not None:
            self.direct.disconnect()
        self.publisher.close()
        self.publisher.connection_pool.disconnect()
        if self.sentinel is not None:
            if hasattr(self.sentinel, "close"):
                self.sentinel.close()
            else:  # redis-py before 5: close each sentinel's client
                for client in self.sentinel.sentinels:
                    client.close()


#: Replies read by one RedisTransport.read() at most.
READ_BATCH = 500


class RedisTransport(Transport):
    """One subscribe-mode connection, read without blocking by the listener."""

    backend: RedisBackend

    def __init__(self, backend: RedisBackend) -> None:
        super().__init__(backend)
        self._timeout = backend.config["connect_timeout"]
        self._early: list[tuple[str, str]] = []
        # A pool of its own: a sentinel pool is what finds the current master.
        self._pool = backend.new_pool(
            backend.clients().sentinel, read_timeout=self._timeout, connect_timeout=self._timeout
        )
        self._conn, self._fd = dial(self._pool, backend.where())
        self._frames = Frames(self._conn, self._timeout)
        self._reader: GroupReader | None = None

    def fileno(self) -> int:
        return self._fd

    def listen(self, channels: Collection[str]) -> None:
        """SUBSCRIBE and wait for the server's confirmation of every channel."""
        waiting = set(channels)
        self._send("SUBSCRIBE", *sorted(waiting))
        deadline = time.monotonic() + self._timeout
        while waiting:
            try:
                frame = self._frames.wait(deadline - time.monotonic())
            except redis.TimeoutError as exc:
                raise ConnectionLost(
                    f"Redis did not confirm SUBSCRIBE within {self._timeout} s"
                ) from exc
            except redis.RedisError as exc:
                raise ConnectionLost(
                    f"Redis refused SUBSCRIBE: {explain(exc, self.backend.channel_prefix)}"
                ) from exc
            kind, name, payload = pubsub_frame(frame)
            if kind == b"subscribe":
                waiting.discard(name)
            elif kind == b"message":
                # Published on a channel already subscribed, while we waited:
                # handed out by the next read(), which the listener runs next.
                self._early.append((name, payload))

    def unlisten(self, channels: Collection[str]) -> None:
        # Its confirmation is skipped by read(): nothing waits for it.
        self._send("UNSUBSCRIBE", *sorted(channels))

    def _read_pubsub(self) -> list[tuple[str, str]]:
        items, self._early = self._early, []
        frames = self._frames
        # At most READ_BATCH replies a call: under a flood (a publisher faster than this
        # subscriber) an unbounded drain would never return to the listener, which would
        # stop probing and hold the whole backlog in memory. What is left waits in the
        # socket and the parser; the listener reads again at once (listener/loop.py,
        # Loop._serve).
        # Ended by the socket running dry, the read took all there was (see
        # Transport.drained); the group reader's read() drains its connection the same way.
        self.drained = True
        while len(items) < READ_BATCH:
            try:
                frame = frames.next()
            except redis.RedisError as exc:
                raise ConnectionLost(explain(exc)) from exc
            if frame is NOTHING:
                break
            kind, name, payload = pubsub_frame(frame)
            if kind == b"message":
                items.append((name, payload))
        else:
            self.drained = False  # the batch is full: more may wait in the parser
        return items

    # -- targeted delivery --------------------------------------------------------

    def filenos(self) -> list[int]:
        reader = self._reader
        return [self._fd] if reader is None else [self._fd, reader.fd]

    def join(self, members: Collection[tuple[str, str]]) -> None:
        publisher = self.backend.clients().publisher
        for wire, group in members:
            try:
                publisher.xgroup_create(stream_key(wire, group), CONSUMER_GROUP, "$", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise ConnectionLost(f"Redis refused XGROUP CREATE: {explain(exc)}") from exc
            except redis.RedisError as exc:
                raise ConnectionLost(f"XGROUP CREATE failed: {explain(exc)}") from exc
        if self._reader is None:
            backend = self.backend
            self._reader = GroupReader(
                self, backend.config, backend.channel_prefix, backend.where()
            )

    def want(self, members: frozenset[tuple[str, str]], consumer: str) -> None:
        if self._reader is not None:
            self._reader.want(members, consumer)

    # What the GroupReader is given of this transport (see groups.GroupLink).

    def dial(self) -> tuple[Connection, int]:
        """Another connection to this transport's server, for the group reads."""
        return dial(self._pool, self.backend.where())

    def publisher(self) -> redis.Redis:
        return self.backend.clients().publisher

    def ack(self, handed: Collection[Handed]) -> None:
        pipe = self.backend.clients().publisher.pipeline(transaction=False)
        for item in handed:
            key = stream_key(item.wire, item.group)
            pipe.xack(key, CONSUMER_GROUP, item.token)
            pipe.xdel(key, item.token)
        self._execute(pipe, "XACK")

    def release(self, handed: Collection[Handed]) -> None:
        # A fresh entry for the group, handed to an idle member, and the old one acked.
        backend = self.backend
        pipe = backend.clients().publisher.pipeline(transaction=False)
        for item in handed:
            key = stream_key(item.wire, item.group)
            pipe.eval(
                HAND_OUT, 1, key, *backend.hand_out_argv(item.group, item.payload, 1, item.token)
            )
        self._execute(pipe, "give back")

    def tidy(self, keys: Collection[str]) -> None:
        """Remove the consumers of members long gone from their groups.

        A SIGKILLed process never says goodbye, so without this a group keeps
        one consumer for every process that ever joined it. Only a consumer that
        holds nothing (others have claimed its entries) and has not read for
        ``consumer_expiry`` goes; a live member reads at least once per
        ``claim_timeout``, and one removed all the same is made again by its
        next read. One member per stream and ``TIDY_INTERVAL`` does it (the script
        keeps a mark), so a fleet's tidying stays O(N) however many members look.
        Delivery does not depend on this, so a refusal (a user whose
        ACL predates these commands) is logged once, not fatal.
        """
        backend = self.backend
        publisher = backend.clients().publisher
        expiry_ms = backend.config["consumer_expiry"] * 1000
        interval = str(int(TIDY_INTERVAL * 1000))
        try:
            for key in keys:
                if publisher.eval(PRUNE, 1, key, member_base(backend.channel_prefix), interval) < 0:
                    continue  # another member tidied it within the interval
                count(backend.stats, "tidies", backend.name)
                for consumer in publisher.xinfo_consumers(key, CONSUMER_GROUP):
                    if consumer["pending"] == 0 and consumer["idle"] >= expiry_ms:
                        publisher.xgroup_delconsumer(key, CONSUMER_GROUP, consumer["name"])
                        count(backend.stats, "consumers_removed", backend.name)
        except redis.exceptions.NoPermissionError as exc:
            if not backend.tidy_refused:
                backend.tidy_refused = True
                logger.warning(
                    "Redis refused to list or remove stale consumers (%s); they stay in "
                    "their groups. Grant +xinfo|consumers +xgroup|delconsumer.",
                    explain(exc),
                )
        except redis.ResponseError:
            pass  # NOGROUP: the stream is gone; the next group read reports it
        except redis.RedisError as exc:
            raise ConnectionLost(f"listing consumers failed: {explain(exc)}") from exc

    def _execute(self, pipe: Any, what: str) -> None:
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise ConnectionLost(
                f"{what} failed: {explain(exc, self.backend.channel_prefix)}"
            ) from exc

    def read(self) -> list[tuple[str, str] | Handed]:
        items: list[tuple[str, str] | Handed] = list(self._read_pubsub())
        if self._reader is not None:
            items.extend(self._reader.read())
        return items

    def close(self) -> None:
        self._conn.disconnect()
        if self._reader is not None:
            self._reader.close()

    def _send(self, *args: str) -> None:
        self._frames.send(*args)


class RedisBackend(BaseBackend):
    name = "redis"
    targets = True
    options: ClassVar[dict[str, Any]] = {
        # Override the credentials of the URL (so a password can stay out of it).
        "username": None,
        "password": None,
        # TLS (rediss://): CA bundle, client certificate, verification.
        "ssl_ca_certs": None,
        "ssl_certfile": None,
        "ssl_keyfile": None,
        "ssl_cert_reqs": None,
        "ssl_check_hostname": None,
        # The sentinels' own credentials (a sentinel URL carries the master's).
        "sentinel_username": None,
        "sentinel_password": None,
        # Targeted delivery: seconds after which a consumer that holds nothing and has not
        # read is taken for a process long gone and removed from its group.
        "consumer_expiry": 3600.0,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target = self._resolve()
        # A forked child makes its own: the parent's sockets stay the parent's.
        self._clients: PerProcess[_ProcessClients] = PerProcess(
            lambda: _ProcessClients(self), _ProcessClients.close
        )
        # Set once stale consumers could not be removed (logged once: see RedisTransport.tidy).
        self.tidy_refused = False

    # -- configuration ---------------------------------------------------------

    def _configured_url(self) -> tuple[str, str, dict[str, Any]]:
        if self.url:
            return self.url, "PUBSUB_URL", {}
        redis_url = getattr(settings, "REDIS_URL", None)
        if redis_url:
            return str(redis_url), "REDIS_URL", {}
        host = getattr(settings, "REDIS_HOST", None)
        if host:
            port = int(getattr(settings, "REDIS_PORT", None) or 6379)
            db = int(getattr(settings, "REDIS_DB", None) or 0)
            password = getattr(settings, "REDIS_PASSWORD", None)
            tls = bool(getattr(settings, "REDIS_SSL", False))
            ca_file = getattr(settings, "REDIS_SSL_CA_CERTS", None)
            auth = f":{quote(str(password), safe='')}@" if password else ""
            host = f"[{host}]" if ":" in str(host) else str(host)
            url = f"{'rediss' if tls else 'redis'}://{auth}{host}:{port}/{db}"
            return url, "REDIS_HOST", {"ssl_ca_certs": ca_file} if tls and ca_file else {}
        return DEFAULT_URL, "default", {}

    def _resolve(self) -> _Target:
        url, source, extra = self._configured_url()
        shown = hide_password(url)
        scheme = url.partition("://")[0].lower()
        try:
            if scheme in _SENTINEL_SCHEMES:
                target = _parse_sentinel_url(url, source, tls=_SENTINEL_SCHEMES[scheme])
            else:
                kwargs = parse_url(url)
                tls = kwargs.get("connection_class") is SSLConnection
                target = _Target(url, source, kwargs, tls, db=int(kwargs.pop("db", 0) or 0))
        except ValueError as exc:
            raise ImproperlyConfigured(
                f"The Redis pub/sub URL {shown} (from {source}) is not valid: {exc}"
            ) from None
        target.kwargs.update(extra)
        for key in ("username", "password", *_TLS_OPTIONS):
            if self.config[key] is not None:
                target.kwargs[key] = self.config[key]
        given_tls = [key for key in _TLS_OPTIONS if key in target.kwargs]
        if given_tls and not target.tls:
            raise ImproperlyConfigured(
                f"TLS options ({', '.join(given_tls)}) are set but the Redis URL {shown} "
                "does not use TLS; use rediss:// (or rediss+sentinel://)."
            )
        # Built once, without connecting, so a bad query argument fails here.
        try:
            self.new_pool(None, read_timeout=1, connect_timeout=1, target=target).make_connection()
        except (TypeError, redis.RedisError) as exc:
            raise ImproperlyConfigured(
                f"The Redis pub/sub URL {shown} (from {source}) has an invalid argument: {exc}"
            ) from None
        return target

    def new_pool(
        self,
        sentinel: Sentinel | None,
        *,
        read_timeout: float,
        connect_timeout: float,
        target: _Target | None = None,
    ) -> ConnectionPool:
        """A pool whose connections never retry: every failure reaches the caller."""
        target = target or self.target
        kwargs = {
            **target.kwargs,
            "socket_timeout": read_timeout,
            "socket_connect_timeout": connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
            # RESP2 on every server version: pub/sub replies stay plain
            # arrays, and an ACL user needs no HELLO.
            **RESP2,
        }
        if "path" not in kwargs:  # TCP, not a unix socket
            kwargs["socket_keepalive"] = True
            kwargs["connection_class"] = LookupSSLConnection if target.tls else LookupConnection
        elif not UNIX_CONNECT_TIMEOUT:
            # redis-py before 4.4: a unix socket connects at once or fails, with no timeout.
            del kwargs["socket_connect_timeout"]
        if target.sentinels:
            kwargs["connection_class"] = (
                LookupSentinelManagedSSLConnection
                if target.tls
                else LookupSentinelManagedConnection
            )
            if sentinel is None:  # only validating the arguments
                sentinel = Sentinel([])
            return SentinelConnectionPool(target.service_name, sentinel, **kwargs)
        return ConnectionPool(**kwargs)

    def sentinel_kwargs(self) -> dict[str, Any]:
        timeout = self.config["connect_timeout"]
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
            **RESP2,
            "username": self.config["sentinel_username"],
            "password": self.config["sentinel_password"],
        }
        if self.target.tls:
            kwargs["ssl"] = True
            kwargs.update(
                {key: self.target.kwargs[key] for key in _TLS_OPTIONS if key in self.target.kwargs}
            )
        return kwargs

    def where(self) -> str:
        """The server for messages and logs, without credentials."""
        if self.target.sentinels:
            return f"Redis Sentinel service {self.target.service_name!r}"
        return str(hide_password(self.target.url))

    # -- connections -------------------------------------------------------------

    def clients(self) -> _ProcessClients:
        return self._clients.get()

    def send(self, channel: str, payload: str) -> None:
        try:
            self._clients.get().publish(channel, payload)
        except redis.RedisError as exc:
            raise PublishError(
                f"redis backend could not publish to {self.where()}: "
                f"{explain(exc, self.channel_prefix)}"
            ) from exc

    # -- publishing after commit -------------------------------------------------

    def send_batch(self, batch: list[Deferred]) -> None:
        """Everything in one round trip; every message of a failed batch counts as failed.

        The commands are packed by hand and written at once on one pooled
        connection: redis-py's pipeline object costs more CPU per message than
        the message itself, and on a busy machine that CPU is what commits wait for.
        """
        packed: list[bytes] = []
        for item in batch:
            if item.group is None:
                packed.append(pack("PUBLISH", item.wire, item.payload))
            else:
                key = stream_key(item.wire, item.group)
                argv = self.hand_out_argv(item.group, item.payload, item.receivers)
                packed.append(pack("EVAL", HAND_OUT, "1", key, *argv))
        try:
            conn = self._sender_connection()
            try:
                # connect() first: redis-py 8's send_packed_command() connects a
                # sentinel-managed connection without asking the sentinels for the master.
                conn.connect()
                conn.send_packed_command([b"".join(packed)], check_health=False)
                for _ in packed:
                    conn.read_response()
            except BaseException:
                conn.disconnect()  # replies may be left unread; it reconnects on next use
                raise
        except redis.RedisError as exc:
            error = PublishError(
                f"redis backend could not publish to {self.where()}: "
                f"{explain(exc, self.channel_prefix)}"
            )
            self.deferred_failed(batch, error)
            return
        self.deferred_sent(batch)

    def _sender_connection(self) -> Connection:
        """The after-commit thread's own connection (no pool: nobody else uses it)."""
        clients = self.clients()
        if clients.after_commit is None:
            pool = clients.publisher.connection_pool
            clients.after_commit = cast(Connection, pool.make_connection())
        return clients.after_commit

    def send_targeted(self, channel: str, payload: str, group: str, receivers: int) -> None:
        argv = self.hand_out_argv(group, payload, receivers)
        try:
            self.clients().publisher.eval(HAND_OUT, 1, stream_key(channel, group), *argv)
        except redis.RedisError as exc:
            raise PublishError(
                f"redis backend could not publish to {self.where()}: "
                f"{explain(exc, self.channel_prefix)}"
            ) from exc

    def hand_out_argv(
        self, group: str, payload: str, receivers: int, replaces: str = ""
    ) -> tuple[str, ...]:
        """The arguments of :data:`.scripts.HAND_OUT` after the stream."""
        base = member_base(self.channel_prefix)
        marks = str(marks_ms(self.config))
        return (CONSUMER_GROUP, payload, str(receivers), str(STREAM_MAXLEN), base, marks, replaces)

    def open_transport(self) -> RedisTransport:
        return RedisTransport(self)

    # -- introspection and lifecycle -----------------------------------------------

    def subscriber_counts(self, channels: Collection[str]) -> dict[str, int]:
        names = list(channels)
        if not names:
            return {}
        wires = [self.wire_name(channel) for channel in names]
        try:
            reply = self.clients().publisher.pubsub_numsub(*wires)
        except redis.RedisError as exc:
            raise PubSubError(
                f"redis backend could not count subscribers on {self.where()}: "
                f"{explain(exc, self.channel_prefix)}"
            ) from exc
        counts = {
            (wire.decode("utf-8", "replace") if isinstance(wire, bytes) else str(wire)): int(n)
            for wire, n in reply
        }
        return {name: counts.get(wire, 0) for name, wire in zip(names, wires, strict=True)}

    def describe(self) -> dict[str, Any]:
        target = self.target
        info = super().describe()
        info.update(
            url=hide_password(target.url),
            url_from=target.source,
            channel_prefix=self.channel_prefix,
            tls=target.tls,
            parser="hiredis" if HIREDIS_AVAILABLE else "python",
            redis_py=redis.__version__,
        )
        if target.sentinels:
            info["sentinels"] = [f"{host}:{port}" for host, port in target.sentinels]
            info["service_name"] = target.service_name
        warnings = []
        if target.db and not self.channel_prefix:
            warnings.append(
                f"The URL names database {target.db}, but Redis pub/sub ignores database "
                "numbers: every install on this server shares the channels. Set "
                "PUBSUB_CHANNEL_PREFIX to keep installs apart."
            )
        info["warnings"] = warnings
        return info

    def close(self) -> None:
        super().close()
        self._clients.close()


def _parse_sentinel_url(url: str, source: str, *, tls: bool) -> _Target:
    rest = url.partition("://")[2]
    netloc, _, path = rest.partition("/")
    if "?" in path or "#" in path:
        raise ValueError("a sentinel URL takes no query; use PUBSUB_OPTIONS")
    userinfo, _, hosts = netloc.rpartition("@")
    kwargs: dict[str, Any] = {}
    if userinfo:
        username, _, password = userinfo.partition(":")
        if username:
            kwargs["username"] = unquote(username)
        if password:
            kwargs["password"] = unquote(password)
    sentinels = [_host_port(item) for item in hosts.split(",") if item]
    service = unquote(path.strip("/"))
    if not sentinels or not service or "/" in service:
        raise ValueError(
            "expected redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name"
        )
    return _Target(url, source, kwargs, tls, sentinels=sentinels, service_name=service)


def _host_port(item: str) -> tuple[str, int]:
    if item.startswith("["):
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.partition(":")
    if not host:
        raise ValueError(f"a sentinel address {item!r} has no host")
    try:
        return unquote(host), int(port) if port else SENTINEL_PORT
    except ValueError:
        raise ValueError(f"a sentinel address {item!r} has an invalid port") from None
