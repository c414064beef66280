"""System checks for the pulpcore integration (``pulp_pubsub.E101`` ...).

Pulp runs the checks in ``pulpcore-manager migrate`` and ``check``, which
every upgrade runs: a pulpcore the integration was not tested with stops the
upgrade there rather than leaving a fleet half on the layer and half on
LISTEN/NOTIFY.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from ...conf import get_settings
from . import PULPCORE_APP, SETTING, enabled, worker_type
from .compat import TESTED_TEXT, pulpcore_version, seam_problems, version_problem

E101 = "pulp_pubsub.E101"  # pulpcore version not tested
E102 = "pulp_pubsub.E102"  # a seam the integration relies on has moved
W101 = "pulp_pubsub.W101"  # WORKER_TYPE is not "pulpcore": integration off
W102 = "pulp_pubsub.W102"  # integration off while PUBSUB_BACKEND is not postgres


def _active() -> bool:
    return apps.is_installed(PULPCORE_APP) and enabled() and worker_type() == "pulpcore"


@register(Tags.compatibility)
def check_pulpcore_version(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if not _active():
        return []
    problem = version_problem()
    if problem is None:
        return []
    return [
        Error(
            f"The pulp-pubsub integration is off: {problem}. Pulp processes on this "
            "pulp-pubsub would signal workers with PostgreSQL LISTEN/NOTIFY while the "
            "rest of the fleet uses the layer.",
            hint=f'Install "pulpcore{TESTED_TEXT}", or a pulp-pubsub release tested with '
            f"pulpcore {pulpcore_version()}, or set {SETTING} = False on every Pulp process "
            "(see docs/pulp.md, rolling back).",
            id=E101,
        )
    ]


@register(Tags.compatibility)
def check_pulpcore_seams(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if not _active() or version_problem() is not None:
        return []
    return [
        Error(
            f"The pulp-pubsub integration is off: {problem}.",
            hint="This pulpcore build differs from the tested release; reinstall pulpcore "
            f"from PyPI or set {SETTING} = False on every Pulp process.",
            id=E102,
        )
        for problem in seam_problems()
    ]


@register(Tags.compatibility)
def check_pulpcore_mode(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if not apps.is_installed(PULPCORE_APP):
        return []
    backend = get_settings().backend
    if enabled() and worker_type() != "pulpcore":
        return [
            Warning(
                f"WORKER_TYPE is {worker_type()!r}: those workers poll and send no NOTIFY, "
                "so the pulp-pubsub integration is off.",
                hint='Set WORKER_TYPE = "pulpcore" for push wake-ups through pulp-pubsub.',
                id=W101,
            )
        ]
    if not enabled() and backend != "postgres":
        return [
            Warning(
                f"{SETTING} is False, so Pulp uses PostgreSQL LISTEN/NOTIFY, but "
                f"PUBSUB_BACKEND is {backend!r}.",
                hint=f"Set {SETTING} = True, or PUBSUB_BACKEND = 'postgres'.",
                id=W102,
            )
        ]
    return []
