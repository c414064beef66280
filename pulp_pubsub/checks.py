"""System checks: a broken pub/sub setting stops ``manage.py`` before a worker starts deaf."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured

from . import control_auth
from .conf import ALIASES, get_settings
from .exceptions import InvalidBackendError, InvalidChannel, MissingDependency
from .handler import backend_class
from .validation import validate_prefix

E001 = "pulp_pubsub.E001"  # unknown or unimportable backend
E002 = "pulp_pubsub.E002"  # missing optional dependency
E003 = "pulp_pubsub.E003"  # bad PUBSUB_OPTIONS
E004 = "pulp_pubsub.E004"  # bad PUBSUB_CHANNEL_PREFIX
E005 = "pulp_pubsub.E005"  # bad PUBSUB_URL / PUBSUB_PUBLISH_ON_COMMIT type
E006 = "pulp_pubsub.E006"  # bad introspection settings or control key
W001 = "pulp_pubsub.W001"  # memory backend in production
W002 = "pulp_pubsub.W002"  # control key derived from a weak SECRET_KEY
W010 = "pulp_pubsub.W010"  # libpq older than 14: the PostgreSQL probe falls back
W011 = "pulp_pubsub.W011"  # NOTIFY on Django's connection, whose connect has no timeout


#: How Pulp's settings (dynaconf) read a dict from the environment.
OPTIONS_FROM_ENV = """PULP_PUBSUB_OPTIONS='@json {"publish": "direct"}'."""


@register(Tags.compatibility)
def check_backend(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    config = get_settings()
    try:
        cls = backend_class(config.backend)
    except MissingDependency as exc:
        return [Error(str(exc), hint=f'pip install "pulp-pubsub[{exc.extra}]"', id=E002)]
    except InvalidBackendError as exc:
        return [
            Error(
                str(exc),
                hint=f"Set PUBSUB_BACKEND to {', '.join(ALIASES)}, "
                "or the dotted path of a BaseBackend subclass.",
                id=E001,
            )
        ]
    try:
        cls.build_options(config.options)
    except ImproperlyConfigured as exc:
        hint = "Remove or correct the option in PUBSUB_OPTIONS."
        if isinstance(config.options, str):
            # What an environment variable gives unless it says how to read it.
            hint = "PUBSUB_OPTIONS is a dict; in Pulp's environment: " + OPTIONS_FROM_ENV
        return [Error(str(exc), hint=hint, id=E003)]
    return []


@register(Tags.compatibility)
def check_prefix(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    prefix = getattr(settings, "PUBSUB_CHANNEL_PREFIX", "")
    try:
        validate_prefix(prefix)
    except InvalidChannel as exc:
        return [
            Error(
                str(exc),
                hint="Use a short prefix of letters, digits, '.', '-' or '_', such as 'site1.'.",
                id=E004,
            )
        ]
    return []


@register(Tags.compatibility)
def check_types(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    url = getattr(settings, "PUBSUB_URL", None)
    if url is not None and not isinstance(url, str):
        errors.append(
            Error("PUBSUB_URL must be a string.", hint="For example redis://host:6379/0", id=E005)
        )
    on_commit = getattr(settings, "PUBSUB_PUBLISH_ON_COMMIT", True)
    if not isinstance(on_commit, bool):
        errors.append(
            Error(
                "PUBSUB_PUBLISH_ON_COMMIT must be True or False.",
                hint="Remove the setting to keep the default (True).",
                id=E005,
            )
        )
    return errors


@register(Tags.compatibility, deploy=True)
def check_production_backend(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if get_settings().backend == "memory":
        return [
            Warning(
                "PUBSUB_BACKEND is 'memory': messages never leave the process, so "
                "separate workers cannot wake each other.",
                hint="Use postgres, redis, nats, etcd, zookeeper or relay in production.",
                id=W001,
            )
        ]
    return []


@register(Tags.security)
def check_control_key(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Introspection answers only signed queries: there must be a key worth the name."""
    try:
        policy = control_auth.policy()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), hint="See PUBSUB_CONTROL_KEY in docs/settings.md.", id=E006)]
    if not policy.answers:
        return []
    if policy.key is None:
        return [
            Error(
                f"Introspection is on but has no key to sign with: {policy.key_error}",
                hint=f"Set {control_auth.KEY_SETTING} to a random string of at least "
                f"{control_auth.MIN_KEY_LENGTH} characters, the same in every process of the "
                f"fleet, or set {control_auth.ENABLED_SETTING} = False.",
                id=E006,
            )
        ]
    return []


@register(Tags.security, deploy=True)
def check_control_key_strength(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if getattr(settings, control_auth.KEY_SETTING, None) is not None:
        return []  # held to MIN_KEY_LENGTH by check_control_key
    if not getattr(settings, control_auth.ENABLED_SETTING, True):
        return []
    secret = getattr(settings, "SECRET_KEY", "") or ""
    if len(secret) >= control_auth.MIN_KEY_LENGTH and not secret.startswith("django-insecure"):
        return []
    return [
        Warning(
            "The key that signs introspection queries is derived from a SECRET_KEY that is "
            f"short (under {control_auth.MIN_KEY_LENGTH} characters) or Django's insecure "
            "default: anyone who guesses it can query the fleet.",
            hint=f"Set a strong SECRET_KEY, or a separate {control_auth.KEY_SETTING}.",
            id=W002,
        )
    ]


def _postgres_in_use() -> bool:
    try:
        return backend_class(get_settings().backend).name == "postgres"
    except (ImproperlyConfigured, MissingDependency, InvalidBackendError, ImportError):
        return False  # check_backend says what is wrong


@register(Tags.compatibility)
def check_libpq(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The PostgreSQL probe is a bare Sync in pipeline mode, which needs libpq 14."""
    if not _postgres_in_use():
        return []
    from .backends.postgres.session import has_pipeline

    if has_pipeline():
        return []
    from psycopg import pq

    return [
        Warning(
            f"psycopg runs on libpq {pq.version()} (built against {pq.__build_version__}), "
            "older than 14, which has no pipeline mode: the PostgreSQL subscribers' liveness "
            "probe is an empty query instead of a bare Sync, and queue_check_interval is "
            "ignored.",
            hint="Install a newer libpq (or psycopg[binary], which bundles one): pip install "
            '"psycopg[binary]>=3.1".',
            id=W010,
        )
    ]


@register(Tags.compatibility, deploy=True)
def check_notify_connect_timeout(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """A publish on Django's connection that must connect first is bounded by libpq alone."""
    config = get_settings()
    if config.url or not _postgres_in_use():
        return []
    from django.db import connections

    options_set = config.options if isinstance(config.options, dict) else {}
    alias = options_set.get("database", "default")
    if alias not in connections.settings:
        return []
    options = connections.settings[alias].get("OPTIONS") or {}
    if options.get("connect_timeout"):
        return []
    return [
        Warning(
            f"DATABASES[{alias!r}] sets no connect_timeout: a publish that has to open Django's "
            "connection to a PostgreSQL server that does not answer waits for as long as the "
            "operating system does, beyond publish_timeout.",
            hint=f'Set DATABASES[{alias!r}]["OPTIONS"]["connect_timeout"] (whole seconds, at '
            "least 2), e.g. 5.",
            id=W011,
        )
    ]
