"""No object of the layer shows a password in its repr() or str().

Looked at the way an attacker who gets a traceback with locals, a debugger
session, a Sentry event or Django's technical 500 page would: every object
the layer keeps is reached from the backend (settings, backend, targets,
clients, transports, subscribers, sessions, control clients), and each is
rendered with repr() and str(), and each of its attributes with repr(), and
the password is searched for in every spelling.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from django.test import override_settings
from django.views.debug import SafeExceptionReporterFilter

from pulp_pubsub import get_backend
from pulp_pubsub.conf import Options, Secret, SecretURL, get_settings
from pulp_pubsub.management.inspect import ControlClient
from pulp_pubsub_tools.testing import EtcdServer, NatsServer, PostgresServer, RedisServer

from .reliability_util import FAST
from .test_security import spellings

PASSWORD = "Qm4/Vx9@Kw2:Lp8Zt"
SENTINEL_PASSWORD = "Sn7/Hy3@Pd6:Fj1"
QUOTED = urllib.parse.quote(PASSWORD, safe="")


def renderings(root: Any) -> Iterator[tuple[str, str]]:
    """(where, text) for every rendering of every layer object reachable from ``root``."""
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("root", root)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield path, repr(obj)
        if isinstance(obj, (str, bytes, int, float, type(None))):
            continue
        if isinstance(obj, dict):
            stack += [(f"{path}[{k!r}]", v) for k, v in obj.items()]
            continue
        if isinstance(obj, (list, tuple, set, frozenset)):
            stack += [(f"{path}[]", v) for v in obj]
            continue
        if not type(obj).__module__.startswith("pulp_pubsub"):
            continue  # a client library's object: its repr() above is what shows
        yield f"str({path})", str(obj)
        attributes = dict(getattr(obj, "__dict__", {}))
        for name in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, name):
                attributes[name] = getattr(obj, name)
        for name, value in attributes.items():
            if name == "backend" and path != "root":
                continue  # reached from the root already
            if hasattr(value, "__iter__") and type(value).__name__ == "WeakSet":
                value = list(value)
            stack.append((f"{path}.{name}", value))


def leaks(objects: list[Any], secrets: list[str]) -> list[str]:
    found = []
    for obj in objects:
        for where, text in renderings(obj):
            if any(secret in text for secret in secrets):
                found.append(f"{where}: {text[:300]}")
    return found


SECRETS = spellings(PASSWORD) + spellings(SENTINEL_PASSWORD)


@contextmanager
def everything(backend: Any, connect: bool) -> Iterator[list[Any]]:
    """The objects a running layer keeps, with connections open when ``connect``."""
    with ExitStack() as stack:
        sub = stack.enter_context(backend.subscriber())
        sub.subscribe("demo_events", lambda m: None)
        objects: list[Any] = [get_settings(), backend, sub]
        if connect:
            assert sub.wait_connected(10), sub.last_error
            backend.publish("demo_events", "x")  # opens the publisher
            objects.append(stack.enter_context(ControlClient(backend)))
            transport = backend.open_transport()
            stack.callback(transport.close)
            objects.append(transport)
        if backend.name == "redis":
            objects.append(backend.clients())
        yield objects


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    with PostgresServer(password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(password=PASSWORD) as server:
        yield server


@pytest.mark.backend
@pytest.mark.servers
def test_postgres_objects_never_show_the_password(postgres_server):
    assert QUOTED in postgres_server.url
    with override_settings(
        PUBSUB_BACKEND="postgres", PUBSUB_URL=postgres_server.url, PUBSUB_OPTIONS=FAST
    ):
        backend = get_backend()
        with everything(backend, connect=True) as objects:
            assert backend.secret == PASSWORD  # it is there, to be found
            assert leaks(objects, SECRETS) == []
        backend.close()


@pytest.mark.backend
@pytest.mark.servers
def test_redis_objects_never_show_the_password(redis_server):
    assert QUOTED in redis_server.url
    with override_settings(
        PUBSUB_BACKEND="redis", PUBSUB_URL=redis_server.url, PUBSUB_OPTIONS=FAST
    ):
        backend = get_backend()
        with everything(backend, connect=True) as objects:
            assert backend.target.kwargs["password"] == PASSWORD
            assert leaks(objects, SECRETS) == []
        backend.close()


@pytest.mark.parametrize(
    "settings",
    [
        # Pulp's own settings, the password in REDIS_PASSWORD.
        {"PUBSUB_URL": None, "REDIS_HOST": "127.0.0.1", "REDIS_PASSWORD": PASSWORD},
        {"PUBSUB_URL": None, "REDIS_URL": f"redis://:{QUOTED}@127.0.0.1:1/0"},
        # The password in the options, not the URL.
        {"PUBSUB_URL": "redis://127.0.0.1:1/0", "PUBSUB_OPTIONS": {**FAST, "password": PASSWORD}},
        # Sentinel: the master's password in the URL, the sentinels' in the options.
        {
            "PUBSUB_URL": f"redis+sentinel://u:{QUOTED}@127.0.0.1:1,127.0.0.1:2/mymaster",
            "PUBSUB_OPTIONS": {
                **FAST,
                "sentinel_username": "s",
                "sentinel_password": SENTINEL_PASSWORD,
            },
        },
    ],
    ids=["redis-host", "redis-url", "options", "sentinel"],
)
def test_redis_objects_built_every_way_never_show_the_password(settings):
    with override_settings(PUBSUB_BACKEND="redis", **{"PUBSUB_OPTIONS": FAST, **settings}):
        backend = get_backend()
        # Nothing listens there: the objects exist, with the subscriber retrying.
        with everything(backend, connect=False) as objects:
            text = repr(backend.target.kwargs) + repr(backend.config)
            assert "***" in text
            assert leaks(objects, SECRETS) == []
        backend.close()


@pytest.mark.backend
@pytest.mark.servers
@pytest.mark.parametrize("auth", ["password", "token"])
def test_nats_objects_never_show_the_password_or_token(auth):
    server = NatsServer(user="pulp", password=PASSWORD) if auth == "password" else None
    server = server or NatsServer(token=PASSWORD)
    with server:
        assert QUOTED in server.url
        with override_settings(PUBSUB_BACKEND="nats", PUBSUB_URL=server.url, PUBSUB_OPTIONS=FAST):
            backend = get_backend()
            with everything(backend, connect=True) as objects:
                assert PASSWORD in (backend.servers[0].credentials or ())  # there, to be found
                assert leaks(objects, SECRETS) == []
            backend.close()


def test_memory_objects_never_show_a_password_given_to_them():
    url = f"memory://admin:{QUOTED}@example.com"
    with override_settings(PUBSUB_BACKEND="memory", PUBSUB_URL=url, PUBSUB_OPTIONS=FAST):
        backend = get_backend()
        with everything(backend, connect=True) as objects:
            assert backend.url == url
            assert leaks(objects, SECRETS) == []
        backend.close()


def test_the_redacted_types_are_their_values_everywhere_but_repr():
    url = SecretURL(f"redis://u:{QUOTED}@h:1/0")
    assert str(url) == f"redis://u:{QUOTED}@h:1/0" and f"{url}" == str(url)
    assert QUOTED not in repr(url) and "***" in repr(url)
    secret = Secret(PASSWORD)
    assert secret == PASSWORD and repr(secret) == "'***'" and PASSWORD not in repr([secret])
    options = Options(password=PASSWORD, sentinel_password=None, probe_interval=1)
    assert options["password"] == PASSWORD
    assert repr(options) == "{'password': '***', 'sentinel_password': None, 'probe_interval': 1}"


def test_djangos_error_page_hides_a_password_given_in_pubsub_options():
    """Why the docs advise the password in PUBSUB_OPTIONS rather than in PUBSUB_URL."""
    with override_settings(
        PUBSUB_OPTIONS={"password": PASSWORD},
        PUBSUB_URL=f"redis://:{QUOTED}@h:1/0",
    ):
        shown = SafeExceptionReporterFilter().get_safe_settings()
    assert PASSWORD not in repr(shown["PUBSUB_OPTIONS"])
    # Django does not know PUBSUB_URL holds a password: the layer cannot hide it there.
    assert QUOTED in shown["PUBSUB_URL"]


@pytest.mark.backend
@pytest.mark.servers
@pytest.mark.parametrize("where", ["url", "options"])
def test_etcd_objects_never_show_the_password_or_the_token(where):
    with EtcdServer(password=PASSWORD) as server:
        assert QUOTED in server.url
        url, options = server.url, dict(FAST)
        if where == "options":
            url = f"etcd://{server.host}:{server.port}"
            options.update(username="root", password=PASSWORD)
        with override_settings(PUBSUB_BACKEND="etcd", PUBSUB_URL=url, PUBSUB_OPTIONS=options):
            backend = get_backend()
            with everything(backend, connect=True) as objects:
                assert backend.password == PASSWORD
                token = backend.client._token
                assert token
                assert leaks(objects, [*SECRETS, token]) == []
            backend.close()
