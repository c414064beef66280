"""One small adapter per backend: which server it needs, how the layer reaches it, its raw client.

A later backend (nats, etcd, relay) plugs in with a subclass here, a raw
client in :mod:`.raw` if its library has one, and, if the benchmark should
start its server itself, a launcher in :mod:`.servers` (otherwise the server
is given with ``--server-url nats=nats://...``). The scenarios never name a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from pulp_pubsub.conf import ALIASES, PubSubSettings

from . import BenchError
from .raw import (
    EtcdRawClient,
    KazooRawClient,
    NatsClient,
    PsycopgClient,
    RawClient,
    RedisClient,
)
from .servers import ServerSet


@dataclass
class Target:
    """One backend, resolved against this run's servers."""

    name: str
    settings: PubSubSettings
    #: Agents run as threads of the parent: the backend reaches no other process.
    in_process: bool
    raw: Callable[[], RawClient] | None
    raw_label: str | None
    adapter: Adapter

    def settings_for(self, role: str) -> PubSubSettings:
        """The settings of an agent in ``role`` (a backend may mark its sessions by role)."""
        return self.adapter.settings_for(self.settings, role)


class Adapter:
    name: ClassVar[str]
    #: The PUBSUB_BACKEND alias, when the adapter's name (a variant, a mode) is not one.
    backend: ClassVar[str | None] = None
    #: application_name of PostgreSQL sessions the backend holds outside the agents
    #: (a relay's LISTEN session), counted with the subscribers' own.
    extra_sessions: ClassVar[tuple[str, ...]] = ()
    #: The kind of server the backend talks to (a key of ServerSet), or None.
    server: ClassVar[str | None] = None
    in_process: ClassVar[bool] = False
    raw_client: ClassVar[Any] = None
    #: PUBSUB_OPTIONS for the run; the layer's defaults unless there is a reason.
    options: ClassVar[dict[str, Any]] = {}
    #: The largest N the backend can be benchmarked with, if it has a limit.
    max_subscribers: ClassVar[int | None] = None

    def layer_url(self, server_url: str | None) -> str | None:
        """PUBSUB_URL for the agents."""
        return server_url

    def target(self, servers: ServerSet) -> Target:
        url = servers.url(self.server) if self.server else None
        settings = PubSubSettings(
            backend=self.backend or self.name, url=self.layer_url(url), options=self.options
        )
        raw = None
        if self.raw_client is not None and url is not None:
            factory, raw_url = self.raw_client, url

            def raw() -> RawClient:
                client: RawClient = factory(raw_url)
                return client

        label = self.raw_client.label if raw is not None else None
        return Target(self.name, settings, self.in_process, raw, label, self)

    def settings_for(self, settings: PubSubSettings, role: str) -> PubSubSettings:
        return settings


class MemoryAdapter(Adapter):
    name = "memory"
    in_process = True
    # Every subscriber is a few threads and pipes of this one process, and select()
    # cannot watch a descriptor numbered 1024 or more.
    max_subscribers = 100


class PostgresAdapter(Adapter):
    name = "postgres"
    server = "postgres"
    raw_client = PsycopgClient

    def settings_for(self, settings: PubSubSettings, role: str) -> PubSubSettings:
        # Listener sessions named by role, so pg_stat_activity can tell them apart.
        options = {**settings.options, "application_name": f"pubsub-bench {role} listener"}
        return replace(settings, options=options)

    def layer_url(self, server_url: str | None) -> str | None:
        # No PUBSUB_URL: each agent's Django ``default`` database is the benchmark's
        # PostgreSQL, so the layer publishes NOTIFY inside the writer's own transaction
        # and PostgreSQL sends it at commit, exactly as stock Pulp does.
        return None


class RedisAdapter(Adapter):
    name = "redis"
    server = "redis"
    raw_client = RedisClient


class EtcdAdapter(Adapter):
    name = "etcd"
    server = "etcd"
    raw_client = EtcdRawClient


class ZookeeperAdapter(Adapter):
    name = "zookeeper"
    server = "zookeeper"
    raw_client = KazooRawClient


class NatsAdapter(Adapter):
    name = "nats"
    server = "nats"
    raw_client = NatsClient


class NatsJetStreamAdapter(NatsAdapter):
    """NATS with JetStream: replay, and native targeted delivery."""

    name = "natsjs"
    backend = "nats"
    server = "natsjs"
    options: ClassVar[dict[str, Any]] = {"jetstream": True}


class RelayAdapter(Adapter):
    """A relay over the benchmark's PostgreSQL; writers NOTIFY in their own transaction."""

    name = "relay"
    backend = "relay"
    server = "relay"
    options: ClassVar[dict[str, Any]] = {"publish": "pg_notify"}
    extra_sessions = ("pulp-pubsub relay",)


class DirectRelayAdapter(RelayAdapter):
    """The same relay; writers send to it after commit, with no NOTIFY."""

    name = "relay_direct"
    options: ClassVar[dict[str, Any]] = {"publish": "direct"}


ADAPTERS: dict[str, type[Adapter]] = {
    adapter.name: adapter
    for adapter in (
        MemoryAdapter,
        PostgresAdapter,
        RedisAdapter,
        RelayAdapter,
        DirectRelayAdapter,
        EtcdAdapter,
        NatsAdapter,
        NatsJetStreamAdapter,
        ZookeeperAdapter,
    )
}


#: ``--backends redis+listener-reads``: the same backend with other options, beside it in
#: one run (the comparison a change of the layer is judged by, under the same load).
VARIANTS: dict[str, dict[str, Any]] = {
    # Before the owner read its connection itself: the listener thread reads and wakes
    # the owner through the signal pipe (two thread wake-ups per message).
    "listener-reads": {"owner_reads": False},
}


def adapter_for(name: str) -> Adapter:
    base, plus, variant = name.partition("+")
    if plus and variant not in VARIANTS:
        raise BenchError(f"No variant {variant!r} of {base!r}; known: {', '.join(VARIANTS)}.")
    try:
        cls = ADAPTERS[base]
    except KeyError:
        known = ", ".join(ADAPTERS)
        hint = (
            " (a backend of the layer without a benchmark adapter yet)" if base in ALIASES else ""
        )
        raise BenchError(
            f"No benchmark adapter for backend {base!r}{hint}; known: {known}."
        ) from None
    if plus:
        attributes = {
            "name": name,
            "backend": cls.backend or cls.name,
            "options": {**cls.options, **VARIANTS[variant]},
        }
        cls = type(cls.__name__, (cls,), attributes)
    return cls()


def django_database(url: str) -> dict[str, Any]:
    """A Django ``DATABASES`` entry for a ``postgresql://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        raise BenchError("--postgres-url must be a postgresql:// URL.")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "CONN_MAX_AGE": None,
    }
