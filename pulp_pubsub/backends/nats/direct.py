"""Core NATS publishes made in the publishing thread, on an event loop of the publisher's own.

A publish handed to the process's NATS loop thread (:mod:`.loop`) and waited for there costs
two thread wake-ups besides the server's round trip: the loop thread's, to send, and the
caller's, once the server's PONG came back; on a loaded machine those two cost about as much
as the round trip itself, on both sides of every message the benchmark's ping-pong carries.
Here the publisher's connection lives on an event loop of its own that runs only inside a
publish, in the thread making it (under the publisher's lock), as a plain asyncio program
runs nats-py: PUB, PING, and the PONG read by the caller's own thread. What a publish waits
for and may raise is unchanged: the server's PONG, within ``publish_timeout``.

Between publishes nobody reads that connection, so the server's PINGs wait in its socket
and a server that closed it (restarted, or after two unanswered PINGs) is not noticed. So a
publish first lets the loop take what waits (a turn of the selector, a turn of nats-py's
reader), and a connection found closed is made again before any message is put on it: a
message is never sent twice.

A thread that runs an asyncio loop of its own cannot run this one; the backend sends its
publishes through the loop thread as before (see ``NatsBackend._deliver``).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client

from .loop import log_loop_error

#: Loop turns a publish lets pass before it sends: one for the selector to find the socket
#: readable, one for nats-py's reader to take what came (a close sets its state there).
CATCH_UP_TURNS = 2
#: Seconds a failed publish waits for its dropped connection's goodbye (its socket is closed
#: before): the publish stays within ``publish_timeout`` and a little more.
DROP_WAIT = 0.1


#: Every publisher not closed yet, so that an unclosed backend's connection stays alive as it
#: would on the loop thread (collected, its loop would be closed under its pending tasks); a
#: forked child keeps its parent's untouched (see :mod:`..perprocess`).
_open: set[DirectPublisher] = set()


def can_run_here() -> bool:
    """Whether this thread may run a loop of its own (it is not running one now)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


class DirectPublisher:
    """One process's core NATS publishing connection on its own loop; the caller's lock held.

    ``connect`` makes a connection (on the running loop); ``abandon`` closes one whose
    state is unknown without waiting on its server.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Client]],
        abandon: Callable[[Client], Awaitable[None]],
    ) -> None:
        self._connect = connect
        self._abandon = abandon
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(log_loop_error)
        self._nc: Client | None = None
        self._pid = os.getpid()
        _open.add(self)

    def publish(self, wire: str, data: bytes, deadline: float) -> None:
        """Send ``data`` to ``wire`` and wait for the server's PONG, until ``deadline``.

        Raises what nats-py raised, or TimeoutError; the connection is then dropped, and
        the next publish makes a new one.
        """
        try:
            self._loop.run_until_complete(self._send(wire, data, deadline))
        except BaseException:
            self._drop()
            raise

    async def _send(self, wire: str, data: bytes, deadline: float) -> None:
        nc = self._nc
        if nc is not None:
            # What reached the socket since the last publish is read first: a server's
            # PING is answered, and a connection the server closed or reset (restarted,
            # killed, or tired of unanswered PINGs) is found before a message is put on it.
            for _ in range(CATCH_UP_TURNS):
                await asyncio.sleep(0)
            if not nc.is_connected:
                await self._abandon(nc)
                nc = self._nc = None
        if nc is None:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                nc = self._nc = await self._connect()
        await nc.publish(wire, data)
        # nats-py annotates the timeout as int; it takes seconds as a float.
        await nc.flush(_left(deadline))  # type: ignore[arg-type]

    def _drop(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            try:
                # Its socket is closed at once; the rest may not hold the caller up.
                self._loop.run_until_complete(asyncio.wait_for(self._abandon(nc), DROP_WAIT))
            except BaseException:
                pass
        _cancel_all(self._loop)

    def close(self, timeout: float) -> None:
        """Close the connection and the loop; from a thread running a loop, on a helper."""
        if can_run_here():
            self._close(timeout)
        else:
            closer = threading.Thread(target=self._close, args=(timeout,), daemon=True)
            closer.start()
            closer.join(timeout + 1)

    def _close(self, timeout: float) -> None:
        if self._loop.is_running():
            # Another thread is inside a publish (at exit, say): its connection is left to
            # it, and the process's end.
            return
        _open.discard(self)
        nc, self._nc = self._nc, None
        try:
            if nc is not None:
                self._loop.run_until_complete(asyncio.wait_for(nc.close(), timeout))
        except BaseException:
            pass
        finally:
            _cancel_all(self._loop)
            self._loop.close()


@atexit.register
def _close_all() -> None:
    """At exit, this process's connections say goodbye; none is left to the collector."""
    for publisher in list(_open):
        if publisher._pid == os.getpid():
            publisher.close(1.0)


def _left(deadline: float) -> float:
    """nats-py's flush() refuses a timeout of zero: the smallest it takes, at the deadline."""
    return max(deadline - time.monotonic(), 0.001)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """End the tasks a closed connection left on ``loop``, so none is destroyed pending."""
    tasks: set[asyncio.Task[Any]] = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        try:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        except BaseException:
            pass
