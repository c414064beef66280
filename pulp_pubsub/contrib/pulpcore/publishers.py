"""The publishing side: every ``pg_notify`` that ``pulpcore.tasking.tasks`` sends.

pulpcore signals workers from two functions of that module, both through
the module-level name ``connection`` (Django's default connection):

* ``wakeup_worker(reason)`` runs ``SELECT pg_notify('pulp_worker_wakeup', %s)``
  on the raw psycopg connection; ``dispatch()``, ``adispatch()`` (API and
  content app), the cancel of a waiting task and scheduled dispatch all call it;
* ``cancel_task(task_id)`` runs ``SELECT pg_notify('pulp_worker_cancel', %s)``
  on a Django cursor when the task is running.

Rather than replacing either function (and so re-implementing pulpcore), the
integration replaces only that module's ``connection`` name with
:class:`NotifyingConnection`, which hands out cursors that turn exactly those
statements into :func:`pulp_pubsub.publish` and pass all other SQL through.
Every caller, including modules that imported ``cancel_task`` or
``dispatch`` by name before we ran, keeps calling pulpcore's own function.
A publish inside ``transaction.atomic()`` goes out at commit, as the NOTIFY
did, and touches no database on a non-PostgreSQL backend.

Wake-ups are targeted (:func:`target`): ``unblock`` goes to one worker of the
``unblock`` group (the non-auxiliary workers: only one can hold the unblocking
lock anyway), ``handle`` to idle workers of the ``handle`` group; any other
payload, cancels and heartbeats stay broadcasts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from django.conf import settings

from ... import publish
from ...registry import RUNNERS, UNBLOCKERS, WAKEUP
from .sql import UntranslatableStatement, parse

logger = logging.getLogger(__name__)


#: During a rollout to another backend, also send pulpcore's own NOTIFY, so
#: processes still on stock pulpcore (LISTEN) hear this one (docs/pulp.md).
ALSO_NOTIFY = "PUBSUB_PULPCORE_ALSO_NOTIFY"


def also_notify() -> bool:
    return bool(getattr(settings, ALSO_NOTIFY, False))


#: Targeted wake-ups; False sends every wake-up to every worker, as stock
#: pulpcore does (needed while workers of an older pulp-pubsub, which join no
#: group, are still running: docs/pulp.md).
TARGETED = "PUBSUB_PULPCORE_TARGETED"
#: The wake-up payloads that name a group, and that group.
GROUPS = {"unblock": UNBLOCKERS, "handle": RUNNERS}


def targeted() -> bool:
    return bool(getattr(settings, TARGETED, True))


def target(channel: str, payload: str) -> str | None:
    """The group a pulpcore message goes to, or None for a broadcast."""
    if channel != WAKEUP or not targeted():
        return None
    return GROUPS.get(payload)


class TranslatingCursor:
    """A cursor that publishes pub/sub statements and runs everything else.

    The real cursor is opened only when ordinary SQL needs it, so a
    wake-up never opens (or waits for) a database connection.
    """

    def __init__(self, open_cursor: Callable[[], Any]) -> None:
        self._open_cursor = open_cursor
        self._cursor: Any = None

    @property
    def real(self) -> Any:
        if self._cursor is None:
            self._cursor = self._open_cursor()
        return self._cursor

    def execute(self, sql: Any, params: Sequence[Any] | None = None) -> Any:
        statement = parse(sql, params)
        if statement is None:
            return self.real.execute(sql, params)
        if statement.verb != "notify":
            raise UntranslatableStatement(
                f"{statement.verb.upper()} outside the worker is not expected from pulpcore: "
                f"{sql!r}"
            )
        publish(
            statement.channel,
            statement.payload,
            group=target(statement.channel, statement.payload),
        )
        if also_notify():
            self.real.execute(sql, params)  # the stock NOTIFY too, for a mixed fleet
        return self

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None

    def __enter__(self) -> TranslatingCursor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _RawConnection:
    """Stands in for ``connection.connection`` (the psycopg connection)."""

    def __init__(self, django_connection: Any) -> None:
        self._django_connection = django_connection

    def _raw(self) -> Any:
        raw = self._django_connection.connection
        if raw is None:
            self._django_connection.ensure_connection()
            raw = self._django_connection.connection
        return raw

    def cursor(self, *args: Any, **kwargs: Any) -> TranslatingCursor:
        return TranslatingCursor(lambda: self._raw().cursor(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw(), name)


class NotifyingConnection:
    """Stands in for ``django.db.connection`` inside ``pulpcore.tasking.tasks``.

    Everything but ``cursor()`` and ``.connection`` is Django's own
    (thread-local) connection, reached through ``__getattr__``.
    """

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def cursor(self, *args: Any, **kwargs: Any) -> TranslatingCursor:
        return TranslatingCursor(lambda: self.wrapped.cursor(*args, **kwargs))

    @property
    def connection(self) -> _RawConnection:
        return _RawConnection(self.wrapped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return f"<NotifyingConnection around {self.wrapped!r}>"


def install(tasks_module: Any) -> bool:
    """Point ``tasks_module.connection`` at a :class:`NotifyingConnection`; idempotent."""
    current = tasks_module.connection
    if isinstance(current, NotifyingConnection):
        return False
    tasks_module.connection = NotifyingConnection(current)
    logger.debug("pulp-pubsub now carries the NOTIFYs of %s", tasks_module.__name__)
    return True


def uninstall(tasks_module: Any) -> None:
    current = tasks_module.connection
    if isinstance(current, NotifyingConnection):
        tasks_module.connection = current.wrapped
