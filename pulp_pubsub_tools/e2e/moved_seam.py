"""A pulpcore whose seam has moved, without touching the installed pulpcore.

The ``fail_closed`` scenario copies this file as ``sitecustomize.py`` into a
directory it puts first on a Pulp process's ``PYTHONPATH``; Python imports it
at start-up. It then gives ``pulpcore.constants``, the moment that module has
been imported, one more wake-up reason, as a pulpcore release that adds one
would: the integration cannot carry a reason it does not know, so its seam
check fails (``pulp_pubsub.E102``) before anything is installed.

Standard library only: it runs before Django, pulpcore or pulp_pubsub are
importable.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

TARGET = "pulpcore.constants"
NAME, VALUE = "TASK_WAKEUP_E2E_MOVED_SEAM", "e2e-moved-seam"


class _Loader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        created: ModuleType | None = self.loader.create_module(spec)
        return created

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        setattr(module, NAME, VALUE)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


sys.meta_path.insert(0, _Finder())
