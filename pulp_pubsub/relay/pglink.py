"""The relay's one PostgreSQL session, LISTENing for all of its clients.

It runs on a thread of its own through the PostgreSQL backend's transport
(deadline-bound libpq calls, channel names as identifiers), and talks to the
relay's event loop only through ``call_soon_threadsafe``. Being connected is
not taken as hearing: after every (re)connect, and every ``probe_interval``,
it NOTIFYs a private channel and must hear it back within ``probe_timeout``.
A session behind a transaction pooler hears nothing, and the relay says so
instead of going silently deaf.

Its backoff, LISTEN diff and probe clock are the subscribers' own
(:mod:`pulp_pubsub.backends.listener.upkeep`); only what it does with what it
reads is its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..backends.listener.upkeep import Backoff, Probe, listen_to
from ..backends.postgres.backend import PostgresBackend, PostgresTransport
from ..backends.selfpipe import drain, make_pipe, poke, wait_readable
from ..exceptions import Deaf

logger = logging.getLogger(__name__)

Batch = list[tuple[str, str]]
#: The first wait after a lost session; it doubles up to ``reconnect_max``.
RECONNECT_MIN = 0.1


class PgLink:
    def __init__(
        self,
        backend: PostgresBackend,
        loop: asyncio.AbstractEventLoop,
        *,
        on_up: Callable[[], None],
        on_down: Callable[[str], None],
        on_batch: Callable[[Batch], None],
        probe_interval: float = 30.0,
        probe_timeout: float = 10.0,
        reconnect_max: float = 5.0,
    ) -> None:
        self.backend = backend
        self._loop = loop
        self._on_up, self._on_down, self._on_batch = on_up, on_down, on_batch
        self.probe_interval, self.probe_timeout = probe_interval, probe_timeout
        self.reconnect_max = reconnect_max
        self.probe_channel = f"pubsub_relay_probe_{uuid.uuid4().hex[:12]}"
        self.state = "connecting"
        self.last_error: str | None = None
        self.probe_rtt: float | None = None
        self.connects = 0
        #: Where the session goes, for operators (never a password).
        self.where = ""
        self._lock = threading.Lock()
        self._wanted: frozenset[str] = frozenset()
        self._waiters: list[Future[bool]] = []
        self._notifies: deque[tuple[str, str]] = deque()
        self._wake_r, self._wake_w = make_pipe()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pubsub-relay-pg", daemon=True)

    # -- called from the event loop ----------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        poke(self._wake_w)
        self._thread.join(self.backend.config["connect_timeout"] + 2)

    def update(self, wanted: frozenset[str]) -> Future[bool]:
        """LISTEN to exactly ``wanted``; the future says whether it is in force.

        False when PostgreSQL is down: the channels are LISTENed on reconnect,
        which sends every client a resync.
        """
        future: Future[bool] = Future()
        with self._lock:
            self._wanted = wanted
            self._waiters.append(future)
        poke(self._wake_w)
        return future

    def notify(self, channel: str, payload: str) -> bool:
        """Queue a NOTIFY on the relay's session; False when PostgreSQL is down."""
        if self.state != "listening":
            return False
        with self._lock:
            self._notifies.append((channel, payload))
        poke(self._wake_w)
        return True

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(RECONNECT_MIN, self.reconnect_max)
        warned = False
        while not self._stopped.is_set():
            transport: PostgresTransport | None = None
            try:
                transport = PostgresTransport(self.backend)
                listening: set[str] = set()
                self._apply(transport, listening)
                self.probe_rtt = self._prove(transport, initial=True)
                self.state, self.last_error = "listening", None
                backoff.reset()
                self.connects += 1
                if warned:
                    logger.warning("Relay: PostgreSQL is back; telling every client to resync.")
                warned = False
                self._loop.call_soon_threadsafe(self._on_up)
                self._serve(transport, listening)
            except Exception as exc:
                if self._stopped.is_set():
                    break
                cause = f"{type(exc).__name__}: {exc}"
                if not warned:
                    logger.warning("Relay: PostgreSQL session lost (%s); reconnecting.", cause)
                    warned = True
                was_up, self.state, self.last_error = self.state == "listening", "down", cause
                if was_up:
                    self._loop.call_soon_threadsafe(self._on_down, cause)
            finally:
                self.state = "down" if not self._stopped.is_set() else "stopped"
                self._resolve(False)
                with self._lock:
                    self._notifies.clear()
                if transport is not None:
                    try:
                        transport.close()
                    except Exception:
                        logger.debug("Closing a dead PostgreSQL session failed", exc_info=True)
            backoff.wait(self._stopped, self._wake_r, self._release)

    def _release(self) -> None:
        """Down: an update() cannot be in force before the next connect."""
        self._resolve(False)

    def _resolve(self, applied: bool, upto: int | None = None) -> None:
        with self._lock:
            done = self._waiters[:upto] if upto is not None else self._waiters
            self._waiters = self._waiters[len(done) :]
        for future in done:
            if not future.done():
                future.set_result(applied)

    def _apply(self, transport: PostgresTransport, listening: set[str]) -> None:
        with self._lock:
            wanted = set(self._wanted) | {self.probe_channel}
            upto = len(self._waiters)
        listen_to(transport, listening, wanted)
        self._resolve(True, upto)

    def _prove(self, transport: PostgresTransport, initial: bool = False) -> float:
        """A NOTIFY round trip on the private channel; the notifications read meanwhile pass on."""
        probe = Probe(self.probe_interval, self.probe_timeout)
        transport.send_from_listener(self.probe_channel, probe.send(time.monotonic()))
        while True:
            rtt = self._take(transport.read(), probe)
            if rtt is not None:
                return rtt
            left = probe.deadline - time.monotonic()
            if left <= 0 or self._stopped.is_set():
                break
            wait_readable([transport.fileno()], left)
        if initial:
            raise Deaf(
                f"connected and LISTENing, but its own NOTIFY did not come back within "
                f"{self.probe_timeout:g} s: is the relay's database connection going through a "
                "transaction pooler (PgBouncer)? Point the relay at PostgreSQL itself."
            )
        raise Deaf(f"the liveness NOTIFY did not come back within {self.probe_timeout:g} s")

    def _take(self, items: Any, probe: Probe) -> float | None:
        """Pass notifications on; the probe's round trip when its token came back."""
        batch: Batch = []
        rtt = None
        for channel, payload in items:
            if channel == self.probe_channel:
                if rtt is None:
                    rtt = probe.answered(payload)
            else:
                batch.append((channel, payload))
        if batch:
            self._loop.call_soon_threadsafe(self._on_batch, batch)
        return rtt

    def _serve(self, transport: PostgresTransport, listening: set[str]) -> None:
        probe = Probe(self.probe_interval, self.probe_timeout)
        while not self._stopped.is_set():
            wait = probe.due() - time.monotonic()
            ready = wait_readable([transport.fileno(), self._wake_r], max(wait, 0))
            if self._stopped.is_set():
                return
            if self._wake_r in ready:
                drain(self._wake_r)
                self._apply(transport, listening)
                while True:
                    with self._lock:
                        if not self._notifies:
                            break
                        channel, payload = self._notifies.popleft()
                    transport.send_from_listener(channel, payload)
            rtt = self._take(transport.read(), probe)
            if rtt is not None:
                self.probe_rtt = rtt
            now = time.monotonic()
            if probe.overdue(now):
                raise Deaf(f"the liveness NOTIFY did not come back within {self.probe_timeout:g} s")
            if probe.is_due(now):
                transport.send_from_listener(self.probe_channel, probe.send(now))
