"""The server a chaos run breaks, one small adapter per backend.

A real server is always a throwaway one of the run's own, with a password, on a free loopback
port, behind two fault-injecting TCP proxies (one for the subscribers, one for the publisher),
so that no other test or process is ever touched. The launchers are those the test suite
uses, :mod:`pulp_pubsub_tools.testing`.
"""

from __future__ import annotations

import secrets
from typing import Any, ClassVar

from django.core.management.base import CommandError

from ..testing import (
    EtcdServer,
    NatsServer,
    PostgresServer,
    RedisServer,
    RelayServer,
    TcpProxy,
    ZookeeperServer,
)

#: Fault kinds, in the order the report lists them.
SERVER_FAULTS = ("restart_graceful", "restart_kill", "kill_connections", "freeze")
PROXY_FAULTS = ("proxy_cut", "proxy_stall", "proxy_slow")
#: libpq's connect_timeout (whole seconds, at least 2) of the Django connection the
#: PostgreSQL publisher uses: what bounds a publish that must first open it.
DJANGO_CONNECT_TIMEOUT = 2


def make_password() -> str:
    # '/' and '@' must be quoted in a URL: the run also proves they never leak in either form.
    return f"Ch40s/{secrets.token_hex(6)}@pw"


class Target:
    """The adapter a backend gives the chaos run: a server to break, and how to reach it.

    To add a backend: subclass (usually ``_ServerTarget``), set ``name`` (the backend alias)
    and ``fault_kinds``, implement ``start()`` (start the throwaway server, with
    ``self.password``, then ``_with_proxies()``), ``spec(role)`` (backend, URL through
    ``self.proxies[role]``, options) and ``kill_subscriber_connections()``, and register it
    in ``TARGETS``. Everything else (faults, checks, report) is shared.
    """

    name: ClassVar[str]
    #: How the publisher reaches the server, for the report.
    publish_path: ClassVar[str] = "PUBSUB_URL"
    #: False when subscribers must be threads of the orchestrator (the memory backend).
    cross_process: ClassVar[bool] = True
    fault_kinds: ClassVar[tuple[str, ...]] = SERVER_FAULTS + PROXY_FAULTS
    #: True when a reconnecting subscriber is replayed what it missed (etcd), not resynced.
    replays: ClassVar[bool] = False

    def __init__(self, run_id: str, options: dict[str, Any], subscribers: int = 4) -> None:
        self.run_id = run_id
        self.options = options
        self.subscribers = subscribers
        self.password = make_password()
        self.proxies: dict[str, Any] = {}

    @property
    def secrets(self) -> list[str]:
        from urllib.parse import quote

        return [self.password, quote(self.password, safe="")]

    def start(self) -> None:
        raise NotImplementedError("subclasses of Target must provide start()")

    def publish_bound(self) -> float:
        """How long a publish may take before it counts as hung (before scheduling slack)."""
        return float(self.options["publish_timeout"])

    def spec(self, role: str) -> dict[str, Any]:
        """Backend, URL and options for ``role`` ("subscriber" or "publisher")."""
        raise NotImplementedError("subclasses of Target must provide spec()")

    def stop_server(self, mode: str) -> None:
        raise NotImplementedError("subclasses of Target must provide stop_server()")

    def start_server(self) -> None:
        raise NotImplementedError("subclasses of Target must provide start_server()")

    def kill_subscriber_connections(self) -> int:
        raise NotImplementedError("subclasses of Target must provide kill_subscriber_connections()")

    def freeze(self) -> None:
        raise NotImplementedError("subclasses of Target must provide freeze()")

    def thaw(self) -> None:
        raise NotImplementedError("subclasses of Target must provide thaw()")

    def begin_outage(self) -> None:
        """Make the server unreachable for the outage phase: the subscribers' server."""
        self.stop_server("graceful")

    def end_outage(self) -> None:
        self.start_server()

    def cleanup(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()


class MemoryTarget(Target):
    """The in-process hub: faults are its ``set_server_down`` and ``drop_connections``."""

    name = "memory"
    cross_process = False
    fault_kinds = SERVER_FAULTS

    @property
    def secrets(self) -> list[str]:
        return []

    def start(self) -> None:
        from pulp_pubsub.backends import memory

        memory.set_server_down(False)

    def spec(self, role: str) -> dict[str, Any]:
        return {"backend": "memory", "url": None, "options": dict(self.options)}

    def stop_server(self, mode: str) -> None:
        from pulp_pubsub.backends import memory

        memory.set_server_down(True)

    def start_server(self) -> None:
        from pulp_pubsub.backends import memory

        memory.set_server_down(False)

    def kill_subscriber_connections(self) -> int:
        from pulp_pubsub.backends import memory

        return memory.drop_connections()

    # A hub cannot hang; being down is the nearest it comes to a frozen server.
    def freeze(self) -> None:
        self.stop_server("freeze")

    def thaw(self) -> None:
        self.start_server()

    def cleanup(self) -> None:
        self.start_server()


class _ServerTarget(Target):
    server: Any = None

    def _with_proxies(self) -> None:
        for role in ("subscriber", "publisher"):
            self.proxies[role] = TcpProxy(self.server.host, self.server.port).start()

    def spec(self, role: str) -> dict[str, Any]:
        """The server's own URL, pointed through the role's proxy."""
        return {
            "backend": self.name,
            "url": self.proxies[role].url_for(self.server.url),
            "options": dict(self.options),
        }

    def _cut_subscriber_proxy(self) -> int:
        """Reset every subscriber connection where it passes, as a dead middlebox would."""
        proxy = self.proxies["subscriber"]
        held = int(proxy.connections)
        proxy.cut()
        return held

    def stop_server(self, mode: str) -> None:
        if mode == "kill":
            # kill -9 of every server process at once: no shutdown code runs at all.
            self.server._kill_hard()
        else:
            self.server.stop()

    def start_server(self) -> None:
        self.server.start()

    def freeze(self) -> None:
        self.server.freeze()

    def thaw(self) -> None:
        self.server.thaw()

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            if self.server is not None:
                self.server.cleanup()


class PostgresTarget(_ServerTarget):
    """PostgreSQL as a Django install uses it by default: no PUBSUB_URL, so the publisher
    NOTIFYs on Django's own connection (of a database alias the run adds for the purpose).

    The subscribers, in processes with no Django database, listen through PUBSUB_URL, which
    is the same LISTEN session either way.
    """

    name = "postgres"
    publish_path = "Django's connection"

    def __init__(self, run_id: str, options: dict[str, Any], subscribers: int = 4) -> None:
        super().__init__(run_id, options, subscribers)
        # Marks the subscribers' sessions, so a server-side kill hits them and nothing else.
        self.application_name = f"pulp-pubsub chaos {run_id}"
        self.max_connections = max(100, 2 * subscribers + 20)

    def start(self) -> None:
        self.server = PostgresServer(max_connections=self.max_connections, password=self.password)
        self.server.start()
        self._with_proxies()
        if self.publish_path != "PUBSUB_URL":
            from django.db import DEFAULT_DB_ALIAS, connections

            proxy = self.proxies["publisher"]
            database = {
                **self.server.django_database(),
                "HOST": proxy.host,
                "PORT": str(proxy.port),
                "OPTIONS": {"connect_timeout": DJANGO_CONNECT_TIMEOUT},
            }
            # Django's defaults for the keys not given, as for any alias of DATABASES.
            configured = connections.configure_settings(
                {DEFAULT_DB_ALIAS: {"ENGINE": "django.db.backends.dummy"}, self.alias: database}
            )
            connections.settings[self.alias] = configured[self.alias]

    def publish_bound(self) -> float:
        bound = super().publish_bound()
        if self.publish_path != "PUBSUB_URL":
            # Django opens the connection itself (after a fault closed it): libpq's own
            # connect_timeout, whole seconds, bounds that; docs/reliability.md says so.
            bound = max(bound, DJANGO_CONNECT_TIMEOUT)
        return bound

    @property
    def alias(self) -> str:
        return f"pubsub_chaos_{self.run_id}"

    def spec(self, role: str) -> dict[str, Any]:
        options = {**self.options, "application_name": self.application_name}
        if role == "publisher" and self.publish_path != "PUBSUB_URL":
            return {
                "backend": "postgres",
                "url": None,
                "options": {**options, "database": self.alias},
            }
        return {
            "backend": "postgres",
            "url": self.proxies[role].url_for(self.server.url),
            "options": options,
        }

    def kill_subscriber_connections(self) -> int:
        import psycopg

        with psycopg.connect(self.server.url, autocommit=True, connect_timeout=5) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                [self.application_name],
            ).fetchall()
        return len(rows)

    def cleanup(self) -> None:
        from django.db import connections

        try:
            super().cleanup()
        finally:
            connections.settings.pop(self.alias, None)


