"""PostgreSQL LISTEN/NOTIFY, wire-compatible with Pulp's own.

A publish is ``SELECT pg_notify(channel, payload)`` on Django's connection of
the calling thread, so PostgreSQL itself holds it back until the transaction
commits and drops it on rollback, exactly as Pulp's hand-written code does;
a stock Pulp process and this layer therefore see each other's messages.
Each subscriber LISTENs on a dedicated autocommit connection of its own,
never on Django's, so an ORM query can never swallow a notification.

Every connection the backend opens itself goes through
:mod:`pulp_pubsub.backends.postgres.session`, where each wait has a deadline.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Collection
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections

from ...conf import Secret
from ...exceptions import ConnectionLost, MissingDependency, PublishError, PubSubError
from ..base import BaseBackend, Transport
from ..perprocess import PerProcess

try:
    import psycopg
    from psycopg import pq, sql
    from psycopg.conninfo import conninfo_to_dict
except ImportError as exc:
    raise MissingDependency("postgres", "postgres", exc) from exc

from .session import ServerError, Session, Timeout, check, has_pipeline, run_on, scrub, text

logger = logging.getLogger(__name__)

PUBLISHER_NAME = "pulp-pubsub publisher"
HEAR_NAME = "pulp-pubsub hear check"
ADMIN_NAME = "pulp-pubsub admin"
NOTIFY = "SELECT pg_notify(%s, %s)"
NOTIFY_BOUND = b"SELECT pg_notify($1, $2)"
#: With the ``queue_check_interval`` option, a probe now and then also reads
#: how full the server's notification queue is (a read-only transaction).
QUEUE_USAGE = b"SELECT pg_notification_queue_usage()"
COUNT = (
    b"SELECT (SELECT count(*) FROM pg_stat_activity"
    b" WHERE datname = current_database() AND application_name = $1),"
    b" pg_notification_queue_usage()"
)
QUEUE_WARNING = 0.5
#: Keys of Django's connection parameters that are psycopg's, not libpq's.
_PYTHON_ONLY = ("cursor_factory", "context", "prepare_threshold", "row_factory", "autocommit")


def _begin_statement(raw: Any) -> bytes:
    """The BEGIN psycopg would send on ``raw``, with its transaction characteristics."""
    words = ["BEGIN"]
    if raw.isolation_level is not None:
        words.append("ISOLATION LEVEL " + raw.isolation_level.name.replace("_", " "))
    if raw.read_only is not None:
        words.append("READ ONLY" if raw.read_only else "READ WRITE")
    if raw.deferrable is not None:
        words.append("DEFERRABLE" if raw.deferrable else "NOT DEFERRABLE")
    return " ".join(words).encode()


def _notify_on(connection: Any, channel: str, payload: str, timeout: float) -> None:
    """NOTIFY on Django's ``connection``: its session, in its transaction if any.

    Straight through the underlying libpq connection, with the checks that Django's cursor
    makes, and with a deadline: a frozen server makes this raise :class:`Timeout` after
    ``timeout`` seconds, with the connection closed (its transaction, if any, is lost; the
    server could not have committed it either). Django's cursor, which waits without a
    bound, is used only when it has work to do: execute wrappers to run, or queries to log
    (``DEBUG``).
    """
    if connection.execute_wrappers or connection.queries_logged:
        with connection.cursor() as cursor:
            cursor.execute(NOTIFY, [channel, payload])
        return
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    connection.validate_thread_sharing()
    connection.validate_no_broken_transaction()
    raw = connection.connection
    deadline = time.monotonic() + timeout
    with connection.wrap_database_errors:
        if not raw.lock.acquire(timeout=max(0.0, timeout)):
            raise Timeout("another thread holds this connection")
        try:
            if not raw.autocommit and raw.pgconn.transaction_status == pq.TransactionStatus.IDLE:
                # Inside atomic() with nothing run yet: psycopg sends its BEGIN lazily,
                # before its own first query, and this one bypasses it. Without it the
                # NOTIFY would go out at once and survive a rollback.
                check(run_on(raw.pgconn, _begin_statement(raw), [], deadline))
            results = run_on(
                raw.pgconn, NOTIFY_BOUND, [channel.encode(), payload.encode()], deadline
            )
        except Timeout:
            raw.lock.release()
            connection.close()
            raise
        except ServerError as exc:
            raw.lock.release()
            raise DatabaseError(str(exc)) from None
        except BaseException:
            raw.lock.release()
            raise
        raw.lock.release()
    try:
        check(results)
    except ServerError as exc:
        raise DatabaseError(str(exc)) from None


class PostgresTransport(Transport):
    backend: PostgresBackend

    def __init__(self, backend: PostgresBackend) -> None:
        super().__init__(backend)
        self._session = Session(
            backend.connection_params(backend.listener_name),
            backend.secret,
            time.monotonic() + backend.config["connect_timeout"],
        )
        # The (channel, token) of each probe whose Sync is unanswered, oldest first.
        self._probes: deque[tuple[str, str]] = deque()
        # read() takes every notification libpq has; over TLS, libpq may leave decrypted
        # bytes in OpenSSL that the socket does not show, so there it reads once more.
        self.drained = not self._session.pgconn.ssl_in_use
        self._queue_check_at = time.monotonic()

    def fileno(self) -> int:
        return self._session.pgconn.socket

    def listen(self, channels: Collection[str]) -> None:
        self._command("LISTEN", channels)

    def unlisten(self, channels: Collection[str]) -> None:
        self._command("UNLISTEN", channels)

    def _command(self, verb: str, channels: Collection[str]) -> None:
        # Identifiers, never text: names are case-sensitive and cannot inject.
        query = sql.SQL("; ").join(
            sql.SQL(verb + " {}").format(sql.Identifier(channel)) for channel in channels
        )
        try:
            self._session.run(
                query.as_bytes(self._session.conn), None, self.backend.config["connect_timeout"]
            )
        except psycopg.Error as exc:
            raise ConnectionLost(f"{verb} failed: {scrub(exc, self.backend.secret)}") from None

    def read(self) -> list[tuple[str, str]]:
        pgconn = self._session.pgconn
        try:
            pgconn.consume_input()
            results = self._session.collect()
        except psycopg.Error as exc:
            raise ConnectionLost(scrub(exc, self.backend.secret).strip()) from None
        items = []
        for result in check(results):
            if result.status in (pq.ExecStatus.PIPELINE_SYNC, pq.ExecStatus.EMPTY_QUERY):
                # The server answered a probe: hand the listener its token back.
                if self._probes:
                    items.append(self._probes.popleft())
            elif (
                result.status == pq.ExecStatus.TUPLES_OK
                and result.ntuples
                and result.fname(0) == b"pg_notification_queue_usage"
            ):
                self.backend.observe_queue_usage(float(text(result.get_value(0, 0)) or 0))
        while (notify := pgconn.notifies()) is not None:
            items.append((text(notify.relname), text(notify.extra)))
        if pgconn.status != pq.ConnStatus.OK:
            raise ConnectionLost("the connection to PostgreSQL is gone")
        return items

    def probe(self, channel: str, payload: str) -> None:
        # A round trip of this very session, so it proves that this connection,
        # not another one, still works. No NOTIFY: PostgreSQL wakes every
        # listening session of the database on each one, so N subscribers
        # probing that way would cost the server N² transactions per interval.
        # A bare Sync costs none; the queue usage is read only when asked for.
        now = time.monotonic()
        query = None
        interval = self.backend.config["queue_check_interval"]
        # Without pipeline mode the probe is an empty query, which cannot carry this one.
        if interval and now >= self._queue_check_at and has_pipeline():
            query, self._queue_check_at = QUEUE_USAGE, now + interval
        try:
            self._session.sync(now + self.backend.config["probe_timeout"], query)
        except psycopg.Error as exc:
            raise ConnectionLost(f"probe failed: {scrub(exc, self.backend.secret)}") from None
        self._probes.append((channel, payload))

    def hear_interval(self) -> float | None:
        # The probe above is a Sync of this very session: it proves the session is alive,
        # not that it hears. Behind a transaction pooler (PgBouncer in transaction mode)
        # the LISTEN lands on whichever server connection the pooler lends, which goes back
        # to the pool at once: notifications for it are never passed on.
        interval = self.backend.config["hear_interval"]
        return math.inf if interval is None else float(interval)

    def hear(self, channel: str, payload: str) -> None:
        # From a short connection of its own, to where Django's connection goes, as any
        # publisher's NOTIFY would travel. Never on this session: PostgreSQL delivers a
        # session's own NOTIFY to itself at commit, and a pooler passes that answer on, so a
        # deaf session would hear its own message and nothing else.
        timeout = self.backend.config["connect_timeout"]
        deadline = time.monotonic() + timeout
        session = None
        try:
            session = Session(
                self.backend.connection_params(HEAR_NAME), self.backend.secret, deadline
            )
            session.run(
                NOTIFY_BOUND, [channel.encode(), payload.encode()], deadline - time.monotonic()
            )
        except (PubSubError, psycopg.Error) as exc:
            raise ConnectionLost(f"hear check failed: {scrub(exc, self.backend.secret)}") from None
        finally:
            if session is not None:
                session.close()

    def deaf(self, timeout: float) -> str:
        where = (
            "PUBSUB_URL"
            if self.backend.url
            else f"Django's database {self.backend.database_alias!r}"
        )
        return (
            f"The PostgreSQL subscriber is deaf: its LISTEN session did not hear a NOTIFY sent "
            f"to it within {timeout:g} s. The connection ({where}) most likely goes through a "
            "transaction pooler (PgBouncer in transaction pooling mode, RDS Proxy and the "
            "like), which cannot carry LISTEN. Set PUBSUB_URL to a direct connection to the "
            "PostgreSQL server, not through the pooler (or use another PUBSUB_BACKEND)."
        )

    def send_from_listener(self, channel: str, payload: str) -> None:
        # A real NOTIFY (an introspection answer), sent without waiting: read()
        # checks its result when it arrives.
        deadline = time.monotonic() + self.backend.config["publish_timeout"]
        try:
            self._session.send(NOTIFY_BOUND, [channel.encode(), payload.encode()], deadline)
        except psycopg.Error as exc:
            raise ConnectionLost(f"send failed: {scrub(exc, self.backend.secret)}") from None

    def close(self) -> None:
        self._session.close()


class _OwnSession:
    """This process's publishing session, and the lock that gives it to one publish at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.session: Session | None = None

    def drop(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.close()

    def close(self) -> None:
        with self.lock:
            self.drop()


class PostgresBackend(BaseBackend):
    """LISTEN/NOTIFY on PostgreSQL: Django's database, or the server of ``PUBSUB_URL``."""

    name = "postgres"
    payload_limit = 7999  # PostgreSQL's own: "payload string too long" from 8000 bytes
    allows_nul = False
    options = {
        # The Django database alias whose connection publish() uses (and whose
        # transactions it follows), and whose settings the listener copies.
        "database": "default",
        # Marks listener sessions, so pg_stat_activity can count them.
        "application_name": "pulp-pubsub listener",
        # TCP keepalives and TCP_USER_TIMEOUT (seconds) on the layer's own
        # connections; libpq ignores what the platform lacks.
        "keepalives": True,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 30.0,
        # Seconds between a subscriber's reads of the notification queue usage
        # (logged when over half full); None: never, so idle subscribers cost
        # the database no transactions. pubsub_channels reads it regardless.
        "queue_check_interval": None,
        # Seconds between a subscriber's hear checks (a NOTIFY to itself from another
        # connection, proving its LISTEN session hears); one also follows every LISTEN.
        # Rare, as each NOTIFY wakes every listening session; None: only after a LISTEN.
        "hear_interval": 600.0,
    }

    def __init__(
        self,
        url: str | None = None,
        options: dict[str, Any] | None = None,
        channel_prefix: str = "",
        publish_on_commit: bool = True,
    ) -> None:
        super().__init__(url, options, channel_prefix, publish_on_commit)
        self.database_alias = self._check_alias(self.config["database"])
        self.listener_name = self._check_application_name(self.config["application_name"])
        for option in ("queue_check_interval", "hear_interval"):
            interval = self.config[option]
            if interval is not None and (
                isinstance(interval, bool)
                or not isinstance(interval, (int, float))
                or interval <= 0
            ):
                raise ImproperlyConfigured(
                    f"Option {option!r} for PostgresBackend must be a positive number "
                    f"of seconds or None, not {interval!r}."
                )
        # PostgreSQL defers a NOTIFY to commit only on the transaction's own
        # connection; a PUBSUB_URL server publishes on a connection of ours.
        self.defers_natively = url is None
        secret = self._check_url()
        self.secret = None if secret is None else Secret(secret)
        self.queue_usage: float | None = None
        self._queue_warned = False
        # Forked: the parent's connection (and a lock some parent thread may
        # have held) stay the parent's.
        self._publishing: PerProcess[_OwnSession] = PerProcess(_OwnSession, _OwnSession.close)

    # -- configuration -------------------------------------------------------

    def _check_alias(self, alias: object) -> str:
        if not isinstance(alias, str) or alias not in connections.settings:
            raise ImproperlyConfigured(
                f"Option 'database' for PostgresBackend must name an alias of DATABASES "
                f"({', '.join(connections.settings)}), not {alias!r}."
            )
        if self.url is None and connections[alias].vendor != "postgresql":
            raise ImproperlyConfigured(
                f"PostgresBackend publishes on Django's database {alias!r}, which is "
                f"{connections[alias].vendor}, not PostgreSQL. Point PUBSUB_OPTIONS['database'] "
                "at a PostgreSQL alias, or PUBSUB_URL at a PostgreSQL server."
            )
        return alias

    @staticmethod
    def _check_application_name(name: object) -> str:
        if not (isinstance(name, str) and name.isascii() and name.isprintable()) or not (
            0 < len(name) < 64
        ):
            raise ImproperlyConfigured(
                "Option 'application_name' for PostgresBackend must be 1 to 63 printable "
                f"ASCII characters, not {name!r}."
            )
        return name

    def _check_url(self) -> str | None:
        """Check PUBSUB_URL; return the password that messages must never show."""
        if self.url is None:
            return connections.settings[self.database_alias].get("PASSWORD") or None
        try:
            params = conninfo_to_dict(self.url)
        except psycopg.Error:
            raise ImproperlyConfigured(
                f"PUBSUB_URL {scrub(self.url)!r} is neither a postgresql:// URL nor a libpq "
                "connection string."
            ) from None
        authority, _, after = self.url.partition("://")[2].partition("/")
        if authority.count("@") > 1 or ("@" in after.partition("?")[0] and "@" not in authority):
            # An unquoted '/' or '@' in the password ends it early for libpq, which would
            # take the rest for a host, port or database name, and show it as one.
            raise ImproperlyConfigured(
                f"PUBSUB_URL {scrub(self.url)!r} looks like a password or user name with an "
                "unquoted '/' or '@' in it: percent-encode them ('/' as %2F, '@' as %40)."
            )
        password = params.get("password")
        return str(password) if password else None

    def connection_params(self, application_name: str) -> dict[str, Any]:
        """libpq parameters of a connection of the layer's own (listener, publisher)."""
        if self.url is not None:
            params: dict[str, Any] = dict(conninfo_to_dict(self.url))
        else:
            # A fresh wrapper only to read settings: it never connects, and the
            # thread's own Django connection is left alone.
            wrapper = connections.create_connection(self.database_alias)
            params = dict(wrapper.get_connection_params())
            for key in _PYTHON_ONLY:
                params.pop(key, None)
        cfg = self.config
        params["application_name"] = application_name
        params["client_encoding"] = "UTF8"
        # libpq counts whole seconds and psycopg enforces at least 2.
        params["connect_timeout"] = max(2, math.ceil(cfg["connect_timeout"]))
        if cfg["keepalives"]:
            for key in ("keepalives_idle", "keepalives_interval", "keepalives_count"):
                params[key] = max(1, math.ceil(cfg[key]))
            params["keepalives"] = 1
            params["tcp_user_timeout"] = max(1, math.ceil(cfg["tcp_user_timeout"] * 1000))
        else:
            params["keepalives"] = 0
        return params

    # -- publishing ----------------------------------------------------------

    def send(self, channel: str, payload: str) -> None:
        if self.url is None and (self.publish_on_commit or not self.in_atomic_block()):
            self._send_on_django(channel, payload)
        else:
            # PUBSUB_URL, or PUBSUB_PUBLISH_ON_COMMIT=False inside atomic(): a
            # NOTIFY on Django's connection would wait for the commit.
            self._send_on_own(channel, payload)

    def _send_on_django(self, channel: str, payload: str) -> None:
        connection = connections[self.database_alias]
        had_connection = connection.connection is not None
        timeout = self.config["publish_timeout"]
        started = time.monotonic()
        try:
            _notify_on(connection, channel, payload, timeout)
            return
        except Timeout as exc:
            raise PublishError(self._failure(channel, exc)) from None
        except DatabaseError as exc:
            raw = connection.connection
            dead = raw is None or raw.closed or getattr(raw, "broken", False)
            if connection.in_atomic_block or not (had_connection and dead):
                raise PublishError(self._failure(channel, exc)) from exc
        # The connection had died while idle (a server restart, an idle
        # timeout). Outside a transaction a fresh one loses nothing.
        connection.close()
        try:
            _notify_on(connection, channel, payload, timeout - (time.monotonic() - started))
        except Timeout as exc:
            raise PublishError(self._failure(channel, exc)) from None
        except DatabaseError as exc:
            raise PublishError(self._failure(channel, exc)) from exc

    def _send_on_own(self, channel: str, payload: str) -> None:
        timeout = self.config["publish_timeout"]
        deadline = time.monotonic() + timeout
        own = self._publishing.get()
        if not own.lock.acquire(timeout=timeout):
            raise PublishError(
                f"postgres backend could not publish to {channel!r}: another publish has held "
                f"this process's connection for over {timeout} s."
            )
        try:
            while True:
                session, reused = own.session, own.session is not None
                try:
                    if session is None:
                        session = own.session = Session(
                            self.connection_params(PUBLISHER_NAME), self.secret, deadline
                        )
                    session.run(
                        NOTIFY_BOUND,
                        [channel.encode(), payload.encode()],
                        deadline - time.monotonic(),
                    )
                    return
                except ServerError as exc:
                    raise PublishError(self._failure(channel, exc)) from None
                except (ConnectionLost, psycopg.Error) as exc:
                    own.drop()
                    if not (reused and time.monotonic() < deadline) or isinstance(exc, Timeout):
                        raise PublishError(self._failure(channel, exc)) from None
                    # The cached connection had died while idle: one fresh try.
        finally:
            own.lock.release()

    def _failure(self, channel: str, exc: BaseException) -> str:
        lines = scrub(exc, self.secret).strip().splitlines()
        cause = lines[0] if lines else type(exc).__name__
        return f"postgres backend could not publish to {channel!r}: {cause}"

    # -- subscribing ---------------------------------------------------------

    def open_transport(self) -> PostgresTransport:
        return PostgresTransport(self)

    def observe_queue_usage(self, usage: float) -> None:
        self.queue_usage = usage
        full = usage > QUEUE_WARNING
        if full and not self._queue_warned:
            logger.warning(
                "PostgreSQL's notification queue is %.0f%% full. A session that LISTENs and "
                "then stays in one transaction holds it back; when it is full, every commit "
                "that sends NOTIFY fails.",
                usage * 100,
            )
        self._queue_warned = full

    # -- introspection and lifecycle -----------------------------------------

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["url"] = scrub(self.url, self.secret) if self.url else None
        info["database"] = self.database_alias
        info["publishes_on"] = (
            f"Django's connection {self.database_alias!r}; PostgreSQL sends at commit"
            if self.defers_natively
            else "a connection of the layer's own, after commit of "
            f"{self.database_alias!r} transactions"
        )
        info["listener_application_name"] = self.listener_name
        info["listeners"] = None
        info["notification_queue_usage"] = None
        warnings: list[str] = []
        try:
            params = self.connection_params(ADMIN_NAME)
            info["server"] = f"{params.get('host', '')}:{params.get('port', '')}"
            info["dbname"] = params.get("dbname")
            deadline = time.monotonic() + self.config["connect_timeout"]
            session = Session(params, self.secret, deadline)
            try:
                [result] = session.run(
                    COUNT, [self.listener_name.encode()], self.config["publish_timeout"]
                )
            finally:
                session.close()
            info["listeners"] = int(text(result.get_value(0, 0)))
            info["notification_queue_usage"] = usage = float(text(result.get_value(0, 1)))
            info["listeners_note"] = (
                "PostgreSQL cannot tell which channels a session listens on: this counts the "
                f"sessions of this database named {self.listener_name!r}, one per subscriber."
            )
            if usage > QUEUE_WARNING:
                warnings.append(
                    f"The notification queue is {usage:.0%} full: look for a listening session "
                    "stuck in a long transaction; a full queue makes every NOTIFY fail."
                )
        except (PubSubError, psycopg.Error) as exc:
            warnings.append(f"Could not query the server: {scrub(exc, self.secret)}")
        info["warnings"] = warnings
        return info

    def deaf_hint(self) -> str:
        if self.url is not None:
            return ""
        return (
            " If Django's database connection goes through a transaction pooler (PgBouncer in "
            "transaction pooling mode, RDS Proxy), LISTEN cannot work through it: set "
            "PUBSUB_URL to a direct connection to the PostgreSQL server."
        )

    def subscriber_counts(self, channels: Collection[str]) -> dict[str, int] | None:
        """PostgreSQL cannot tell per channel; describe() has the listener total."""
        return None

    def close(self) -> None:
        super().close()
        self._publishing.close()
