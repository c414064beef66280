"""The settings that decide whether the pulpcore integration is on.

Apart from the package's ``__init__`` so that the system checks, which the
integration's set-up imports, can read them without importing it back.
"""

from __future__ import annotations

from django.conf import settings

#: The setting that turns the integration off (``PULP_PUBSUB_PULPCORE_INTEGRATION=false``).
SETTING = "PUBSUB_PULPCORE_INTEGRATION"
PULPCORE_APP = "pulpcore.app"


def enabled() -> bool:
    return bool(getattr(settings, SETTING, True))


def worker_type() -> str:
    return str(getattr(settings, "WORKER_TYPE", "pulpcore"))