class PostgresUrlTarget(PostgresTarget):
    """PostgreSQL with PUBSUB_URL: the publisher NOTIFYs on a connection of the layer's own."""

    name = "postgres_url"
    publish_path = "PUBSUB_URL"


class RedisTarget(_ServerTarget):
    name = "redis"

    def start(self) -> None:
        self.server = RedisServer(password=self.password)
        self.server.start()
        self._with_proxies()

    def kill_subscriber_connections(self) -> int:
        import redis

        with redis.Redis.from_url(self.server.url, socket_timeout=5) as client:
            return int(client.client_kill_filter(_type="pubsub"))


class EtcdTarget(_ServerTarget):
    """One etcd member with authentication on (user ``root``)."""

    name = "etcd"
    replays = True

    def start(self) -> None:
        self.server = EtcdServer()
        self.server.start()
        self.server.enable_auth("root", self.password)
        self._with_proxies()

    def spec(self, role: str) -> dict[str, Any]:
        from urllib.parse import quote

        proxy = self.proxies[role]
        return {
            "backend": "etcd",
            "url": f"etcd://root:{quote(self.password, safe='')}@{proxy.host}:{proxy.port}",
            "options": dict(self.options),
        }

    def kill_subscriber_connections(self) -> int:
        # etcd cannot drop a client's connections: they are reset where they pass.
        return self._cut_subscriber_proxy()


