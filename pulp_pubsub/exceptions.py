"""The errors pulp-pubsub raises.

Configuration mistakes subclass Django's ``ImproperlyConfigured`` rather than
``PubSubError`` so that code catching runtime pub/sub failures can never
swallow a broken setting.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class PubSubError(Exception):
    """Base class of every runtime pub/sub failure."""


class PublishError(PubSubError):
    """A publish could not be handed to the server in time."""


class InvalidChannel(PubSubError, ValueError):
    """A channel name breaks the naming rules shared by every backend."""


class InvalidPayload(PubSubError, ValueError):
    """A payload that the backend cannot carry byte-exact."""


class ConnectionLost(PubSubError):
    """A subscriber's connection died; the listener reconnects and resyncs."""


class Deaf(ConnectionLost):
    """A connection works but does not hear what others publish.

    Its message says why (a transaction pooler in front of PostgreSQL, say) and how to fix
    it. A subscriber's listener logs it at ERROR, counts it (``deaf``) and tries again; the
    relay server's PostgreSQL link, whose own NOTIFY did not come back, reports it as the
    cause of being down and reconnects.
    """


class SubscriberClosed(PubSubError):
    """The subscriber was closed, or belongs to the process it was forked from."""


class InvalidBackendError(ImproperlyConfigured):
    """``PUBSUB_BACKEND`` names no alias and no importable backend class."""


class MissingDependency(ImproperlyConfigured):
    """The chosen backend needs an optional dependency that is not installed."""

    def __init__(self, backend: str, extra: str, error: ImportError) -> None:
        self.extra = extra
        super().__init__(
            f"The {backend} pub/sub backend needs an extra dependency ({error}). "
            f'Install it with: pip install "pulp-pubsub[{extra}]"'
        )


class IntrospectionDisabled(ImproperlyConfigured):
    """Introspection is off here (``PUBSUB_INTROSPECTION``) or has no key to sign with."""
