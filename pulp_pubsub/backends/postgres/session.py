"""libpq sessions driven through non-blocking calls, every wait with a deadline.

psycopg's ``execute()`` waits for the server without any bound, so a frozen
server (or a silent network) would hang it forever; the PostgreSQL backend's
own connections (listener, publisher, introspection) go through this instead.
"""

from __future__ import annotations

import re
import select
import time
from collections.abc import Sequence
from typing import Any

# Imported only by the postgres backend, which has already turned a missing
# psycopg into the error that names the pip extra.
import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from ...exceptions import ConnectionLost, PubSubError
from ..lookup import LookupTimeout, is_address, lookup
from ..perprocess import Origin

# Up to the last '@': a password with an unquoted '@' must not leave its tail behind.
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)\S*@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_OK = (
    pq.ExecStatus.COMMAND_OK,
    pq.ExecStatus.TUPLES_OK,
    pq.ExecStatus.PIPELINE_SYNC,
    pq.ExecStatus.EMPTY_QUERY,
)
#: libpq's pipeline mode (a bare Sync as the probe) needs libpq 14.
PIPELINE_LIBPQ = 140000


def has_pipeline() -> bool:
    """Whether the libpq psycopg runs on has pipeline mode (see checks.W010)."""
    return pq.version() >= PIPELINE_LIBPQ and pq.__build_version__ >= PIPELINE_LIBPQ


def scrub(text: object, secret: str | None = None) -> str:
    """``text`` without the password of a URL or conninfo string in it."""
    out = str(text)
    if secret and len(secret) >= 4:
        out = out.replace(secret, "***")
    out = _URL_PASSWORD.sub(r"\1***@", out)
    return _KEYWORD_PASSWORD.sub(r"\1***", out)


class Timeout(ConnectionLost):
    """The server did not answer in time: it may be frozen, so never retry at once."""


class ServerError(PubSubError):
    """The server answered with an error: the connection itself is fine."""


