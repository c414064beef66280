"""Non-blocking pipes that turn "something happened" into a readable descriptor.

They let threads wake a ``select()``: the subscriber's ``fileno()``, the
listener's control channel, and the memory backend's connections.
"""

from __future__ import annotations

import math
import os
import select
from collections.abc import Iterable


def make_pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    return read_fd, write_fd


def poke(fd: int) -> None:
    try:
        os.write(fd, b"\0")
    except OSError:
        pass  # a full pipe is already readable, and a closed one has no reader


def drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass


def close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


#: A peer that closed its end (Linux); elsewhere only the hang-ups poll always reports.
POLLRDHUP = getattr(select, "POLLRDHUP", 0)


def wait_readable(fds: list[int], timeout: float | None, hangups: Iterable[int] = ()) -> set[int]:
    """The descriptors of ``fds`` that turn readable within ``timeout`` seconds.

    ``poll()`` rather than ``select()``: a busy process (a Pulp API worker
    with many sockets) may hand out descriptor numbers above select's 1023.
    Hang-ups and errors count as readable, so the reader finds out. Of
    ``hangups``, only a closed or failed connection counts, not data.
    """
    poller = select.poll()
    for fd in hangups:
        poller.register(fd, POLLRDHUP)
    for fd in fds:
        poller.register(fd, select.POLLIN)
    millis = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return {fd for fd, _ in poller.poll(millis)}
