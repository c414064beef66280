"""Builds the configured backend once per process and forgets it when it must.

The backend is rebuilt after ``fork()`` (a child never reuses its parent's
sockets) and whenever a ``PUBSUB_*`` setting changes, so ``override_settings``
works in tests.
"""

from __future__ import annotations

from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from .backends.base import BaseBackend
from .backends.perprocess import PerProcess
from .conf import ALIASES, PubSubSettings, get_settings
from .exceptions import InvalidBackendError, MissingDependency

#: The optional dependency each built-in backend needs, and its pip extra.
EXTRAS: dict[str, tuple[str, str]] = {
    "postgres": ("psycopg", "postgres"),
    "redis": ("redis", "redis"),
    "nats": ("nats", "nats"),
    "relay": ("websockets", "relay"),
}


def backend_class(setting: str) -> type[BaseBackend]:
    path = ALIASES.get(setting, setting) if isinstance(setting, str) else ""
    if "." not in path:
        raise InvalidBackendError(
            f"PUBSUB_BACKEND {setting!r} is neither a known alias "
            f"({', '.join(ALIASES)}) nor a dotted path to a backend class."
        )
    try:
        cls = import_string(path)
    except ImportError as exc:
        module = EXTRAS.get(setting)
        if module and exc.name and exc.name.split(".")[0] == module[0]:
            raise MissingDependency(setting, module[1], exc) from exc
        raise InvalidBackendError(f"Could not import pub/sub backend {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseBackend)):
        raise InvalidBackendError(f"{path!r} is not a subclass of BaseBackend.")
    return cls


def create_backend(config: PubSubSettings | None = None) -> BaseBackend:
    config = config or get_settings()
    cls = backend_class(config.backend)
    return cls(
        url=config.url,
        options=config.options,
        channel_prefix=config.channel_prefix,
        publish_on_commit=config.publish_on_commit,
    )


class BackendHandler:
    """One backend per process, made from the settings on first use.

    A forked child makes its own: the parent's backend is kept, never closed
    or collected, since tearing it down would close sockets that the parent
    process is still using.
    """

    def __init__(self) -> None:
        self._current: PerProcess[BaseBackend] = PerProcess(
            lambda: create_backend(), BaseBackend.close
        )

    def get(self) -> BaseBackend:
        return self._current.get()

    def reset(self) -> None:
        self._current.close()


backends = BackendHandler()


def _reset_on_change(*, setting: str, **kwargs: object) -> None:
    if setting.startswith(("PUBSUB_", "REDIS_")) or setting == "DATABASES":
        backends.reset()


setting_changed.connect(_reset_on_change, dispatch_uid="pulp_pubsub.reset_backend")
