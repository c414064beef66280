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
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..perprocess import PerProcess

T = TypeVar("T")
logger = logging.getLogger(__name__)


def log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # Failures that matter reach the caller or the listener through the connection's own
    # callbacks; what is left (a connection's tasks outliving the interpreter at exit) is
    # noise on stderr, kept in the log at DEBUG instead.
    logger.debug("NATS loop: %s", context.get("message"), exc_info=context.get("exception"))


class LoopRunner:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(log_loop_error)
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


#: One loop thread per process: a forked child has none running, and never touches (nor
#: lets the collector close) the descriptors of its parent's, the epoll and wake-up sockets.
_runner: PerProcess[LoopRunner] = PerProcess(LoopRunner)


def loop_runner() -> LoopRunner:
    return _runner.get()
