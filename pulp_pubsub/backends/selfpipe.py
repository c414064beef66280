"""Non-blocking pipes that turn "something happened" into a readable descriptor.

They let threads wake a ``select()``: the subscriber's ``fileno()``, the
listener's control channel, and the memory backend's connections.
"""

from __future__ import annotations

import os


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
