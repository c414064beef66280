"""One asyncio loop per process, on a daemon thread, for the NATS backend's connections.

nats-py is asyncio only, while the layer's callers are plain threads (a Pulp
worker's main loop, gunicorn workers). Their calls are handed to this loop
and waited for with a deadline; a call that overruns it is cancelled, so a
frozen server can never hold a caller longer than the timeout it asked for.
A forked child gets a loop of its own: the parent's thread does not exist
there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Failures that matter reach the caller or the listener through the connection's own
    # callbacks; what is left (a connection's tasks outliving the interpreter at exit) is
    # noise on stderr, kept in the log at DEBUG instead.
    logger.debug("NATS loop: %s", context.get("message"), exc_info=context.get("exception"))


class LoopRunner:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_log_loop_error)
        self.thread = threading.Thread(
            target=self._run_forever, name="pubsub-nats-loop", daemon=True
        )
        self.thread.start()

    def _run_forever(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait at most ``timeout`` seconds for it.

        Raises TimeoutError (after cancelling it) when it overruns.
        """
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a blocking NATS call was made on the NATS loop's own thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer within {timeout:g} s") from None

    def submit(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` on the loop without waiting for it."""
        asyncio.run_coroutine_threadsafe(coro, self.loop)


_runner: LoopRunner | None = None
_lock = threading.Lock()
#: Runners inherited through fork(), kept so that collecting them never closes
#: descriptors (the epoll and wake-up sockets) that the parent still uses.
_inherited: list[LoopRunner] = []


def loop_runner() -> LoopRunner:
    global _runner
    runner = _runner
    if runner is not None and runner.pid == os.getpid():
        return runner
    with _lock:
        if _runner is None or _runner.pid != os.getpid():
            if _runner is not None:
                _inherited.append(_runner)
            _runner = LoopRunner()
        return _runner


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
