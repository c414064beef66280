"""etcd: wake-ups on a Raft-replicated store, and missed messages replayed by revision.

Publishing puts the payload on the key ``<key_prefix><PUBSUB_CHANNEL_PREFIX><channel>``
(``pubsub/pulp_worker_wakeup`` by default), attached to a lease of ``lease_ttl``
seconds that the process reuses (one grant per half TTL, not one per publish),
so each channel's key disappears a little after its last message and keys never
pile up. A subscriber watches the whole range under its prefix on one
connection and keeps the channels it listens to; the watch ignores deletes
(the lease expiring).

Every put is a new revision of the store, and a watch can start at any revision
still in history. So a subscriber keeps the revision of the last event it saw,
and after a reconnect its new watch starts at the next one: what was published
during the gap arrives, in order, instead of a resync. Only when etcd has
compacted that revision away does the subscriber get a resync (and a watch from
the oldest revision kept), or when the store's revisions went back (rebuilt,
restored from a backup: a resync and a watch from now). How far back replay
reaches is the server's compaction setting
(``--auto-compaction-mode``/``--auto-compaction-retention``), see
docs/backends.md.

Where the server is: ``PUBSUB_URL`` = ``etcd://[user:password@]host[:2379][,host2[:2379]...]``
(``http://`` is the same); ``etcds://`` or ``https://`` use TLS, with the
``ca_file``, ``cert_file`` and ``key_file`` options for a private CA and client
certificates. Several hosts are members of one cluster: publishing moves to the
next member when one fails, within ``publish_timeout``; a subscriber reconnects
to the next one and replays.

The client is a small HTTP one for etcd's v3 JSON gateway
(:mod:`pulp_pubsub.backends.etcd.gateway`; publishing, failover, login and the lease
in :mod:`pulp_pubsub.backends.etcd.client`), so the backend needs no extra package.
"""

from __future__ import annotations

import random
import ssl
import time
from collections.abc import Collection, Iterator
from typing import Any, ClassVar

from django.core.exceptions import ImproperlyConfigured

from ...conf import Secret
from ...exceptions import ConnectionLost, PublishError
from ..base import BaseBackend, Transport
from ..perprocess import PerProcess
from .client import EtcdClient, Unavailable, authenticate, describe_error, parse_url
from .gateway import (
    Connection,
    Endpoint,
    EtcdError,
    HttpReader,
    b64,
    check_answer,
    request_bytes,
    unb64,
)

DEFAULT_URL = "etcd://localhost:2379"
#: etcd's default ``--max-request-bytes`` (1.5 MiB), less room for the key and the framing.
MAX_REQUEST_BYTES = 1_572_864
KEY_ROOM = 1024


