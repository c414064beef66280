"""Lazy access to the ``PUBSUB_*`` settings.

Nothing here runs at import time: every value is read from
``django.conf.settings`` when asked for, so ``override_settings`` and
Pulp's dynaconf (which fills settings late) both work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings

ALIASES: dict[str, str] = {
    "memory": "pulp_pubsub.backends.memory.MemoryBackend",
    "postgres": "pulp_pubsub.backends.postgres.PostgresBackend",
    "redis": "pulp_pubsub.backends.redis.RedisBackend",
    "nats": "pulp_pubsub.backends.nats.NatsBackend",
}

DEFAULT_BACKEND = "postgres"


@dataclass(frozen=True)
class PubSubSettings:
    backend: str = DEFAULT_BACKEND
    url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    channel_prefix: str = ""
    publish_on_commit: bool = True

    @property
    def backend_path(self) -> str:
        return ALIASES.get(self.backend, self.backend)


def get_settings() -> PubSubSettings:
    return PubSubSettings(
        backend=getattr(settings, "PUBSUB_BACKEND", DEFAULT_BACKEND),
        url=getattr(settings, "PUBSUB_URL", None) or None,
        options=getattr(settings, "PUBSUB_OPTIONS", None) or {},
        channel_prefix=getattr(settings, "PUBSUB_CHANNEL_PREFIX", "") or "",
        publish_on_commit=getattr(settings, "PUBSUB_PUBLISH_ON_COMMIT", True),
    )


def hide_password(url: str | None) -> str | None:
    """Return ``url`` with any password replaced, safe for output and logs."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        # A password with an unquoted '/', '?', '#' or '@' ends the authority early for
        # urlsplit, which then sees no password at all: mask up to the last '@' instead
        # (too much, rather than part of a secret, when a path or query holds an '@').
        scheme, sep, rest = url.partition("://")
        userinfo, at, host = rest.rpartition("@")
        if not (sep and at and ":" in userinfo):
            return url
        return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
