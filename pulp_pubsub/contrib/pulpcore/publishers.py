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

A backend outage is never pulpcore's error (:func:`carry`): the task row is
committed either way, so a failed wake-up is logged once per outage and
counted, and the workers' subscribers resync when the backend returns, which
makes every worker look for work.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any

from django.conf import settings

from ... import get_backend, publish_soon
from ...exceptions import PubSubError
from ...metrics import count
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


class Outage:
    """Publishes that failed since the last one that went through: one log line each way."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failed = 0

    def failure(self, channel: str, exc: BaseException) -> None:
        with self._lock:
            self.failed += 1
            first = self.failed == 1
        if first:
            logger.error(
                "pulp-pubsub could not send pulpcore's %r message (%s). Pulp goes on: tasks "
                "are accepted and workers resync when the backend is back. Further failures "
                "are counted (pulp_pubsub.messages.sent with error.type), not logged.",
                channel,
                exc,
            )

    def success(self) -> None:
        if not self.failed:
            return
        with self._lock:
            failed, self.failed = self.failed, 0
        if failed:
            logger.warning(
                "pulp-pubsub is sending pulpcore's messages again; %d could not be sent.", failed
            )


outage = Outage()


def carry(channel: str, payload: str, group: str | None = None, receivers: int = 1) -> None:
    """Publish one of pulpcore's messages; a backend failure is never pulpcore's error.

    What it is about is committed (or commits with the caller's transaction),
    so the caller does not wait for the server: a dispatcher creating many
    tasks in a row would otherwise pay a round trip per task. The message
    leaves through the backend's after-commit sender (PostgreSQL's native
    path stays inside the transaction, as pulpcore's NOTIFY), and its outcome
    comes back to :func:`_outcome`.
    """
    backend = get_backend()
    report = partial(_outcome, backend, channel)
    try:
        publish_soon(channel, payload, group=group, receivers=receivers, report=report)
    except PubSubError as exc:
        report(exc)


def _outcome(backend: Any, channel: str, error: PubSubError | None) -> None:
    if error is None:
        outage.success()
        return
    count(backend.stats, "pulpcore_messages_dropped", backend.name, channel, error=error)
    outage.failure(channel, error)


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
        carry(
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
