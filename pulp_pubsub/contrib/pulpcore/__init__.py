"""Pulp itself on pulp-pubsub: pulpcore's workers, API and content app use the layer.

Nothing to call: a Pulp install that lists ``pulp_pubsub`` in
``INSTALLED_APPS`` gets :func:`setup` run from ``PulpPubSubConfig.ready()``.
When pulpcore is of a tested version, its seams are where they should be and
``WORKER_TYPE`` is ``"pulpcore"``, it rebinds three module-level names and
nothing else:

* ``pulpcore.tasking.tasks.connection``: a stand-in that publishes the
  ``pg_notify`` of ``wakeup_worker()`` and ``cancel_task()`` through the layer
  (:mod:`.publishers`);
* ``pulpcore.tasking.worker.PulpcoreWorker``: a subclass whose messaging
  cursor subscribes and publishes through the layer (:mod:`.worker`);
* ``pulpcore.tasking.worker.select``: a ``select`` that also waits on the
  subscriber's ``fileno()``.

Otherwise it installs nothing, logs why, and the system checks
``pulp_pubsub.E101``/``E102`` fail. See docs/pulp.md.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field

from django.apps import apps
from django.conf import settings

logger = logging.getLogger(__name__)

#: The setting that turns the integration off (``PULP_PUBSUB_PULPCORE_INTEGRATION=false``).
SETTING = "PUBSUB_PULPCORE_INTEGRATION"
PULPCORE_APP = "pulpcore.app"


@dataclass
class State:
    """What :func:`setup` did in this process, for checks and operators."""

    installed: bool = False
    reason: str = "pulpcore is not an installed app"
    problems: list[str] = field(default_factory=list)


state = State()


def enabled() -> bool:
    return bool(getattr(settings, SETTING, True))


def worker_type() -> str:
    return str(getattr(settings, "WORKER_TYPE", "pulpcore"))


def setup() -> State:
    """Install the integration when this is a Pulp process that can take it."""
    global state
    if state.installed or not apps.is_installed(PULPCORE_APP):
        return state
    from . import checks  # noqa: F401  (registers pulp_pubsub.E101 and friends)
    from .compat import seam_problems, version_problem

    state = State(reason="")
    if not enabled():
        state.reason = f"{SETTING} is False"
    elif worker_type() != "pulpcore":
        state.reason = f"WORKER_TYPE is {worker_type()!r}; only 'pulpcore' workers use NOTIFY"
    elif problem := version_problem():
        state.problems = [problem]
    else:
        state.problems = seam_problems()
    if state.problems:
        state.reason = "pulpcore is not as the integration expects"
        logger.error(
            "pulp-pubsub left pulpcore unchanged, so this process signals its workers "
            "with PostgreSQL LISTEN/NOTIFY: %s. Run `pulpcore-manager check`.",
            "; ".join(state.problems),
        )
    if state.reason:
        return state
    install()
    return state


def install() -> None:
    """Rebind pulpcore's three names; idempotent. Prefer :func:`setup`."""
    from . import publishers, worker

    publishers.install(importlib.import_module("pulpcore.tasking.tasks"))
    worker.install(importlib.import_module("pulpcore.tasking.worker"))
    state.installed, state.reason = True, ""
    logger.debug("pulp-pubsub carries pulpcore's worker messages")


def uninstall() -> None:
    """Give pulpcore its own names back (tests, and a process that must go stock)."""
    from . import publishers, worker

    publishers.uninstall(importlib.import_module("pulpcore.tasking.tasks"))
    worker.uninstall(importlib.import_module("pulpcore.tasking.worker"))
    state.installed, state.reason = False, "uninstalled"
