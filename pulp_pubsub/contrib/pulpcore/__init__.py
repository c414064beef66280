"""Pulp itself on pulp-pubsub: pulpcore's workers, API and content app use the layer.

Nothing to call: a Pulp install that lists ``pulp_pubsub`` in
``INSTALLED_APPS`` gets :func:`setup` run from ``PulpPubSubConfig.ready()``.
When pulpcore's seams are where they should be and ``WORKER_TYPE`` is
``"pulpcore"``, it rebinds three module-level names and nothing else:

* ``pulpcore.tasking.tasks.connection``: a stand-in that publishes the
  ``pg_notify`` of ``wakeup_worker()`` and ``cancel_task()`` through the layer
  (:mod:`.publishers`);
* ``pulpcore.tasking.worker.PulpcoreWorker``: a subclass whose messaging
  cursor subscribes and publishes through the layer (:mod:`.worker`);
* ``pulpcore.tasking.worker.select``: a ``select`` that also waits on the
  subscriber's ``fileno()``.

With ``WORKER_TYPE = "redis"`` (pulpcore 3.108 and later) it rebinds
instead the Redis type's names: ``dispatch``, ``adispatch`` and
``cancel_task`` in ``pulpcore.tasking.redis_tasks`` (:mod:`.redis_tasks`),
and ``RedisWorker``, ``time`` and ``select`` in
``pulpcore.tasking.redis_worker`` (:mod:`.redis_worker`), so its idle
workers wait for a wake-up instead of polling. Its seams
(:mod:`.redis_compat`) that moved leave those workers stock, polling, with a
warning: a polling worker is never deaf.

A pulpcore that has its own pub/sub interface (``pulpcore.tasking.pubsub``
and the setting ``TASKING_PUBSUB_BACKEND``: upstream, or the patch in
docs/upstream.md) needs none of this: the integration names its adapter
(:mod:`.seam`) in that setting and rebinds nothing, for either worker type.

Otherwise it installs nothing and the system check ``pulp_pubsub.E102``
fails. A serving process (``pulpcore-worker``, ``pulpcore-api``,
``pulpcore-content``) then fails closed: with a backend other than
``postgres`` stock Pulp would be a worker that never hears a wake-up (its
peers publish elsewhere, and behind a transaction pooler its LISTEN goes
nowhere), so it refuses to start; with ``postgres``, the same wire as stock,
it runs stock Pulp with a WARNING. See docs/pulp.md.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field

from django.apps import apps
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from .conf import PULPCORE_APP, SETTING, enabled, worker_type

logger = logging.getLogger(__name__)

#: Pulp's serving programs: these fail closed when the integration cannot install.
SERVING_PROGRAMS = frozenset({"pulpcore-worker", "pulpcore-api", "pulpcore-content"})
#: Modules being imported while such a program starts Django (also when run
#: another way, e.g. ``gunicorn pulpcore.app.wsgi:application``).
SERVING_MODULES = (
    "pulpcore.tasking.entrypoint",
    "pulpcore.app.wsgi",
    "pulpcore.content.entrypoint",
)


class IntegrationUnavailable(ImproperlyConfigured):
    """A serving Pulp process whose backend is not PostgreSQL cannot carry its messages."""


@dataclass
class State:
    """What :func:`setup` did in this process, for checks and operators."""

    installed: bool = False
    #: Installed through pulpcore's own pub/sub setting: nothing in pulpcore is rebound.
    seam: bool = False
    reason: str = "pulpcore is not an installed app"
    problems: list[str] = field(default_factory=list)


state = State()


def serving_process() -> bool:
    """Whether this process is one of Pulp's workers, API or content servers."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return program in SERVING_PROGRAMS or any(name in sys.modules for name in SERVING_MODULES)


def setup() -> State:
    """Install the integration when this is a Pulp process that can take it."""
    global state
    if state.installed or not apps.is_installed(PULPCORE_APP):
        return state
    from . import checks  # (registers pulp_pubsub.E102 and friends)
    from .compat import has_pubsub_seam, seam_problems, version_problem

    state = State(reason="")
    if not enabled():
        state.reason = f"{SETTING} is False"
    elif worker_type() == "redis" and not has_pubsub_seam():
        return setup_redis_type()
    elif worker_type() not in ("pulpcore", "redis"):
        state.reason = f"WORKER_TYPE is {worker_type()!r}, which the integration does not know"
    else:
        state.problems = seam_problems()
    if state.problems:
        state.reason = "pulpcore is not as the integration expects"
        fail_closed(state.problems, checks.WAY_OUT)
    if state.reason:
        return state
    if has_pubsub_seam():
        use_seam()
        return state
    if problem := version_problem():
        logger.warning("%s; its seams match, so the integration is on.", problem)
    install()
    return state


