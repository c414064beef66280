"""Run in a virtualenv with pulpcore: what setup() changes in ``pulpcore.tasking``.

Django starts with the integration off; every ``pulpcore.tasking`` module is
imported and its attributes noted; then the integration is switched on and
:func:`setup` runs. Prints one JSON line: the state, the attributes that are
no longer the same objects, and the class pulpcore's pub/sub setting names.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys

import django


def snapshot() -> dict[str, dict[str, object]]:
    return {
        name: dict(vars(module))
        for name, module in sorted(sys.modules.items())
        if name == "pulpcore.tasking" or name.startswith("pulpcore.tasking.")
    }


def main() -> None:
    django.setup()
    import pulpcore.tasking
    from django.conf import settings

    for info in pkgutil.iter_modules(pulpcore.tasking.__path__):
        importlib.import_module(f"pulpcore.tasking.{info.name}")
    from pulp_pubsub.contrib import pulpcore as integration

    assert not integration.state.installed, integration.state
    before = snapshot()
    settings.PUBSUB_PULPCORE_INTEGRATION = True
    state = integration.setup()
    after = snapshot()
    changed = sorted(
        f"{module}.{name}"
        for module in before.keys() | after.keys()
        for name in before.get(module, {}).keys() | after.get(module, {}).keys()
        if before.get(module, {}).get(name, before) is not after.get(module, {}).get(name, after)
    )
    pubsub = sys.modules.get("pulpcore.tasking.pubsub")
    chosen = pubsub.get_backend() if pubsub is not None else None  # type: ignore[attr-defined]
    print(
        json.dumps(
            {
                "installed": state.installed,
                "seam": state.seam,
                "reason": state.reason,
                "problems": state.problems,
                "changed": changed,
                "setting": getattr(settings, "TASKING_PUBSUB_BACKEND", None),
                "backend": None if chosen is None else f"{chosen.__module__}.{chosen.__name__}",
            }
        )
    )


if __name__ == "__main__":
    main()