class Session:
    """One autocommit connection whose every wait for the server has a deadline."""

    def __init__(self, params: dict[str, Any], secret: str | None, deadline: float) -> None:
        self.secret = secret
        try:
            self.conn = connect_by(params, deadline)
        except psycopg.Error as exc:
            raise ConnectionLost(f"could not connect: {scrub(exc, secret)}") from None
        self.pgconn = self.conn.pgconn
        self.origin = Origin()
        # A command, or a pipeline Sync, is in flight.
        self.busy = False
        # In pipeline mode, waiting for the answer to a Sync.
        self.syncing = False
        # Results of a command finished early to make way for the next one.
        self.held: list[pq.abc.PGresult] = []

    def _settle(self, deadline: float) -> None:
        """Finish the command in flight, keeping its results for :meth:`collect`.

        libpq runs one command at a time; its results (errors too) are not
        the next command's, and not to be dropped either.
        """
        if self.busy:
            self.held.extend(self.results(deadline))

    def send(self, query: bytes, params: Sequence[bytes] | None, deadline: float) -> None:
        self._settle(deadline)
        if params is None:
            self.pgconn.send_query(query)
        else:
            self.pgconn.send_query_params(query, list(params))
        self.busy = True
        self._flush(deadline)

    def sync(self, deadline: float, query: bytes | None = None) -> None:
        """Send a protocol Sync in pipeline mode, after ``query`` if given.

        With no query, a Sync starts no transaction on the server, which just
        answers ReadyForQuery: a PIPELINE_SYNC result, a round trip of this
        very session that costs the server nothing. Without pipeline mode
        (libpq before 14) an empty query takes its place: EMPTY_QUERY, then
        ReadyForQuery, with no statement run either.
        """
        self._settle(deadline)
        if not has_pipeline():
            self.pgconn.send_query(b"")
            self.busy = True
            self._flush(deadline)
            return
        self.pgconn.enter_pipeline_mode()
        try:
            if query is not None:
                self.pgconn.send_query_params(query, None)
            self.pgconn.pipeline_sync()
        except BaseException:
            if not self.busy:
                self.pgconn.exit_pipeline_mode()
            raise
        self.busy = self.syncing = True
        self._flush(deadline)

    def _flush(self, deadline: float) -> None:
        while self.pgconn.flush():
            self._wait(deadline, write=True)

    def collect(self) -> list[pq.abc.PGresult]:
        """Results held back by :meth:`_settle`, then those that have arrived."""
        out, self.held = self.held, []
        out.extend(self.results(None))
        return out

    def results(self, deadline: float | None) -> list[pq.abc.PGresult]:
        """The results of the command in flight; with no deadline, only what has arrived."""
        out: list[pq.abc.PGresult] = []
        while self.busy:
            while self.pgconn.is_busy():
                if deadline is None:
                    return out
                self._wait(deadline)
                self.pgconn.consume_input()
            result = self.pgconn.get_result()
            if result is None:
                if not self.syncing:
                    self.busy = False
                elif self.pgconn.status != pq.ConnStatus.OK:
                    raise psycopg.OperationalError("the connection to PostgreSQL is gone")
                # In a pipeline a None only ends one query's results.
                continue
            out.append(result)
            if result.status == pq.ExecStatus.PIPELINE_SYNC:
                self.pgconn.exit_pipeline_mode()
                self.busy = self.syncing = False
        return out

    def run(self, query: bytes, params: Sequence[bytes] | None, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        self.send(query, params, deadline)
        return check(self.results(deadline))

    def _wait(self, deadline: float, write: bool = False) -> None:
        left = deadline - time.monotonic()
        if left > 0:
            poller = select.poll()
            poller.register(self.pgconn.socket, select.POLLOUT if write else select.POLLIN)
            if poller.poll(left * 1000):
                return
        raise Timeout("the server did not answer in time")

    def close(self) -> None:
        # A connection inherited through fork() is the parent's: never touch it.
        if self.origin.here():
            self.conn.close()


def run_on(
    pgconn: pq.abc.PGconn, query: bytes, params: Sequence[bytes], deadline: float
) -> list[Any]:
    """Run one query on a connection that is not ours (Django's), giving up at ``deadline``.

    psycopg's ``execute()`` would wait for a frozen server for ever: TCP settings
    (``tcp_user_timeout``, keepalives) cannot help, as a stopped server's kernel still
    acknowledges every byte. On :class:`Timeout` the query is still in flight and the
    connection unusable: the caller must close it.
    """
    pgconn.send_query_params(query, list(params))
    while pgconn.flush():
        _wait_socket(pgconn.socket, deadline, write=True)
    out: list[Any] = []
    while True:
        while pgconn.is_busy():
            _wait_socket(pgconn.socket, deadline)
            pgconn.consume_input()
        result = pgconn.get_result()
        if result is None:
            return out
        out.append(result)


def _wait_socket(socket: int, deadline: float, write: bool = False) -> None:
    left = deadline - time.monotonic()
    if left > 0:
        poller = select.poll()
        poller.register(socket, select.POLLOUT if write else select.POLLIN)
        if poller.poll(left * 1000):
            return
    raise Timeout("the server did not answer in time")


def connect_by(params: dict[str, Any], deadline: float) -> psycopg.Connection[Any]:
    """``psycopg.connect()`` that gives up at ``deadline``, the host name lookup included.

    libpq's own ``connect_timeout`` counts whole seconds, at least 2, and does not cover its
    lookup: a connect to a frozen server, or through a silent resolver, would outlast a
    shorter ``publish_timeout`` or ``connect_timeout``.
    """
    params = _with_addresses(params, deadline)
    pgconn = pq.PGconn.connect_start(make_conninfo("", **params).encode())
    try:
        while (status := pgconn.connect_poll()) != pq.PollingStatus.OK:
            if status == pq.PollingStatus.FAILED:
                raise psycopg.OperationalError(pgconn.get_error_message())
            left = deadline - time.monotonic()
            poller = select.poll()
            writing = status == pq.PollingStatus.WRITING
            poller.register(pgconn.socket, select.POLLOUT if writing else select.POLLIN)
            if left <= 0 or not poller.poll(left * 1000):
                raise Timeout("the server did not answer the connection in time")
    except BaseException:
        pgconn.finish()
        raise
    conn = psycopg.Connection(pgconn)
    conn.autocommit = True
    return conn


def _with_addresses(params: dict[str, Any], deadline: float) -> dict[str, Any]:
    """``params`` with the host's addresses as ``hostaddr``, looked up before ``deadline``.

    libpq looks a host name up inside ``connect_start()``, for as long as the
    resolver takes. Given ``hostaddr`` it connects there and keeps ``host`` for
    TLS and its password file. A name the resolver refuses is left to libpq,
    whose error says so.
    """
    host = str(params.get("host") or "")
    if (
        not host
        or params.get("hostaddr")
        or "," in host
        or host.startswith("/")
        or is_address(host)
    ):
        return params  # none, several, given, a unix socket or an address: nothing to look up
    try:
        infos = lookup(host, None, deadline - time.monotonic())
    except LookupTimeout as exc:
        raise Timeout(str(exc)) from None
    except OSError:
        return params
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    return {**params, "host": ",".join([host] * len(addresses)), "hostaddr": ",".join(addresses)}


def check(results: list[pq.abc.PGresult]) -> list[pq.abc.PGresult]:
    for result in results:
        if result.status not in _OK:
            message = result.error_message.decode("utf-8", "replace").strip()
            raise ServerError(message or f"the server answered {pq.ExecStatus(result.status).name}")
    return results


def text(value: bytes | None) -> str:
    # The connection's client_encoding is UTF8; "replace" keeps one odd byte
    # from a SQL_ASCII database from killing the connection over and over.
    return (value or b"").decode("utf-8", "replace")