def setup_redis_type() -> State:
    """The integration for ``WORKER_TYPE = "redis"``, or stock polling workers with a warning."""
    from .redis_compat import redis_seam_problems

    state.problems = redis_seam_problems()
    if state.problems:
        state.reason = "pulpcore's Redis-type worker is not as the integration expects"
        logger.warning(
            "pulp-pubsub left pulpcore's Redis-type worker unchanged, so it polls the task "
            "table as stock Pulp does (pulp_pubsub.W101: %s).",
            "; ".join(state.problems),
        )
        return state
    from .compat import version_problem

    if problem := version_problem():
        logger.warning("%s; its seams match, so the integration is on.", problem)
    install_redis_type()
    return state


def install_redis_type() -> None:
    """Rebind the Redis type's names; idempotent. Prefer :func:`setup`."""
    from . import redis_tasks, redis_worker

    redis_tasks.install(importlib.import_module("pulpcore.tasking.redis_tasks"))
    redis_worker.install(importlib.import_module("pulpcore.tasking.redis_worker"))
    state.installed, state.reason = True, ""
    logger.debug("pulp-pubsub wakes pulpcore's Redis-type workers")


def fail_closed(problems: list[str], way_out: str) -> None:
    """Refuse to serve on a backend stock Pulp cannot hear; on PostgreSQL, warn."""
    from ...conf import ALIASES, get_settings

    config = get_settings()
    backend, postgres = config.backend, config.backend_path == ALIASES["postgres"]
    why = "; ".join(problems)
    if not postgres and serving_process():
        raise IntegrationUnavailable(
            f"pulp-pubsub cannot carry this Pulp process's messages on the {backend!r} "
            f"backend (pulp_pubsub.E102: {why}), and stock Pulp's LISTEN/NOTIFY would not "
            f"hear the rest of the fleet, so it refuses to start. {way_out}"
        )
    level = logging.WARNING if postgres else logging.ERROR
    logger.log(
        level,
        "pulp-pubsub left pulpcore unchanged, so this process signals its workers with "
        "PostgreSQL LISTEN/NOTIFY (pulp_pubsub.E102: %s). Run `pulpcore-manager check`.",
        why,
    )


def install() -> None:
    """Rebind pulpcore's three names; idempotent. Prefer :func:`setup`."""
    from . import publishers, worker

    publishers.install(importlib.import_module("pulpcore.tasking.tasks"))
    worker.install(importlib.import_module("pulpcore.tasking.worker"))
    state.installed, state.reason = True, ""
    logger.debug("pulp-pubsub carries pulpcore's worker messages")


def use_seam() -> None:
    """Name the adapter in pulpcore's pub/sub setting, unless an operator named another class."""
    from .compat import PUBSUB_DEFAULT, PUBSUB_SETTING
    from .seam import PATH

    chosen = getattr(settings, PUBSUB_SETTING)
    if chosen not in (PUBSUB_DEFAULT, PATH):
        state.reason = f"{PUBSUB_SETTING} names {chosen!r}, which the integration leaves alone"
        logger.warning("pulp-pubsub does not carry pulpcore's worker messages: %s.", state.reason)
        return
    setattr(settings, PUBSUB_SETTING, PATH)
    state.installed, state.seam, state.reason = True, True, ""
    logger.debug("pulp-pubsub carries pulpcore's worker messages through %s", PUBSUB_SETTING)


def uninstall() -> None:
    """Give pulpcore its own names back (tests, and a process that must go stock)."""
    from . import publishers, worker

    if state.seam:
        from .compat import PUBSUB_DEFAULT, PUBSUB_SETTING

        setattr(settings, PUBSUB_SETTING, PUBSUB_DEFAULT)
        state.installed, state.seam, state.reason = False, False, "uninstalled"
        return

    publishers.uninstall(importlib.import_module("pulpcore.tasking.tasks"))
    worker.uninstall(importlib.import_module("pulpcore.tasking.worker"))
    if "pulpcore.tasking.redis_worker" in sys.modules:
        from . import redis_tasks, redis_worker

        redis_tasks.uninstall(importlib.import_module("pulpcore.tasking.redis_tasks"))
        redis_worker.uninstall(importlib.import_module("pulpcore.tasking.redis_worker"))
    state.installed, state.reason = False, "uninstalled"
