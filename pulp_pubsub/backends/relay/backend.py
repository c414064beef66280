"""Subscribers behind ``pubsub_relay``: no PostgreSQL session per worker.

``PUBSUB_URL`` lists the relays, ``ws://a:8765,ws://b:8765`` (``wss://`` with
the ``ssl_ca_certs`` option for a private CA). A subscriber holds one
WebSocket to one relay, picked in turn so a fleet spreads over them, and
moves to the next one when its relay goes away, resyncing as after any
reconnect. The listener's liveness probe goes out to its relay and must come
back from it, so a frozen relay is left too.

Publishing, by the ``publish`` option:

``pg_notify`` (default)
    ``pg_notify`` on Django's connection, exactly as the postgres backend
    does: PostgreSQL sends at commit and stays the one source of truth, and
    every relay hears it through its LISTEN. ``notify_url`` sends on a
    connection of the layer's own to that server instead (after commit).
``direct``
    A ``publish`` frame to every relay, after commit: no NOTIFY and so no
    commit lock. A relay that cannot be reached at that moment is skipped (its
    clients, having lost it, resync when they move); the publish fails only
    when no relay took it.

The shared token is the ``token`` option or the ``PUBSUB_RELAY_TOKEN``
setting; it never appears in a message, a log line or ``describe()``.
"""

from __future__ import annotations

import itertools
import logging
import random
import ssl
import time
from collections.abc import Collection
from typing import Any, ClassVar

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from ...conf import Secret, hide_password, secret_url
from ...exceptions import ConnectionLost, MissingDependency, PublishError
from ...metrics import count
from ..aftercommit import Deferred
from ..base import BaseBackend, Transport
from ..listener import PROBE_PREFIX
from ..perprocess import PerProcess

try:
    from .direct import DirectPublisher
    from .protocol import RelayConnection, check_url
except ImportError as exc:
    raise MissingDependency("relay", "relay", exc) from exc

logger = logging.getLogger(__name__)

MODES = ("pg_notify", "direct")
#: At most one warning per process in this many seconds about unreachable relays.
WARNING_INTERVAL = 60.0
#: Publishes after commit sent to the relays in one round trip at most.
DIRECT_SLICE = 256


class RelayTransport(Transport):
    """One WebSocket to one relay, read by the subscriber's listener thread."""

    backend: RelayBackend
    # Its connection reads until the socket (and TLS) has nothing left (protocol.py).
    drained = True

    def __init__(self, backend: RelayBackend) -> None:
        super().__init__(backend)
        self._timeout = backend.config["connect_timeout"]
        self._ids = itertools.count(1)
        self._early: list[tuple[str, str | None]] = []
        self.conn = backend.connect_any()

    def fileno(self) -> int:
        return self.conn.fileno()

    def listen(self, channels: Collection[str]) -> None:
        probe = self.backend.channel_prefix + PROBE_PREFIX
        local = [c for c in channels if c.startswith(probe)]
        shared = [c for c in channels if not c.startswith(probe)]
        deadline = time.monotonic() + self._timeout
        waiting = set()
        for group, is_local in ((shared, False), (local, True)):
            if group:
                request_id = next(self._ids)
                self.conn.send(
                    deadline, type="subscribe", id=request_id, channels=group, local=is_local
                )
                waiting.add(request_id)
        while waiting:
            for frame in self.conn.read():
                if frame["type"] in ("subscribed", "error") and frame.get("id") in waiting:
                    if frame["type"] == "error":
                        raise ConnectionLost(f"the relay refused SUBSCRIBE: {frame.get('error')}")
                    waiting.discard(frame["id"])
                else:
                    self._early.extend(_items(frame))
            if waiting and not self.conn.wait(deadline):
                raise ConnectionLost(f"the relay {self.conn.url} did not confirm SUBSCRIBE in time")

    def unlisten(self, channels: Collection[str]) -> None:
        self.conn.send(
            time.monotonic() + self._timeout, type="unsubscribe", channels=list(channels)
        )

    def read(self) -> list[tuple[str, str | None]]:
        items, self._early = self._early, []
        for frame in self.conn.read():
            items.extend(_items(frame))
        return items

    def probe(self, channel: str, payload: str) -> None:
        # Out to this relay and back from it: proves the relay and the socket,
        # not only PostgreSQL (which the relay proves for itself).
        self._publish(channel, payload, notify=False)

    def send_from_listener(self, channel: str, payload: str) -> None:
        if self.backend.mode == "pg_notify":
            # NOTIFY on the relay's session: every relay, and so the asker, hears it.
            self._publish(channel, payload, notify=True)
        else:
            self.backend.send(channel, payload)

    def _publish(self, channel: str, payload: str, notify: bool) -> None:
        deadline = time.monotonic() + self.backend.config["publish_timeout"]
        self.conn.send(
            deadline,
            type="publish",
            id=next(self._ids),
            channel=channel,
            payload=payload,
            notify=notify,
        )

    def close(self) -> None:
        self.conn.close()