class NatsTarget(_ServerTarget):
    """nats-server with a user and password; JetStream on when the run's options ask for it."""

    name = "nats"

    def start(self) -> None:
        self.server = NatsServer(
            user="chaos", password=self.password, jetstream=bool(self.options.get("jetstream"))
        )
        self.server.start()
        self._with_proxies()

    def kill_subscriber_connections(self) -> int:
        # nats-server 2.9 has no verb to drop a client: reset every subscriber connection
        # where it passes through the subscribers' proxy (RST, as a dead middlebox would).
        return self._cut_subscriber_proxy()


class ZookeeperTarget(_ServerTarget):
    """One ZooKeeper server; the layer's znodes carry the ACL of its digest user ``chaos``."""

    name = "zookeeper"
    replays = True

    def start(self) -> None:
        self.server = ZookeeperServer()
        self.server.start()
        self._with_proxies()

    def spec(self, role: str) -> dict[str, Any]:
        from urllib.parse import quote

        proxy = self.proxies[role]
        return {
            "backend": "zookeeper",
            "url": f"zk://chaos:{quote(self.password, safe='')}@{proxy.host}:{proxy.port}",
            "options": dict(self.options),
        }

    def kill_subscriber_connections(self) -> int:
        # ZooKeeper has no verb that drops one client's connection: reset them where they pass.
        return self._cut_subscriber_proxy()


class NatsJetStreamTarget(NatsTarget):
    """The nats backend with JetStream: a reconnect is replayed, and targeted delivery."""

    name = "natsjs"
    replays = True

    def __init__(self, run_id: str, options: dict[str, Any], subscribers: int = 4) -> None:
        super().__init__(run_id, {**options, "jetstream": True}, subscribers)

    def spec(self, role: str) -> dict[str, Any]:
        return {**super().spec(role), "backend": "nats"}


class _ProxyGroup:
    """The proxies in front of every relay, faulted together as one."""

    def __init__(self, proxies: list[TcpProxy]) -> None:
        self.members = proxies

    def url_for(self, urls: list[str]) -> str:
        return ",".join(p.url_for(u) for p, u in zip(self.members, urls, strict=True))

    def cut(self) -> None:
        for proxy in self.members:
            proxy.cut()

    def stall(self) -> None:
        for proxy in self.members:
            proxy.stall()

    def slow(self, delay_seconds: float) -> None:
        for proxy in self.members:
            proxy.slow(delay_seconds)

    def resume(self) -> None:
        for proxy in self.members:
            proxy.resume()

    def close(self) -> None:
        for proxy in self.members:
            proxy.close()


