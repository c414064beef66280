"""A pytest plugin for tests/test_tiers.py: writes what a collection held and what it kept.

Loaded with ``-p tests.tier_report`` in a subprocess; the JSON goes to the file named by
``TIER_REPORT``. It records every collected test with its markers and its ``harness`` or
``backend`` parameter before the ``-m`` selection runs, then the node ids the selection kept,
so the check sees the project's own configuration at work rather than a copy of it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

_collected: dict[str, dict[str, Any]] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        _collected[item.nodeid] = {
            "markers": sorted({mark.name for mark in item.iter_markers()}),
            "backend": params.get("harness", params.get("backend")),
        }


def pytest_collection_finish(session: pytest.Session) -> None:
    report = {"collected": _collected, "selected": [item.nodeid for item in session.items]}
    with open(os.environ["TIER_REPORT"], "w") as f:
        json.dump(report, f)