def _items(frame: dict[str, Any]) -> list[tuple[str, str | None]]:
    kind = frame["type"]
    if kind == "message":
        channel, payload = frame.get("channel"), frame.get("payload")
        if isinstance(channel, str) and isinstance(payload, str):
            return [(channel, payload)]
    elif kind == "resync":
        # (channel, None): "what this channel carried may be lost", a resync.
        return [(c, None) for c in frame.get("channels") or [] if isinstance(c, str)]
    elif kind == "error":
        logger.warning("The relay reported an error: %s", frame.get("error"))
    return []


class RelayBackend(BaseBackend):
    name = "relay"
    # NOTIFY's limits in both modes, so an install can switch modes without
    # finding that a payload it sends no longer fits.
    payload_limit = 7999
    allows_nul = False
    options: ClassVar[dict[str, Any]] = {
        # "pg_notify" (through PostgreSQL, at commit) or "direct" (to every relay).
        "publish": "pg_notify",
        # pg_notify mode: the Django alias to NOTIFY on (and whose transactions count).
        "database": "default",
        # pg_notify mode: a postgresql:// URL to NOTIFY on instead, after commit.
        "notify_url": None,
        # The relays' shared token; default: the PUBSUB_RELAY_TOKEN setting.
        "token": None,
        # CA bundle that signs the relays' certificates (wss://).
        "ssl_ca_certs": None,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.urls = self._check_urls(self.url)
        self.mode = self.config["publish"]
        if self.mode not in MODES:
            raise ImproperlyConfigured(
                f"Option 'publish' for RelayBackend must be one of {', '.join(MODES)}, "
                f"not {self.mode!r}."
            )
        token = self.config["token"] or getattr(settings, "PUBSUB_RELAY_TOKEN", None) or None
        if token is not None and not (isinstance(token, str) and token.isprintable()):
            raise ImproperlyConfigured("The relay token must be printable text.")
        self._token: str | None = Secret(token) if token is not None else None
        self._ssl = self._ssl_context()
        self._next = random.randrange(len(self.urls))
        self._pg: Any = None
        if self.mode == "pg_notify":
            self._pg = self._notifier()
            self.database_alias = self._pg.database_alias
            self.defers_natively = self._pg.defers_natively
        else:
            if self.config["notify_url"]:
                raise ImproperlyConfigured(
                    "Option 'notify_url' for RelayBackend needs publish='pg_notify'."
                )
            # Publishes inside atomic() on this alias wait for its commit.
            self.database_alias = self.config["database"]
        # A fork's child never writes to its parent's sockets.
        self._publisher: PerProcess[DirectPublisher] = PerProcess(
            lambda: DirectPublisher(self), DirectPublisher.close
        )
        self._warned_at: float | None = None

    def __repr__(self) -> str:
        return f"<RelayBackend {self.mode} {','.join(hide_password(u) or '' for u in self.urls)}>"

    # -- configuration -------------------------------------------------------

    @staticmethod
    def _check_urls(url: str | None) -> list[str]:
        if not url:
            raise ImproperlyConfigured(
                "The relay backend needs PUBSUB_URL, the relays: ws://host:port[,ws://host:port...]."
            )
        urls = [secret_url(part.strip()) or "" for part in url.split(",")]
        for part in urls:
            try:
                check_url(part)
            except ValueError as exc:
                raise ImproperlyConfigured(
                    f"PUBSUB_URL for the relay backend: {hide_password(part)!r} is not a ws:// or "
                    f"wss:// URL ({exc})."
                ) from None
        return urls

    def _ssl_context(self) -> ssl.SSLContext | None:
        cafile = self.config["ssl_ca_certs"]
        if not any(u.startswith("wss://") for u in self.urls):
            return None
        try:
            return ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ImproperlyConfigured(
                f"Option 'ssl_ca_certs' for RelayBackend: cannot load {cafile!r}: {exc}"
            ) from exc

    def _notifier(self) -> Any:
        try:
            from ..postgres.backend import PostgresBackend
        except ImproperlyConfigured as exc:
            raise ImproperlyConfigured(f"publish='pg_notify' for RelayBackend: {exc}") from exc
        return PostgresBackend(
            url=self.config["notify_url"],
            options={
                "database": self.config["database"],
                "publish_timeout": self.config["publish_timeout"],
                "connect_timeout": self.config["connect_timeout"],
            },
            channel_prefix=self.channel_prefix,
            publish_on_commit=self.publish_on_commit,
        )

    # -- connecting ----------------------------------------------------------

    def connect(self, url: str, timeout: float) -> RelayConnection:
        return RelayConnection(url, self._token, timeout, self._ssl)

    def connect_any(self) -> RelayConnection:
        """A connection to the next relay in turn that answers."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self.urls)
        causes = []
        for i in range(len(self.urls)):
            url = self.urls[(start + i) % len(self.urls)]
            try:
                return self.connect(url, self.config["connect_timeout"])
            except ConnectionLost as exc:
                causes.append(str(exc))
        raise ConnectionLost("no relay could be reached: " + "; ".join(causes))

    # -- publishing ----------------------------------------------------------

    def send(self, channel: str, payload: str) -> None:
        if self._pg is not None:
            try:
                self._pg.send(channel, payload)
            except PublishError as exc:
                raise PublishError(f"relay backend (pg_notify): {exc}") from exc
        else:
            self._send_direct(channel, payload)

    def _send_direct(self, channel: str, payload: str) -> None:
        failures = self._direct().send_many([(channel, payload)]).get(0, {})
        if len(failures) == len(self.urls):
            raise PublishError(self._none_took(channel, failures))
        if failures:
            self._missed([channel], failures)

    def send_batch(self, batch: list[Deferred]) -> None:
        if self._pg is not None:
            super().send_batch(batch)  # notify_url: one NOTIFY each, on the layer's connection
            return
        # Pipelined: every relay gets a slice's frames at once and answers them all,
        # one round trip per slice. A slice stays well inside a relay's send queue
        # (--send-queue), which the answers fill until the relay writes them out.
        for start in range(0, len(batch), DIRECT_SLICE):
            self._send_direct_slice(batch[start : start + DIRECT_SLICE])

    def _send_direct_slice(self, batch: list[Deferred]) -> None:
        try:
            results = self._direct().send_many([(item.wire, item.payload) for item in batch])
        except PublishError as exc:
            results = {i: dict.fromkeys(self.urls, str(exc)) for i in range(len(batch))}
        if not results:
            self.deferred_sent(batch)
            return
        missed: list[str] = []
        sent: list[Deferred] = []
        lost: list[Deferred] = []
        last_failures: dict[str, str] = {}
        first_error: PublishError | None = None
        for i, item in enumerate(batch):
            failures = results.get(i)
            if not failures:
                sent.append(item)
                continue
            if len(failures) == len(self.urls):
                first_error = first_error or PublishError(self._none_took(item.wire, failures))
                lost.append(item)
                continue
            missed.append(item.wire)
            last_failures = failures
            sent.append(item)
        self.deferred_sent(sent)
        if first_error is not None:
            self.deferred_failed(lost, first_error)
        if missed:
            self._missed(missed, last_failures)

    def _none_took(self, channel: str, failures: dict[str, str]) -> str:
        return (
            f"relay backend could not publish to {channel!r}: no relay took it ("
            + "; ".join(failures.values())
            + ")"
        )

    def _missed(self, channels: list[str], failures: dict[str, str]) -> None:
        for channel in channels:
            count(self.stats, "relays_missed", self.name, self.channel_name(channel))
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at > WARNING_INTERVAL:
            self._warned_at = now
            logger.warning(
                "A publish to %r reached %d of %d relays (%s); their clients resync "
                "when they move.",
                channels[0],
                len(self.urls) - len(failures),
                len(self.urls),
                "; ".join(failures.values()),
            )

    def _direct(self) -> DirectPublisher:
        return self._publisher.get()

    # -- subscribing ---------------------------------------------------------

    def open_transport(self) -> RelayTransport:
        return RelayTransport(self)

    # -- introspection and lifecycle -----------------------------------------

    def relay_health(self, timeout: float) -> list[dict[str, Any]]:
        """Ask every relay for its health (``pubsub_ping``); an error per unreachable one."""
        out: list[dict[str, Any]] = []
        for url in self.urls:
            started = time.monotonic()
            deadline = started + timeout
            try:
                conn = self.connect(url, timeout)
            except ConnectionLost as exc:
                out.append({"url": url, "error": str(exc)})
                continue
            try:
                conn.send(deadline, type="ping", id=1)
                pong = None
                while pong is None:
                    pong = next((f for f in conn.read() if f["type"] == "pong"), None)
                    if pong is None and not conn.wait(deadline):
                        raise ConnectionLost(f"{url} did not answer a ping within {timeout:g} s")
                pong.pop("type", None)
                pong.pop("id", None)
                out.append({"url": url, "rtt": time.monotonic() - started, **pong})
            except ConnectionLost as exc:
                out.append({"url": url, "error": str(exc)})
            finally:
                conn.close()
        return out

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["url"] = ",".join(hide_password(u) or "" for u in self.urls)
        info["publish"] = self.mode
        info["token"] = "set" if self._token else "not set"
        if self._pg is not None:
            info["publishes_on"] = (
                f"pg_notify on Django's connection {self._pg.database_alias!r}; PostgreSQL "
                "sends at commit"
                if self._pg.defers_natively
                else "pg_notify on a connection of the layer's own, after commit"
            )
        else:
            info["publishes_on"] = "a publish frame to every relay, after commit"
        # What each relay says of itself: its PostgreSQL session, its clients.
        keep = ("url", "error", "postgres", "postgres_error", "clients", "channels")
        info["relays"] = [
            {k: v for k, v in relay.items() if k in keep}
            for relay in self.relay_health(self.config["connect_timeout"])
        ]
        return info

    def subscriber_counts(self, channels: Collection[str]) -> dict[str, int] | None:
        return None

    def close(self) -> None:
        super().close()
        self._publisher.close()
        if self._pg is not None:
            self._pg.close()
