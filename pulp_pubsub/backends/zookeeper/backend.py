"""ZooKeeper: wake-ups through an ensemble, and missed messages replayed by sequence.

Each channel is a znode, ``<chroot><root>/<channel>`` (``/pubsub/pulp_worker_wakeup`` by
default), and each message a ``PERSISTENT_SEQUENTIAL`` child of it whose data is the
payload's UTF-8 bytes, nothing else: a plain client that creates ``.../m`` with
``sequence=True`` publishes, and one that reads the children in sequence order subscribes.

A subscriber reads a channel's children with a child watch and delivers those after the
last sequence it has seen, in order. That sequence is its replay position: after a lost
connection or an expired session its new connection hands over what was published in the
gap, in order, with no resync (:mod:`.transport`).

History is bounded by count and by age, and publishers trim it (:func:`.client.trim`, on a
thread of their process, every ``trim_every`` publishes to a channel): a message is deleted
once ``max_count`` newer ones exist or once it is older than ``max_age`` seconds (as the
newest one's creation time tells), but never the newest. The highest sequence deleted is
written on the channel's node in the same multi-op as the deletes; a subscriber reads it
together with the children, so one whose position lies below it knows the history no
longer reaches back and delivers a resync. A subscriber that was away for less than
``max_age`` seconds, while fewer than ``max_count`` messages were published, therefore
misses nothing and gets no resync.

Payloads are refused before sending above ``max_payload`` bytes (ZooKeeper refuses any
request over the server's ``jute.maxbuffer``, 1 MiB less one byte by default). Publishing
uses one session per process whose kazoo client moves to another member when one fails;
a publish never waits past ``publish_timeout``.

Targeted delivery is not offered: ZooKeeper's queue recipe (one sequential node per item,
taken by whoever deletes it first) costs every member a watch and a race per message, and
a member that dies holding one loses it. A targeted publish here is a broadcast.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, ClassVar

from django.core.exceptions import ImproperlyConfigured

from ...conf import Secret
from ...exceptions import MissingDependency, PublishError
from ..base import BaseBackend
from ..perprocess import PerProcess
from .names import Where, escape, parse_url, sequence

try:
    from kazoo.client import KazooClient
    from kazoo.exceptions import (
        ConnectionClosedError,
        ConnectionLoss,
        KazooException,
        NoAuthError,
        NoNodeError,
        SessionExpiredError,
    )
    from kazoo.handlers.threading import KazooTimeoutError
    from kazoo.protocol.states import KazooState
    from kazoo.security import CREATOR_ALL_ACL, OPEN_ACL_UNSAFE, READ_ACL_UNSAFE
except ImportError as exc:
    raise MissingDependency("zookeeper", "zookeeper", exc) from exc

from .client import Connect, create_container, stop, trim
from .transport import ZookeeperTransport

logger = logging.getLogger(__name__)

DEFAULT_URL = "zk://localhost:2181"
#: ZooKeeper's default jute.maxbuffer (0xfffff), less room for the path, ACL and framing.
JUTE_MAXBUFFER = 0xFFFFF
PATH_ROOM = 4096


class ZookeeperBackend(BaseBackend):
    name = "zookeeper"
    allows_nul = True
    options: ClassVar[dict[str, Any]] = {
        # Channels are znodes under this path (after the URL's chroot).
        "root": "/pubsub",
        # History: a message goes once this many newer ones exist, or once it is older
        # than max_age seconds; publishers trim every trim_every publishes to a channel.
        "max_count": 1000,
        "max_age": 600.0,
        "trim_every": 50,
        # Payload limit in bytes; raise it with the servers' jute.maxbuffer.
        "max_payload": JUTE_MAXBUFFER - PATH_ROOM,
        # The session timeout asked for (the server keeps it within 2 and 20 ticks). kazoo
        # pings every third of it: at 30 s, 100 idle subscribers cost a fifth of what they
        # do at 10 s; a dead server is the liveness probe's to find, not the session's.
        "session_timeout": 30.0,
        # Digest credentials when not in the URL.
        "username": "",
        "password": "",
        # With credentials: whether anyone may also read the layer's znodes.
        "world_readable": False,
        # TLS (zks://): a private CA, and the client certificate and key.
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
        where = parse_url(self.url or DEFAULT_URL)
        config = self.config
        for key in ("root", "ca_file", "cert_file", "key_file", "username", "password"):
            if not isinstance(config[key], str):
                raise ImproperlyConfigured(
                    f"Option {key!r} for {type(self).__name__} must be a string."
                )
        for key in ("max_count", "trim_every", "max_payload"):
            if not isinstance(config[key], int):
                raise ImproperlyConfigured(
                    f"Option {key!r} for {type(self).__name__} must be a whole number."
                )
        if where.username is None and (config["username"] or config["password"]):
            if not (config["username"] and config["password"]):
                raise ImproperlyConfigured(
                    "Options 'username' and 'password' for ZookeeperBackend go together."
                )
            where = Where(where.hosts, where.chroot, where.tls, config["username"], None)
            password: str | None = config["password"]
        else:
            password = where.password
        # A Secret: tracebacks, debuggers and error reporters show it as '***'.
        where = Where(
            where.hosts,
            where.chroot,
            where.tls,
            where.username,
            None if password is None else Secret(password),
        )
        root = config["root"]
        if not root.startswith("/") or root == "/" or root.endswith("/") or "//" in root:
            raise ImproperlyConfigured(
                f"Option 'root' must be an absolute znode path like '/pubsub', not {root!r}."
            )
        if not where.tls and any(config[k] for k in ("ca_file", "cert_file", "key_file")):
            raise ImproperlyConfigured(
                "The options ca_file, cert_file and key_file need a zks:// URL."
            )
        if config["key_file"] and not config["cert_file"]:
            raise ImproperlyConfigured("Option 'key_file' needs 'cert_file'.")
        if config["max_payload"] > JUTE_MAXBUFFER * 64:
            raise ImproperlyConfigured("Option 'max_payload' is beyond any jute.maxbuffer.")
        self.where = where
        #: The znode under which every channel of this install lives.
        self.base = where.chroot + root
        self.payload_limit = config["max_payload"]
        self.acl = self._acl()
        self.connect = Connect(
            where,
            float(config["session_timeout"]),
            config["ca_file"],
            config["cert_file"],
            config["key_file"],
        )
        # A forked child never uses its parent's session (nor closes it).
        self._client: PerProcess[Publisher] = PerProcess(lambda: Publisher(self), Publisher.close)

    def _acl(self) -> list[Any]:
        """The ACL of the layer's znodes: the credentials' identity, else anyone."""
        if self.where.username is None:
            return list(OPEN_ACL_UNSAFE)
        acl = list(CREATOR_ALL_ACL)
        if self.config["world_readable"]:
            acl += list(READ_ACL_UNSAFE)
        return acl

    def __repr__(self) -> str:
        hosts = self.where.connect_string + self.where.chroot
        return f"<ZookeeperBackend {hosts} root={self.base!r}>"

    # -- names -----------------------------------------------------------------

    def path(self, wire: str) -> str:
        return f"{self.base}/{escape(wire)}"

    # -- publishing --------------------------------------------------------------

    def send(self, channel: str, payload: str) -> None:
        deadline = time.monotonic() + self.config["publish_timeout"]
        try:
            self._client.get().publish(channel, payload.encode(), deadline)
        except NoAuthError as exc:
            user = self.where.username
            raise PublishError(
                f"zookeeper backend could not publish to {channel!r}: not allowed "
                f"({'user ' + repr(user) if user else 'no credentials'}; see the ACL "
                "in docs/security.md)"
            ) from exc
        except KazooTimeoutError as exc:
            raise PublishError(
                f"zookeeper backend could not publish to {channel!r}: no answer within the "
                f"publish timeout ({self.config['publish_timeout']:g} s)"
            ) from exc
        except (KazooException, OSError) as exc:
            cause = str(exc) or type(exc).__name__
            raise PublishError(
                f"zookeeper backend could not publish to {channel!r}: {cause}"
            ) from exc

    # -- subscribing -------------------------------------------------------------

    def open_transport(self) -> ZookeeperTransport:
        return ZookeeperTransport(self)

    # -- introspection and lifecycle ---------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "hosts": self.where.connect_string,
            "root": self.base,
            "tls": self.where.tls,
            "user": self.where.username,
            "history": f"{self.config['max_count']} messages, {self.config['max_age']:g} s",
            "subscribers": "ZooKeeper does not list watchers; pubsub_channels --live asks them",
        }

    def close(self) -> None:
        super().close()
        self._client.close()


class Publisher:
    """The process's publishing session, and the thread that trims what it published to.

    kazoo's client reconnects in the background, moving on to the next member when one
    fails, so a publish mostly finds it connected; one that does not waits for it only
    until its deadline.
    """

    def __init__(self, backend: ZookeeperBackend) -> None:
        self.backend = backend
        self.client: KazooClient = backend.connect.client(retry_forever=True)
        self._started = False
        self._down_since: float | None = None
        self._patience = float(backend.config["connect_timeout"])
        self._since_trim: dict[str, int] = {}
        self._lock = threading.Lock()
        self._trims: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        self._trimmer: threading.Thread | None = None

    def _ensure_started(self, deadline: float) -> None:
        """Return once connected; a client that stayed away ``connect_timeout`` is replaced.

        kazoo waits for a member's answer to its connect request for the whole session
        timeout (divided among the members): a member that took the TCP connection and
        then answers nothing (frozen, or just restarted behind a proxy) would hold every
        publish of the process that long. A publisher's session holds nothing to lose.
        """
        while True:
            with self._lock:
                if not self._started:
                    self._start(self.client)
                client = self.client
            if client.connected:
                return
            now = time.monotonic()
            down_since = self._down_since if self._down_since is not None else now
            replace_at = down_since + self._patience
            if self._wait_connected(client, min(deadline, max(replace_at, now))):
                return
            if time.monotonic() >= deadline:
                raise KazooTimeoutError(
                    f"no ZooKeeper server of {self.backend.where.connect_string} "
                    f"answered within the publish timeout"
                )
            self._replace(client)

    def _start(self, client: KazooClient) -> None:
        """Start ``client`` (lock held), noting when it loses its connection."""

        def on_state(state: str) -> None:
            if state == KazooState.CONNECTED:
                self._down_since = None
            elif self._down_since is None:
                self._down_since = time.monotonic()

        self._down_since = time.monotonic()
        client.add_listener(on_state)
        client.start_async()
        self._started = True

    @staticmethod
    def _wait_connected(client: KazooClient, until: float) -> bool:
        connected = threading.Event()

        def on_state(state: str) -> bool:
            if client.connected:
                connected.set()
                return True
            return False

        client.add_listener(on_state)
        try:
            return client.connected or connected.wait(max(0.0, until - time.monotonic()))
        finally:
            client.remove_listener(on_state)

    def _replace(self, client: KazooClient) -> None:
        with self._lock:
            if client is not self.client:
                return
            self.client = self.backend.connect.client(retry_forever=True)
            self._start(self.client)
        # Stopping waits for kazoo's connection thread, which may be in that very wait.
        stop(client, 0.0)

    def publish(self, wire: str, data: bytes, deadline: float) -> None:
        path = self.backend.path(wire)
        acl = self.backend.acl
        made = False
        while True:
            self._ensure_started(deadline)
            left = max(0.0, deadline - time.monotonic())
            client = self.client
            try:
                created, stat = client.create_async(
                    path + "/m", data, acl=acl, sequence=True, include_data=True
                ).get(timeout=left)
                self._down_since = None
                break
            except KazooTimeoutError:
                # Connected to a member that answers nothing (frozen): kazoo notices only
                # after two thirds of the session timeout. After connect_timeout, a new one.
                if self._down_since is None:
                    self._down_since = time.monotonic()
                elif time.monotonic() - self._down_since >= self._patience:
                    self._replace(client)
                raise
            except NoNodeError:
                if made:
                    raise
                # The channel's first message (or its container was removed when empty).
                create_container(self.client, path, acl, max(0.0, deadline - time.monotonic()))
                made = True
            except (ConnectionLoss, SessionExpiredError, ConnectionClosedError):
                # The member went away with the request (it may have been written: a
                # retry can then land twice, which a wake-up survives). kazoo is on its
                # way to the next member; wait for it, within the deadline.
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        self._after(path, sequence(created) or 0, stat.ctime)

    def _after(self, path: str, seq: int, ctime: int) -> None:
        """Hand the channel to the trimmer every ``trim_every`` publishes (any publisher's)."""
        every = self.backend.config["trim_every"]
        with self._lock:
            mine = self._since_trim.get(path, 0) + 1
            due = seq % every == 0 or mine >= every
            self._since_trim[path] = 0 if due else mine
            if due and self._trimmer is None:
                self._trimmer = threading.Thread(
                    target=self._trim_forever, name="pubsub-zookeeper-trim", daemon=True
                )
                self._trimmer.start()
        if due:
            self._trims.put((path, ctime))

    def _trim_forever(self) -> None:
        config = self.backend.config
        while (item := self._trims.get()) is not None:
            path, ctime = item
            try:
                trim(
                    self.client,
                    path,
                    config["max_count"],
                    int(config["max_age"] * 1000),
                    ctime,
                    config["publish_timeout"],
                )
            except Exception as exc:  # the next publish's trim tries again
                logger.debug("Trimming %s failed: %s", path, exc)

    def close(self) -> None:
        if self._trimmer is not None:
            self._trims.put(None)
            self._trimmer.join(self.backend.config["publish_timeout"])
        if self._started:
            stop(self.client, self._patience)