class EtcdBackend(BaseBackend):
    name = "etcd"
    payload_limit: int | None = MAX_REQUEST_BYTES - KEY_ROOM
    allows_nul = True
    options: ClassVar[dict[str, Any]] = {
        # Keys live under this prefix (then PUBSUB_CHANNEL_PREFIX, then the channel).
        "key_prefix": "pubsub/",
        # Seconds a channel's key outlives its last message.
        "lease_ttl": 60,
        # With several members: seconds one may take to answer before a publish
        # tries the next (publish_timeout bounds the whole publish).
        "request_timeout": 1.0,
        # Credentials when not in the URL (Django's error page hides a "password" key).
        "username": "",
        "password": "",
        # TLS (etcds:// or https://): a private CA, and a client certificate and key.
        "ca_file": "",
        "cert_file": "",
        "key_file": "",
    }

    def __init__(
        self,
        url: str | None = None,
        options: dict[str, Any] | None = None,
        channel_prefix: str = "",
        publish_on_commit: bool = True,
    ) -> None:
        super().__init__(url or DEFAULT_URL, options, channel_prefix, publish_on_commit)
        hosts, tls, username, password = parse_url(self.url or DEFAULT_URL)
        for key in ("key_prefix", "ca_file", "cert_file", "key_file", "username", "password"):
            if not isinstance(self.config[key], str):
                raise ImproperlyConfigured(
                    f"Option {key!r} for {type(self).__name__} must be a string."
                )
        if username is None and self.config["username"]:
            username, password = self.config["username"], self.config["password"]
            if not password:
                raise ImproperlyConfigured("Option 'username' for EtcdBackend needs 'password'.")
        elif self.config["password"] and username is None:
            raise ImproperlyConfigured("Option 'password' for EtcdBackend needs 'username'.")
        self.username: str | None = username
        # A Secret: tracebacks, debuggers and error reporters show it as '***'.
        self.password: Secret | None = None if password is None else Secret(password)
        self.key_prefix = self.config["key_prefix"]
        if not self.key_prefix:
            # The watch covers the prefix's range: an empty one would be the whole store.
            raise ImproperlyConfigured("Option 'key_prefix' must not be empty.")
        if len(self.key_prefix.encode()) > KEY_ROOM // 2:
            raise ImproperlyConfigured(f"Option 'key_prefix' is longer than {KEY_ROOM // 2} bytes.")
        if self.config["lease_ttl"] < 5:
            raise ImproperlyConfigured("Option 'lease_ttl' must be at least 5 seconds.")
        context = self._tls_context() if tls else None
        if not tls and any(self.config[k] for k in ("ca_file", "cert_file", "key_file")):
            raise ImproperlyConfigured(
                "The options ca_file, cert_file and key_file need an etcds:// or https:// URL."
            )
        self.endpoints = [Endpoint(host, port, context) for host, port in hosts]
        # A forked child never uses its parent's sockets (nor closes them).
        self._client: PerProcess[EtcdClient] = PerProcess(
            lambda: EtcdClient(self), EtcdClient.close
        )
        # Each process starts at a member of its own, so a fleet spreads over the cluster.
        self._next_endpoint = random.randrange(len(self.endpoints))

    def _tls_context(self) -> ssl.SSLContext:
        ca, cert, key = (self.config[k] or None for k in ("ca_file", "cert_file", "key_file"))
        try:
            context = ssl.create_default_context(cafile=ca)
            if cert:
                context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ImproperlyConfigured(f"etcd TLS files could not be loaded: {exc}") from exc
        if key and not cert:
            raise ImproperlyConfigured("Option 'key_file' needs 'cert_file'.")
        return context

    def __repr__(self) -> str:
        return f"<EtcdBackend {', '.join(map(str, self.endpoints))} prefix={self.key_prefix!r}>"

    # -- names -----------------------------------------------------------------

    def key(self, wire: str) -> bytes:
        return (self.key_prefix + wire).encode()

    def range(self) -> tuple[bytes, bytes]:
        """The keys of this install: everything under key_prefix + PUBSUB_CHANNEL_PREFIX."""
        start = (self.key_prefix + self.channel_prefix).encode()
        return start, _prefix_end(start)

    # -- publishing --------------------------------------------------------------

    @property
    def client(self) -> EtcdClient:
        return self._client.get()

    def send(self, channel: str, payload: str) -> None:
        deadline = time.monotonic() + self.config["publish_timeout"]
        try:
            self.client.put(self.key(channel), payload.encode(), deadline)
        except (Unavailable, EtcdError) as exc:
            raise PublishError(f"etcd backend could not publish to {channel!r}: {exc}") from exc

    # -- subscribing -------------------------------------------------------------

    def open_transport(self) -> EtcdTransport:
        return EtcdTransport(self)

    def pick_endpoint(self) -> int:
        """Members in turn, so subscribers move on to the next after a failure."""
        with self._lock:
            idx = self._next_endpoint % len(self.endpoints)
            self._next_endpoint += 1
            return idx

    # -- introspection and lifecycle ---------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "endpoints": [str(e) for e in self.endpoints],
            "key_prefix": self.key_prefix,
            "lease_ttl": self.config["lease_ttl"],
            "user": self.username,
            "subscribers": "etcd does not list watchers; pubsub_channels --live asks them",
        }

    def close(self) -> None:
        super().close()
        self._client.close()


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's range_end)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return b"\x00"  # the whole key space
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


