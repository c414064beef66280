"""No command output and no log line shows a configured password; no name or payload is SQL.

The password checks run every command against a throwaway server that has a password, in
every state an operator meets (working, wrong password, down, frozen), and scan everything
that was captured: the command's stdout and stderr, its ``CommandError`` with the whole chain
of causes, every log record at DEBUG, and whatever reached the process's real descriptors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import traceback
import urllib.parse
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import connections, transaction
from django.test import override_settings

from demo.models import Event
from pulp_pubsub import get_backend, publish
from pulp_pubsub_tools.testing import EtcdServer, NatsServer, PostgresServer, RedisServer

from .conftest import CONTRACT_BACKENDS
from .reliability_util import FAST, Inbox, dead_url

# '/', '@' and ':' must be quoted in a URL. The scan looks for the password in both
# spellings and for each piece between those characters, so that a URL parser that stops
# at one of them cannot leak the rest unnoticed.
PASSWORD = "Zq8vKm/Xw3jNp@Lp7Hs:Rt9Yb"
WRONG_PASSWORD = "Gh4TnQ/Bv6Wq@Mk2Pc"
#: The relay's secrets (its token, the password of the PostgreSQL it NOTIFYs) are checked
#: in tests/test_relay.py, against relays of its own; natsjs is the nats backend again (with
#: JetStream): the same connection code and secrets.
SERVER_BACKENDS = [
    name for name in CONTRACT_BACKENDS if name in ("postgres", "redis", "etcd", "nats")
]
#: "unquoted": the operator pasted the password into the URL without quoting it.
#: "frozen" waits out every command's timeout: the long tier's.
STATES = [
    "working",
    "wrong password",
    "unquoted",
    "down",
    pytest.param("frozen", marks=pytest.mark.long),
]


def spellings(secret: str) -> list[str]:
    pieces = secret.replace("/", " ").replace("@", " ").replace(":", " ").split()
    return [secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret), *pieces]


@pytest.fixture(scope="module", params=SERVER_BACKENDS)
def secured(request) -> Iterator[Any]:
    launchers: dict[str, Any] = {
        "postgres": PostgresServer,
        "redis": RedisServer,
        "etcd": EtcdServer,
        "nats": lambda password: NatsServer(user="pulp", password=password),
    }
    server = launchers[request.param](password=PASSWORD)
    try:
        server.start()
        server.backend = request.param
        yield server
    finally:
        server.cleanup()


def settings_for(server: Any, state: str) -> dict[str, Any]:
    url, quoted = server.url, urllib.parse.quote(PASSWORD, safe="")
    if state == "wrong password":
        url = url.replace(quoted, urllib.parse.quote(WRONG_PASSWORD, safe=""))
    elif state == "unquoted":
        url = url.replace(quoted, PASSWORD)
    elif state == "down":
        url = dead_url(url)
    return {"PUBSUB_BACKEND": server.backend, "PUBSUB_URL": url, "PUBSUB_OPTIONS": FAST}


COMMANDS: list[tuple[str, ...]] = [
    ("pubsub_ping", "--timeout=3"),
    ("pubsub_publish", "demo_events", "hello"),
    ("pubsub_listen", "demo_events", "--timeout=1"),
    ("pubsub_channels",),
    ("pubsub_channels", "--json"),
]


def run_command(args: tuple[str, ...]) -> list[str]:
    """Everything the command said: its output, and its error with every cause."""
    out, err = io.StringIO(), io.StringIO()
    texts = []
    try:
        call_command(*args, stdout=out, stderr=err)
    except CommandError as exc:
        texts.append("".join(traceback.format_exception(exc)))
    texts += [out.getvalue(), err.getvalue()]
    return texts


@pytest.mark.backend
@pytest.mark.servers
@pytest.mark.parametrize("state", STATES)
def test_no_command_output_or_log_line_shows_the_password(secured, state, caplog, capfd):
    texts: list[str] = []
    with (
        override_settings(**settings_for(secured, state)),
        caplog.at_level(logging.DEBUG),
        contextlib.ExitStack() as stack,
    ):
        if state == "frozen":
            secured.freeze()
            stack.callback(secured.thaw)
        for args in COMMANDS:
            texts += run_command(args)
        try:
            backend = get_backend()
        except ImproperlyConfigured as exc:  # a URL that does not parse
            texts.append("".join(traceback.format_exception(exc)))
        else:
            # A subscriber that keeps failing logs its cause on every reconnect.
            with backend.subscriber() as sub:
                sub.subscribe("demo_events", lambda message: None)
                sub.wait_connected(2)
                texts += [repr(sub.last_error), repr(sub)]
            texts.append(repr(backend.describe()))
    captured = capfd.readouterr()
    texts += [caplog.text, captured.out, captured.err]
    texts += [record.getMessage() for record in caplog.records]
    # The etcd URL takes the credentials up to the last '@', so an unquoted password works.
    if state == "working" or (state == "unquoted" and secured.backend == "etcd"):
        assert "round trip" in "".join(texts), "the commands did not reach the server"
    else:
        assert any("Error" in text for text in texts), "the commands did not fail"
    configured = PASSWORD if state != "wrong password" else WRONG_PASSWORD
    secrets = spellings(configured) + spellings(PASSWORD)
    if state == "unquoted":
        # Up to its first '/', an unquoted password is, to every URL parser, the port of
        # host "postgres" (the user name): that piece is the URL's own structure, shown as
        # such. Every other piece must stay hidden.
        secrets = [secret for secret in secrets if secret != PASSWORD.split("/")[0]]
    leaks = [
        line
        for text in texts
        for line in text.splitlines()
        if any(secret in line for secret in secrets)
    ]
    assert leaks == []


# -- SQL ------------------------------------------------------------------------------------

SQL_PAYLOADS = [
    "'); DELETE FROM canary; --",
    "x'); DROP TABLE canary; --",
    "$$; DELETE FROM canary; $$",
    "\\'; DELETE FROM canary; --",
    "' OR '1'='1",
    "%s %(x)s {0} {} $1 ?",
    "E'\\x27'; DELETE FROM canary; --",
]
#: Names the shared rules accept that would break SQL built by string formatting.
SQL_NAMES = [
    "a$$b",
    "x--y",
    "q/*c*/r",
    "Robert)DROP_TABLE(canary",
    "%s",
    "{0}",
    "(a),b=c",
    "MiXeD_Case",
    "mixed_case",
    "pg_notify(x,y)",
    "U&d0061",
    "a$1",
    "'",
]


def sql_names() -> list[str]:
    from pulp_pubsub.validation import validate_channel

    accepted = []
    for name in SQL_NAMES:
        try:
            accepted.append(validate_channel(name))
        except ValueError:
            pass
    return accepted


def test_names_that_could_quote_out_or_comment_out_never_reach_the_server():
    # Quotes, ';' and '*' are refused by the shared rules; the rest go through as identifiers.
    assert set(SQL_NAMES) - set(sql_names()) == {"'", "q/*c*/r"}


@pytest.mark.backend
@pytest.mark.servers
def test_names_and_payloads_stay_data_on_postgres_own_connection():
    with PostgresServer(password=PASSWORD) as server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE canary (n int); INSERT INTO canary VALUES (1)")
        settings = {
            "PUBSUB_BACKEND": "postgres",
            "PUBSUB_URL": server.url,
            "PUBSUB_OPTIONS": FAST,
        }
        with override_settings(**settings):
            _round_trip_every_name_and_payload(get_backend())
        with psycopg.connect(server.url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM canary").fetchone() == (1,)
        with open(server.log_path, errors="replace") as log:
            assert [line for line in log if "ERROR:" in line] == []


@pytest.mark.backend
@pytest.mark.django_db(transaction=True, databases=["default", "postgres"])
def test_names_and_payloads_stay_data_on_djangos_connection():
    Event.objects.using("postgres").create(note="canary")
    options = {**FAST, "database": "postgres"}
    with override_settings(PUBSUB_BACKEND="postgres", PUBSUB_URL=None, PUBSUB_OPTIONS=options):
        backend = get_backend()
        assert backend.defers_natively
        _round_trip_every_name_and_payload(backend, atomic_using="postgres")
    assert list(Event.objects.using("postgres").values_list("note", flat=True)) == ["canary"]
    assert connections["postgres"].introspection.table_names()  # the table is still there


def _round_trip_every_name_and_payload(backend: Any, atomic_using: str | None = None) -> None:
    names = sql_names()
    with backend.subscriber() as sub:
        inbox = Inbox(sub)
        for name in names:
            sub.subscribe(name, inbox)
        expected = []
        for name in names:
            for payload in SQL_PAYLOADS:
                expected.append((name, payload))
                if atomic_using is None:
                    backend.publish(name, payload)
                else:
                    with transaction.atomic(using=atomic_using):
                        publish(name, payload)
        inbox.wait(lambda messages: len(messages) >= len(expected))
        got = [(m.channel, m.payload) for m in inbox.messages]
        assert sorted(got) == sorted(expected)
        assert sub.stats["reconnects"] == 0, sub.last_error
    backend.close()
