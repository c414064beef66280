"""Where agents post the time they got a message, without waking the parent for each one.

A fanout to 250 subscribers on two cores is measured while it happens: if
every receipt were a JSON line the parent had to ``select()`` over 250 sockets
for and parse, the parent would compete for the very CPU the subscribers need
and inflate the latency it measures. So each agent writes its receipt into its
own slot of one shared memory map (made before the agents are forked) and one
byte into one shared pipe; the parent sleeps on that pipe, drains it in bulk,
and reads the slots once the count says everyone may have posted.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import struct
import time

#: round (or task id), receive time (time.monotonic()), resyncs seen so far
_SLOT = struct.Struct("qdq")
NONE = -1


class Board:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._mem = mmap.mmap(-1, _SLOT.size * max(1, slots))
        for slot in range(slots):
            _SLOT.pack_into(self._mem, slot * _SLOT.size, NONE, 0.0, 0)
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        # A full pipe (the parent stopped reading) must never block an agent: the
        # parent has bytes enough to look at the slots then.
        os.set_blocking(self._write_fd, False)

    # -- the agent's side ------------------------------------------------------------

    def post(self, slot: int, round_: int, at: float) -> None:
        _, _, resyncs = _SLOT.unpack_from(self._mem, slot * _SLOT.size)
        _SLOT.pack_into(self._mem, slot * _SLOT.size, round_, at, resyncs)
        with contextlib.suppress(BlockingIOError):
            os.write(self._write_fd, b"\0")

    def resync(self, slot: int) -> None:
        round_, at, resyncs = _SLOT.unpack_from(self._mem, slot * _SLOT.size)
        _SLOT.pack_into(self._mem, slot * _SLOT.size, round_, at, resyncs + 1)

    # -- the parent's side -------------------------------------------------------------

    def read(self, round_: int, slots: int) -> list[float | None]:
        """Each slot's receive time for ``round_``, None where it has not posted it."""
        out: list[float | None] = []
        for slot in range(slots):
            posted, at, _ = _SLOT.unpack_from(self._mem, slot * _SLOT.size)
            out.append(at if posted == round_ else None)
        return out

    def collect(self, round_: int, slots: int, timeout: float) -> list[float | None]:
        """Wait until the first ``slots`` agents have posted ``round_``, or ``timeout``."""
        deadline = time.monotonic() + timeout
        posted = 0
        while True:
            if posted >= slots:  # late posts of an earlier round count too: check
                times = self.read(round_, slots)
                if None not in times:
                    return times
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read_fd], [], [], left)[0]:
                return self.read(round_, slots)
            with contextlib.suppress(BlockingIOError):
                posted += len(os.read(self._read_fd, 1 << 16))

    def collect_any(
        self, round_: int, slots: int, timeout: float, linger: float = 0.0
    ) -> list[tuple[int, float]]:
        """Wait until some slot has posted ``round_`` (targeted delivery: one should).

        Then wait ``linger`` seconds more for other slots (a backend that falls
        back to broadcast delivers to all), and return (slot, time) of each.
        """
        deadline = time.monotonic() + timeout
        while True:
            posted = [(s, t) for s, t in enumerate(self.read(round_, slots)) if t is not None]
            left = deadline - time.monotonic()
            if posted or left <= 0:
                break
            if select.select([self._read_fd], [], [], left)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._read_fd, 1 << 16)
        if posted and linger > 0:
            time.sleep(linger)  # a measuring window for late extra deliveries
            posted = [(s, t) for s, t in enumerate(self.read(round_, slots)) if t is not None]
        return posted

    def drain(self) -> None:
        """Forget the receipts signalled so far (before counting those of a burst)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 1 << 16):
                pass

    def count_posts(self, expected: int, timeout: float) -> int:
        """Wait until ``expected`` receipts were signalled since :meth:`drain`, or ``timeout``.

        A receipt whose byte did not fit in the pipe (the parent was slow to read)
        is not counted, so a burst's count can only fall short, never over.
        """
        deadline = time.monotonic() + timeout
        posted = 0
        while posted < expected:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read_fd], [], [], left)[0]:
                break
            with contextlib.suppress(BlockingIOError):
                posted += len(os.read(self._read_fd, 1 << 16))
        return posted

    def resyncs(self, slots: int) -> int:
        return sum(_SLOT.unpack_from(self._mem, s * _SLOT.size)[2] for s in range(slots))

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._mem.close()
