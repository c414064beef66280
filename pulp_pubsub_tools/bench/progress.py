"""Progress while the benchmark runs: a tqdm bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any


class Step:
    def __init__(self, update: Callable[[int], None]) -> None:
        self.update = update


class Progress:
    """``with progress.step("fanout redis", total=50) as step: step.update(1)``."""

    def __init__(self, stream: IO[str] | None, write: Callable[[str], None], bars: bool) -> None:
        self.stream = stream
        self.write = write
        self._tqdm: Any = None
        if bars and stream is not None and getattr(stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                # No monitor thread: agents are forked, and a fork should find no other thread.
                self._tqdm = type("BenchBar", (tqdm,), {"monitor_interval": 0})

    @contextmanager
    def step(self, label: str, total: int, unit: str = "") -> Iterator[Step]:
        started = time.monotonic()
        if self._tqdm is not None:
            bar = self._tqdm(
                total=total,
                desc=label,
                unit=unit or "it",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )
            try:
                yield Step(bar.update)
            finally:
                bar.close()
            self.write(f"{label}: done in {time.monotonic() - started:.1f} s")
            return
        done = 0
        shown = -1

        def update(n: int) -> None:
            nonlocal done, shown
            done += n
            tenth = done * 10 // max(total, 1)
            if tenth != shown and total >= 10:
                shown = tenth
                self.write(f"  {label}: {done}/{total} {unit}".rstrip())

        self.write(f"{label} ...")
        yield Step(update)
        self.write(f"{label}: done in {time.monotonic() - started:.1f} s")