class RelayTarget(Target):
    """Two relays side by side; subscribers reach each through a proxy of its own.

    ``pg_notify``: the relays LISTEN on a PostgreSQL of the run's own, which the
    publisher NOTIFYs through its proxy; a restart restarts PostgreSQL under the
    relays. ``direct``: the relays hold no PostgreSQL session and the publisher
    sends to both; a restart restarts the relays. In both, ``kill_connections``
    kills one relay (SIGKILL, then started again), in turn, with its subscribers
    attached, and a freeze stops everything. The token is the run's secret.
    """

    name = "relay"
    mode = "pg_notify"
    relays_count = 2

    def __init__(self, run_id: str, options: dict[str, Any], subscribers: int = 4) -> None:
        super().__init__(run_id, options, subscribers)
        self.postgres: PostgresServer | None = None
        self.relays: list[RelayServer] = []
        self._killed = 0

    def start(self) -> None:
        database_url = None
        if self.mode == "pg_notify":
            self.postgres = PostgresServer(password=self.password).start()
            database_url = self.postgres.url
        for _ in range(self.relays_count):
            relay = RelayServer(database_url, self.password, probe_interval=1.0, probe_timeout=1.0)
            self.relays.append(relay.start())
        group = _ProxyGroup([TcpProxy(r.host, r.port).start() for r in self.relays])
        self.proxies["subscriber"] = group
        if self.postgres is not None:
            self.proxies["publisher"] = TcpProxy(self.postgres.host, self.postgres.port).start()
        else:
            self.proxies["publisher"] = _ProxyGroup(
                [TcpProxy(r.host, r.port).start() for r in self.relays]
            )

    def spec(self, role: str) -> dict[str, Any]:
        urls = [r.url for r in self.relays]
        options = {**self.options, "publish": self.mode, "token": self.password}
        if role == "subscriber" or self.postgres is None:
            url = self.proxies[role].url_for(urls)
        else:
            url = ",".join(urls)
        if self.postgres is not None:
            # Subscribers publish nothing but are configured as complete as a worker is.
            options["notify_url"] = self.proxies["publisher"].url_for(self.postgres.url)
        return {"backend": "relay", "url": url, "options": options}

    def _servers(self) -> list[Any]:
        return [self.postgres] if self.postgres is not None else list(self.relays)

    def stop_server(self, mode: str) -> None:
        for server in self._servers():
            if mode == "kill":
                server._kill_hard()
            else:
                server.stop()

    def start_server(self) -> None:
        for server in self._servers():
            server.start()

    def begin_outage(self) -> None:
        # What the subscribers reach is the relays: all of them go (PostgreSQL too).
        for server in [*self.relays, self.postgres]:
            if server is not None:
                server.stop()

    def end_outage(self) -> None:
        for server in [self.postgres, *self.relays]:
            if server is not None:
                server.start()

    def kill_subscriber_connections(self) -> int:
        relay = self.relays[self._killed % len(self.relays)]
        self._killed += 1
        relay.restart("kill")
        return 1

    def freeze(self) -> None:
        for relay in self.relays:
            relay.freeze()
        if self.postgres is not None:
            self.postgres.freeze()

    def thaw(self) -> None:
        if self.postgres is not None:
            self.postgres.thaw()
        for relay in self.relays:
            relay.thaw()

    def cleanup(self) -> None:
        try:
            super().cleanup()
        finally:
            for server in [*self.relays, self.postgres]:
                if server is not None:
                    server.cleanup()


class DirectRelayTarget(RelayTarget):
    name = "relay_direct"
    mode = "direct"


TARGETS: dict[str, type[Target]] = {
    "memory": MemoryTarget,
    "postgres": PostgresTarget,
    "postgres_url": PostgresUrlTarget,
    "redis": RedisTarget,
    "etcd": EtcdTarget,
    "relay": RelayTarget,
    "relay_direct": DirectRelayTarget,
    "nats": NatsTarget,
    "zookeeper": ZookeeperTarget,
    "natsjs": NatsJetStreamTarget,
}


def make_target(name: str, run_id: str, options: dict[str, Any], subscribers: int) -> Target:
    try:
        cls = TARGETS[name]
    except KeyError:
        raise CommandError(
            f"The chaos run knows no backend {name!r}; choose one of {', '.join(TARGETS)}."
        ) from None
    return cls(run_id, options, subscribers)
