"""PerProcess across a real fork(): a child makes its own object and never closes its parent's."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
from collections.abc import Callable

from pulp_pubsub.backends.perprocess import Origin, PerProcess

PATIENCE = 30.0


class Line:
    """A connection stand-in whose close() is seen by the other process too.

    ``shutdown()`` acts on the socket both processes share after fork(), not on one
    process's descriptor: a child that closed its parent's line would cut the parent's.
    """

    def __init__(self) -> None:
        self.near, self.far = socket.socketpair()
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.near.shutdown(socket.SHUT_RDWR)
        self.near.close()

    def works(self) -> bool:
        self.near.sendall(b"x")
        return self.far.recv(1) == b"x"


def in_child(body: Callable[[], bytes]) -> bytes:
    """Run ``body`` in a forked child and return what it answered (it must answer in time)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        answer = b"child raised"
        try:
            answer = body()
        finally:
            os.write(write_fd, answer)
            os._exit(0)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], PATIENCE)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        answer = os.read(read_fd, 100) if ready else b"no answer in time"
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    return answer


def test_get_makes_one_object_per_process_and_close_closes_it():
    holder: PerProcess[Line] = PerProcess(Line, Line.close)
    first = holder.get()
    assert holder.get() is first and holder.peek() is first
    holder.close()
    assert first.closed and holder.peek() is None
    second = holder.get()
    assert second is not first and not second.closed
    holder.close()


def test_a_forked_child_makes_its_own_and_never_closes_the_parents():
    holder: PerProcess[Line] = PerProcess(Line, Line.close)
    parents = holder.get()

    def child() -> bytes:
        inherited_hidden = holder.peek() is None
        holder.close()  # holds the parent's line only: closes nothing
        mine = holder.get()
        fresh = mine is not parents and holder.get() is mine and mine.works()
        holder.close()
        return b"%d%d%d" % (inherited_hidden, fresh, mine.closed and not parents.closed)

    assert in_child(child) == b"111"
    assert holder.get() is parents
    assert not parents.closed and parents.works()
    holder.close()
    assert parents.closed


def test_a_child_forked_while_a_parent_thread_was_making_one_does_not_wait_for_it():
    parent_pid = os.getpid()
    building, release = threading.Event(), threading.Event()

    def slow_line() -> Line:
        if os.getpid() == parent_pid:
            building.set()
            release.wait(PATIENCE)  # holds the holder's lock meanwhile
        return Line()

    holder: PerProcess[Line] = PerProcess(slow_line, Line.close)
    maker = threading.Thread(target=holder.get)
    maker.start()
    try:
        assert building.wait(PATIENCE)
        # The child's copy of the lock would stay held forever without a fresh one.
        assert in_child(lambda: b"ok" if holder.get().works() else b"bad") == b"ok"
    finally:
        release.set()
        maker.join(PATIENCE)
    assert holder.get().works()
    holder.close()


def test_set_and_peek_hold_nothing_across_fork():
    holder: PerProcess[str] = PerProcess()
    holder.set("parent's")
    assert holder.peek() == "parent's"
    assert in_child(lambda: b"none" if holder.peek() is None else b"seen") == b"none"
    holder.set(None)
    assert holder.peek() is None


def test_origin_is_here_only_in_the_process_that_made_it():
    origin = Origin()
    assert origin.here()
    assert in_child(lambda: b"here" if origin.here() else b"elsewhere") == b"elsewhere"