class EtcdTransport(Transport):
    """One watch stream: a socket whose readability means events (or its end) arrived."""

    backend: EtcdBackend

    def __init__(self, backend: EtcdBackend) -> None:
        super().__init__(backend)
        self._listening: set[str] = set()
        self._start: int | None = None
        self._revision: int | None = None
        self._reader: HttpReader | None = None
        self._backlog: list[dict[str, Any]] = []
        self._token: str | None = None
        self._conn: Connection | None = None
        self._owed_resync = False
        self._connect()

    def _connect(self) -> None:
        """Connect (and log in) to the next member that answers, within connect_timeout."""
        backend = self.backend
        deadline = time.monotonic() + backend.config["connect_timeout"]
        failures = []
        for _ in backend.endpoints:
            endpoint = backend.endpoints[backend.pick_endpoint()]
            conn = Connection(endpoint)
            try:
                if backend.username is not None:
                    self._token = authenticate(conn, backend, deadline)
                    conn.close()
                conn.sock = endpoint.connect(deadline)
                self._conn = conn
                return
            except (OSError, ValueError, EtcdError) as exc:
                conn.close()
                failures.append(f"{endpoint}: {describe_error(exc)}")
                if time.monotonic() >= deadline:
                    break
        raise ConnectionLost(f"no etcd member reachable ({'; '.join(failures)})")

    def fileno(self) -> int:
        if self._conn is None or self._conn.sock is None:
            raise ConnectionLost("the etcd watch is closed")
        return int(self._conn.sock.fileno())

    def position(self) -> int | None:
        return self._revision

    def resume(self, position: Any) -> bool:
        self._start = int(position) + 1
        return True

    def listen(self, channels: Collection[str]) -> None:
        self._listening.update(channels)
        if self._reader is None:
            self._watch()

    def unlisten(self, channels: Collection[str]) -> None:
        self._listening.difference_update(channels)

    def _watch(self) -> None:
        """Open the watch of the install's range and wait until etcd confirms it."""
        assert self._conn is not None and self._conn.sock is not None
        sock = self._conn.sock
        start, end = self.backend.range()
        create: dict[str, Any] = {"key": b64(start), "range_end": b64(end), "filters": ["NODELETE"]}
        if self._start is not None:
            create["start_revision"] = str(self._start)
        deadline = time.monotonic() + self.backend.config["connect_timeout"]
        self._reader = reader = HttpReader()
        sock.settimeout(self.backend.config["connect_timeout"])
        sock.sendall(
            request_bytes(self._conn.endpoint, "/v3/watch", {"create_request": create}, self._token)
        )
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConnectionLost(f"etcd at {self._conn.endpoint} did not confirm the watch")
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                raise ConnectionLost(f"etcd at {self._conn.endpoint} closed the watch")
            reader.feed(data)
            if reader.status is not None and reader.status >= 400:
                if reader.done:
                    check_answer(reader, reader.take_json())
                continue
            objs = reader.take_json()
            for i, obj in enumerate(objs):
                result = obj.get("result") or {}
                if result.get("created"):
                    current = int(result["header"]["revision"])
                    if self._start is None:
                        # Watching from now: everything after this revision will come.
                        self._revision = current
                    elif current < self._start - 1 and self._store_behind(self._start - 1):
                        self._restart_from_now()
                        return
                    self._backlog.extend(objs[i + 1 :])
                    sock.setblocking(False)
                    return
                self._backlog.append(obj)
                self._raise_if_error(obj)

    def _store_behind(self, revision: int) -> bool:
        """Whether the cluster itself (not just a lagging member) is before ``revision``.

        A store rebuilt from scratch or restored from an older backup starts
        its revisions again: a watch from the revision after the last one
        seen would then wait silently past every new message. A quorum read
        tells a member that merely lags from a store that went back.
        """
        assert self._conn is not None
        start, end = self.backend.range()
        body = {"key": b64(start), "range_end": b64(end), "limit": "1", "count_only": True}
        conn = Connection(self._conn.endpoint)
        try:
            deadline = time.monotonic() + self.backend.config["connect_timeout"]
            answer = conn.call("/v3/kv/range", body, deadline, self._token)
        except (OSError, ValueError, EtcdError) as exc:
            raise ConnectionLost(f"etcd at {conn.endpoint}: {describe_error(exc)}") from exc
        finally:
            conn.close()
        return int(answer["header"]["revision"]) < revision

    def _restart_from_now(self) -> None:
        """The history we would resume from does not exist: watch from now, owe a resync."""
        assert self._conn is not None
        self._conn.close()
        self._reader, self._start, self._backlog = None, None, []
        self._connect()
        self._watch()
        self._owed_resync = True

    def _raise_if_error(self, obj: dict[str, Any]) -> None:
        if "error" in obj:
            error = obj["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise ConnectionLost(f"etcd ended the watch: {message}")

    def read(self) -> Iterator[tuple[str, str | None]]:
        self.drained = False
        if self._conn is None or self._conn.sock is None or self._reader is None:
            return
        if self._owed_resync:
            self._owed_resync = False
            yield from ((wire, None) for wire in sorted(self._listening))
        sock, reader = self._conn.sock, self._reader
        objs, self._backlog = self._backlog, []
        closed = False
        while True:
            try:
                data = sock.recv(262144)
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            if not data:
                closed = True
                break
            reader.feed(data)
        objs += reader.take_json()
        if objs:
            self.heard_at = time.monotonic()
        for obj in objs:
            self._raise_if_error(obj)
            result = obj.get("result") or {}
            if result.get("canceled"):
                compacted = int(result.get("compact_revision") or 0)
                if not compacted:
                    reason = result.get("cancel_reason") or "no reason given"
                    raise ConnectionLost(f"etcd cancelled the watch: {reason}")
                yield from self._after_compaction(compacted)
                return
            for event in result.get("events") or ():
                kv = event.get("kv") or {}
                revision = int(kv.get("mod_revision") or 0)
                wire = _wire(unb64(kv.get("key", "")), self.backend.key_prefix)
                self._revision = max(self._revision or 0, revision)
                if wire is not None and wire in self._listening:
                    yield wire, unb64(kv.get("value", "")).decode("utf-8", "replace")
        if closed or reader.done:
            raise ConnectionLost(f"etcd at {self._conn.endpoint} closed the watch stream")
        # The socket was read until it would block, and every whole event taken.
        self.drained = True

    def _after_compaction(self, compacted: int) -> Iterator[tuple[str, None]]:
        """The revision to resume from is gone: watch from the oldest one kept, then resync.

        In this order, so nothing after the compaction is missed, and every
        channel's handlers look again for what was compacted away.
        """
        assert self._conn is not None
        self._conn.close()
        self._reader, self._start, self._backlog = None, compacted, []
        self._connect()
        self._watch()
        for wire in sorted(self._listening):
            yield wire, None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _wire(key: bytes, prefix: str) -> str | None:
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return None
    return text[len(prefix) :] if text.startswith(prefix) else None
