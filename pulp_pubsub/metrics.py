"""Every event the layer counts goes through :func:`count`.

The in-process ``stats`` counters of backends and subscribers are updated
here, in one place, so that exporting them elsewhere needs no change to the
code that counts.
"""

from __future__ import annotations

from collections import Counter


def count(stats: Counter[str], event: str, backend: str, channel: str | None = None) -> None:
    stats[event] += 1
