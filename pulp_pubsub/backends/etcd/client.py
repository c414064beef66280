"""The etcd backend's client side: where the members are, and publishing to them.

One :class:`EtcdClient` per backend and process. It keeps a keep-alive
connection per member, sends each call to the member that answered last and,
when that one fails or stalls, to the next, until the caller's deadline.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from django.core.exceptions import ImproperlyConfigured

from ...conf import Secret, hide_password
from ...exceptions import ConnectionLost
from ..hostlist import parse_credentials, parse_hosts
from .gateway import Connection, Endpoint, EtcdError, b64

DEFAULT_PORT = 2379
_SCHEMES = {"etcd": False, "http": False, "etcds": True, "https": True}


def parse_url(url: str) -> tuple[list[tuple[str, int]], bool, str | None, str | None]:
    """(hosts, tls, username, password) from ``scheme://[user:pw@]h[:p][,h2[:p]]``."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ImproperlyConfigured(
            f"PUBSUB_URL {hide_password(url)!r} is not an etcd URL: expected "
            "etcd://host:2379[,host2:2379] (or etcds://, http://, https://)."
        )
    tls = _SCHEMES[scheme.lower()]
    userinfo, at, hostlist = rest.rpartition("@")
    hostlist = hostlist.rstrip("/")
    if "/" in hostlist or "?" in hostlist or "#" in hostlist:
        raise ImproperlyConfigured(
            f"PUBSUB_URL {hide_password(url)!r}: an etcd URL has no path or query; "
            "TLS files and the key prefix are PUBSUB_OPTIONS."
        )
    username = password = None
    if at:
        username, password = parse_credentials(userinfo, url, "etcd authentication")
    hosts = parse_hosts(hostlist, DEFAULT_PORT, url)
    return hosts, tls, username, password


class Unavailable(Exception):
    """No member answered in time; the message names each member's failure."""


class Cluster(Protocol):
    """What a client, and a login, need to know of the backend they serve."""

    @property
    def endpoints(self) -> Sequence[Endpoint]: ...

    @property
    def username(self) -> str | None: ...

    @property
    def password(self) -> str | None: ...

    @property
    def config(self) -> Mapping[str, Any]: ...


class EtcdClient:
    """The members of one cluster, with failover, a token and the publishing lease.

    One per backend and process; calls are serialised by a lock (a publish is
    one small request) and bounded by the caller's deadline, lock wait included.
    """

    def __init__(self, backend: Cluster) -> None:
        self.backend = backend
        self.endpoints = backend.endpoints
        self._conns = [Connection(e) for e in self.endpoints]
        self._current = random.randrange(len(self.endpoints))
        self._token: str | None = None
        self._lease: str | None = None
        self._lease_renew_at = 0.0
        self._lock = threading.Lock()

    def put(self, key: bytes, value: bytes, deadline: float) -> None:
        if not self._lock.acquire(timeout=max(deadline - time.monotonic(), 0)):
            raise Unavailable("publishing is stuck behind another publish in this process")
        try:
            for _ in range(2):
                lease = self._ensure_lease(deadline)
                body = {"key": b64(key), "value": b64(value), "lease": lease}
                try:
                    self._call("/v3/kv/put", body, deadline)
                    return
                except EtcdError as exc:
                    if "lease not found" not in exc.message:
                        raise
                    self._lease = None  # revoked or expired meanwhile: grant a new one
            raise Unavailable("the publishing lease vanished twice in a row")
        finally:
            self._lock.release()

    def _ensure_lease(self, deadline: float) -> str:
        now = time.monotonic()
        if self._lease is None or now >= self._lease_renew_at:
            ttl = int(self.backend.config["lease_ttl"])
            answer = self._call("/v3/lease/grant", {"TTL": ttl}, deadline)
            # Reused for half its life, so no key outlives its last put by more than the TTL.
            self._lease, self._lease_renew_at = str(answer["ID"]), now + ttl / 2
        return self._lease

    def _call(self, path: str, body: dict[str, Any], deadline: float) -> dict[str, Any]:
        failures: dict[str, str] = {}
        n = len(self.endpoints)
        rounds = 0
        while True:
            for i in range(n):
                idx = (self._current + i) % n
                conn = self._conns[idx]
                try:
                    return self._call_one(conn, path, body, deadline, idx)
                except EtcdError as exc:
                    if not exc.retryable:
                        raise
                    failures[str(conn.endpoint)] = exc.message
                except (OSError, ValueError) as exc:
                    failures[str(conn.endpoint)] = describe_error(exc)
                if time.monotonic() >= deadline:
                    break
            rounds += 1
            left = deadline - time.monotonic()
            if left <= 0:
                tried = "; ".join(f"{e}: {why}" for e, why in failures.items())
                raise Unavailable(f"no etcd member answered in time ({tried})")
            # Every member failed (an election, say): a short pause, then again.
            time.sleep(min(0.05 * rounds, 0.5, left))

    def _call_one(
        self, conn: Connection, path: str, body: dict[str, Any], deadline: float, idx: int
    ) -> dict[str, Any]:
        # One member may hold a request for etcd's own timeout (5 s and more) during an
        # election: after request_timeout the next member gets its chance.
        for attempt in range(2):
            # Logging in checks a bcrypt hash, slow on a busy member: the whole deadline.
            token = self._auth(conn, deadline)
            request_deadline = deadline
            if len(self._conns) > 1:
                request_deadline = min(
                    deadline, time.monotonic() + self.backend.config["request_timeout"]
                )
            try:
                answer = conn.call(path, body, request_deadline, token)
            except EtcdError as exc:
                if exc.bad_token and attempt == 0:
                    self._token = None
                    continue
                raise
            self._current = idx
            return answer
        raise AssertionError("unreachable")

    def _auth(self, conn: Connection, deadline: float) -> str | None:
        if self.backend.username is None:
            return None
        if self._token is None:
            self._token = authenticate(conn, self.backend, deadline)
        return self._token

    def close(self) -> None:
        for conn in self._conns:
            conn.close()


def authenticate(conn: Connection, backend: Cluster, deadline: float) -> str:
    try:
        answer = conn.call(
            "/v3/auth/authenticate",
            {"name": backend.username, "password": backend.password},
            deadline,
        )
    except EtcdError as exc:
        if exc.retryable:
            raise
        # A runtime failure, not a configuration error: the user may be created, or the
        # password changed, while the process runs; the listener keeps trying.
        raise ConnectionLost(
            f"etcd refused the login of user {backend.username!r} at {conn.endpoint}: {exc.message}"
        ) from None
    return Secret(answer["token"])


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip().rstrip(":")
