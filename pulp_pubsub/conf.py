"""Lazy access to the ``PUBSUB_*`` settings.

Nothing here runs at import time: every value is read from
``django.conf.settings`` when asked for, so ``override_settings`` and
Pulp's dynaconf (which fills settings late) both work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings

ALIASES: dict[str, str] = {
    "memory": "pulp_pubsub.backends.memory.MemoryBackend",
    "postgres": "pulp_pubsub.backends.postgres.PostgresBackend",
    "redis": "pulp_pubsub.backends.redis.RedisBackend",
    "etcd": "pulp_pubsub.backends.etcd.EtcdBackend",
    "relay": "pulp_pubsub.backends.relay.RelayBackend",
    "nats": "pulp_pubsub.backends.nats.NatsBackend",
    "zookeeper": "pulp_pubsub.backends.zookeeper.ZookeeperBackend",
}

DEFAULT_BACKEND = "postgres"


class Secret(str):
    """A string that never shows itself in a ``repr()``.

    Tracebacks with locals, debuggers, Sentry and Django's technical 500 page
    render objects and their attributes with ``repr()``; a password kept as
    one of these shows as ``'***'`` there. It is still the string itself, so
    client libraries use it unchanged.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


class SecretURL(str):
    """A URL whose ``repr()`` hides its password (see :class:`Secret`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(hide_password(str(self)))


#: Option names whose values are secrets.
_SECRET_OPTION = re.compile(r"password|secret|token|passphrase|^key$", re.IGNORECASE)


class Options(dict[str, Any]):
    """Backend options, or client keyword arguments, with the secret ones hidden in ``repr()``.

    A secret value is kept as a :class:`Secret`, so it stays hidden when a
    debugger or an error reporter shows the values one by one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.update(*args, **kwargs)

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, str) and _SECRET_OPTION.search(str(key)):
            value = Secret(value)
        elif isinstance(value, str) and str(key).endswith("url"):
            # A URL option (the relay backend's notify_url) may hold a password.
            value = SecretURL(value)
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


#: URL schemes whose user info, even without a ':', is a secret (a NATS token).
_USERINFO_IS_SECRET = ("nats://", "tls://")


def _hide_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not (sep and at):
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user + ':***' if colon else '***'}@{host}"


def secret_url(url: str | None) -> SecretURL | None:
    return None if url is None else SecretURL(url)


@dataclass(frozen=True)
class PubSubSettings:
    backend: str = DEFAULT_BACKEND
    url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    channel_prefix: str = ""
    publish_on_commit: bool = True

    def __post_init__(self) -> None:
        # A URL or an option may carry a password: hide both from repr().
        if isinstance(self.url, str):
            object.__setattr__(self, "url", SecretURL(self.url))
        if isinstance(self.options, dict):
            object.__setattr__(self, "options", Options(self.options))

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
    if url.lower().startswith(_USERINFO_IS_SECRET):
        # NATS: comma-separated servers, and a bare user info is a token.
        return ",".join(_hide_userinfo(item.strip()) for item in url.split(","))
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
