"""System checks for the pulpcore integration (``pulp_pubsub.E102`` ...).

Pulp runs the checks in ``pulpcore-manager migrate`` and ``check``, which
every upgrade runs: a pulpcore whose seams moved stops the upgrade there
rather than leaving a fleet half on the layer and half on LISTEN/NOTIFY.
The checks read pulpcore's own classes, so they give the same answer before
and after the integration has installed itself in the process.
"""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.checks import CheckMessage, Error, Tags, Warning, register

from ...conf import get_settings
from .compat import SUPPORTED_TEXT, pulpcore_version, seam_problems, version_problem
from .conf import PULPCORE_APP, SETTING, enabled, worker_type
from .redis_compat import FIRST_SERIES as REDIS_FIRST_SERIES

E102 = "pulp_pubsub.E102"  # a seam the integration relies on has moved
W101 = "pulp_pubsub.W101"  # WORKER_TYPE is "redis" and its integration cannot install
W102 = "pulp_pubsub.W102"  # integration off while PUBSUB_BACKEND is not postgres
W103 = "pulp_pubsub.W103"  # pulpcore outside the supported series, but its seams match

#: The way out of E102, also in the error a serving process stops with.
WAY_OUT = (
    f"Install a pulpcore of a supported series (pulpcore{SUPPORTED_TEXT}) or a pulp-pubsub "
    f"release that supports this one; or run stock Pulp: {SETTING} = False and "
    "PUBSUB_BACKEND = 'postgres' on every Pulp process, with the workers' database "
    "connections direct rather than through a transaction pooler (docs/pulp.md, rolling back)."
)


def _active(kind: str = "pulpcore") -> bool:
    return apps.is_installed(PULPCORE_APP) and enabled() and worker_type() == kind


def _redis_problems() -> list[str]:
    from .redis_compat import redis_seam_problems

    return redis_seam_problems()


@register(Tags.compatibility)
def check_pulpcore_version(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if _active("redis"):
        if _redis_problems():
            return []
    elif not _active() or seam_problems():
        return []
    problem = version_problem()
    if problem is None:
        return []
    return [
        Warning(
            f"{problem}. Every seam the integration relies on is where it expects, so it "
            "is on, but no end-to-end run has covered this release.",
            hint=f"Prefer pulpcore{SUPPORTED_TEXT}, or a pulp-pubsub release that names "
            f"pulpcore {pulpcore_version()} as supported.",
            id=W103,
        )
    ]


@register(Tags.compatibility)
def check_pulpcore_seams(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if not _active():
        return []
    return [
        Error(f"The pulp-pubsub integration is off: {problem}.", hint=WAY_OUT, id=E102)
        for problem in seam_problems()
    ]


@register(Tags.compatibility)
def check_pulpcore_mode(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    if not apps.is_installed(PULPCORE_APP):
        return []
    backend = get_settings().backend
    if _active("redis"):
        return [
            Warning(
                f"The pulp-pubsub integration of WORKER_TYPE 'redis' is off: {problem}. "
                "Those workers poll the task table, as stock Pulp's do.",
                hint="Install a pulpcore of a supported series that has the Redis-type worker "
                f"(pulpcore>={REDIS_FIRST_SERIES},<{SUPPORTED_TEXT.rpartition('<')[2]}), or "
                'set WORKER_TYPE = "pulpcore" on every Pulp process.',
                id=W101,
            )
            for problem in _redis_problems()
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
