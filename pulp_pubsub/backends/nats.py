"""NATS: clustered pub/sub, with replay through JetStream when asked for.

nats-py is an asyncio client; the layer's API is synchronous and
``fileno()``-based. So each process hosts one asyncio loop on a daemon
thread (:mod:`pulp_pubsub.backends.natsloop`) and every connection lives
there. A subscriber's transport hands what arrives to its listener thread
through a self-pipe, the descriptor the listener (and thus Pulp's
``select()``) waits on.

Every connection is made with nats-py's own reconnecting off: a transport
that loses its server raises, and the shared listener reconnects for as
long as the subscriber lives (nats-py would give up after 60 attempts) and
resyncs or replays. A server-side "slow consumer" disconnect is such a loss;
a client-side one (nats-py dropping a message it could not queue) resyncs
that subject.

Channel names map to subjects one to one: the channel is one subject token,
with ``%``, ``.`` and ``$`` written as ``%25``, ``%2E`` and ``%24``, so no
name can add a token, leave one empty or reach a ``$``-system subject
(``*`` and ``>`` are refused for every backend). ``PUBSUB_CHANNEL_PREFIX``
is the leading token(s): ``pulp`` (or ``pulp.``) sends ``pulp_worker_wakeup``
as ``pulp.pulp_worker_wakeup``, ``a.b`` under ``pulp.a%2Eb``.

With ``PUBSUB_OPTIONS = {"jetstream": True}`` publishes go into a stream
(made by the layer, bounded by ``stream_max_age``/``stream_max_bytes``,
unless the operator names an existing one in ``stream``) and each
subscription is an ephemeral push consumer. A reconnecting subscriber
starts its consumers just after the last stream sequence it saw, so a gap
is delivered rather than resynced; a channel is resynced only when the
stream no longer holds that sequence.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

from ..conf import Secret, hide_password
from ..exceptions import ConnectionLost, MissingDependency, PublishError, PubSubError
from .base import BaseBackend, Transport
from .natsloop import loop_runner
from .selfpipe import close_fds, drain, make_pipe, poke

try:
    import nats
    import nats.errors
    import nats.js.api
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.client import __version__ as NATS_PY_VERSION
    from nats.aio.msg import Msg
except ImportError as exc:
    raise MissingDependency("nats", "nats", exc) from exc

DEFAULT_URL = "nats://localhost:4222"
SCHEMES = {"nats": False, "tls": True}
_ESCAPES = {"%": "%25", ".": "%2E", "$": "%24"}
_UNESCAPE = re.compile(r"%(25|2E|24)")
_STREAM_NAME = re.compile(r"[^A-Za-z0-9_-]")


def escape_token(name: str) -> str:
    """A channel name as one subject token (see the module docstring)."""
    return "".join(_ESCAPES.get(char, char) for char in name)


def unescape_token(token: str) -> str | None:
    """Undo :func:`escape_token`; None for a token it cannot have made."""
    name = _UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), token)
    return name if escape_token(name) == token else None


def hide_credentials(url: str) -> str:
    """A server URL fit for output: a password or a token (bare user info) is masked."""
    return str(hide_password(url))


@dataclass(frozen=True)
class _Server:
    url: str  # without credentials: nats-py would use them unquoted
    shown: str
    tls: bool
    credentials: tuple[str, str | None] | None  # (user, password) or (token, None)


def parse_servers(value: str) -> list[_Server]:
    """``nats://[user:password@|token@]host[:port]`` or ``tls://...``, comma-separated."""
    servers = []
    for item in value.split(","):
        item = item.strip()
        shown = hide_credentials(item)
        if not item:
            raise ImproperlyConfigured(
                f"The NATS PUBSUB_URL {hide_credentials(value)} has an empty server "
                "in its comma-separated list."
            )
        try:
            parts = urlsplit(item)
            port = parts.port
        except ValueError as exc:
            raise ImproperlyConfigured(f"The NATS server URL {shown} is not valid: {exc}") from None
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ImproperlyConfigured(
                f"The NATS server URL {shown} is not valid: expected "
                "nats://[user:password@]host[:port] or tls://..., comma-separated for a cluster."
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ImproperlyConfigured(
                f"The NATS server URL {shown} has a path or query; NATS takes none "
                "(quote '/', '@', ':' in a password; TLS files go in PUBSUB_OPTIONS)."
            )
        userinfo, _, hostport = parts.netloc.rpartition("@")
        credentials: tuple[str, str | None] | None = None
        if userinfo:
            user, colon, password = userinfo.partition(":")
            if colon:
                credentials = (unquote(user), Secret(unquote(password)))
            else:  # a bare user info is a token
                credentials = (Secret(unquote(user)), None)
        host = hostport if port else f"{hostport}:4222"
        url = f"{parts.scheme}://{host}"
        servers.append(_Server(url, shown, SCHEMES[parts.scheme], credentials))
    if len({server.credentials for server in servers}) > 1:
        raise ImproperlyConfigured(
            "The servers in the NATS PUBSUB_URL carry different credentials; give them once "
            "(in one URL, or in the 'user'/'password'/'token' options)."
        )
    return servers


class NatsTransport(Transport):
    """One NATS connection of one subscriber; messages reach the listener through a pipe."""

    backend: NatsBackend

    def __init__(self, backend: NatsBackend) -> None:
        super().__init__(backend)
        self._lock = threading.Lock()
        self._inbox: deque[tuple[str, str | None]] = deque()
        self._dead: str | None = None
        self._closed = False
        self._pipe_r, self._pipe_w = make_pipe()
        self._subs: dict[str, Any] = {}
        # JetStream: the last stream sequence seen per wire channel, the
        # position an earlier transport reached, and the consumers' liveness.
        self._seen: dict[str, int] = {}
        self._resume_from: dict[str, int] = {}
        self._heard: dict[str, float] = {}
        self._runner = loop_runner()
        self._timeout = backend.config["connect_timeout"]
        self._established = False
        try:
            self._nc: Client = self._runner.run(
                backend.connect(
                    role="subscriber",
                    allow_reconnect=False,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    closed_cb=self._on_disconnected,
                ),
                self._timeout,
            )
        except BaseException as exc:
            close_fds(self._pipe_r, self._pipe_w)
            raise ConnectionLost(
                f"could not connect to {backend.where()}: {backend.explain(exc)}"
            ) from exc
        self._established = True

    # -- callbacks on the loop thread --------------------------------------------

    def _push(self, item: tuple[str, str | None] | None = None, dead: str | None = None) -> None:
        with self._lock:
            if self._closed:
                return
            if item is not None:
                self._inbox.append(item)
            if dead and self._dead is None:
                self._dead = dead
            poke(self._pipe_w)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # nats-py dropped a message it could not queue: that channel resyncs.
            self._push((exc.subject, None))
        elif self._established and isinstance(
            exc, nats.errors.StaleConnectionError | ConnectionError | OSError
        ):
            # Before connect() returns, errors are those of servers it tried and passed over.
            self._push(dead=self.backend.explain(exc))

    async def _on_disconnected(self) -> None:
        self._push(dead="the NATS server closed the connection")

    async def _on_message(self, msg: Msg) -> None:
        self._push((msg.subject, msg.data.decode("utf-8", "replace")))

    def _consumer_callback(self, wire: str) -> Any:
        async def on_message(msg: Msg) -> None:
            self._heard[wire] = time.monotonic()
            if msg.headers and msg.headers.get("Status"):
                # An idle heartbeat, or a flow-control request (it has a reply subject).
                if msg.reply:
                    await self._nc.publish(msg.reply)
                return
            if not msg.reply:
                return
            # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
            tokens = msg.reply.split(".")
            try:
                sequence = int(tokens[-4])
            except (IndexError, ValueError):
                return
            with self._lock:
                if sequence <= self._seen.get(wire, 0):
                    return  # redelivered after a consumer restart: already had it
                self._seen[wire] = sequence
            self._push((msg.subject, msg.data.decode("utf-8", "replace")))

        return on_message

    # -- the listener's side -----------------------------------------------------

    def fileno(self) -> int:
        return self._pipe_r

    def listen(self, channels: Collection[str]) -> None:
        self._run(self._listen(list(channels)))

    async def _listen(self, channels: list[str]) -> None:
        # Broadcast: a plain subscription (or consumer) per subscriber. Targeted delivery
        # would subscribe with ``queue=<group>`` here (JetStream: one durable consumer per
        # group with ``deliver_group``), so the server hands each message to one member.
        nc = self._nc
        for wire in channels:
            if wire in self._subs:
                continue
            if self.backend.jetstream:
                self._subs[wire] = await self._add_consumer(wire)
            else:
                self._subs[wire] = await nc.subscribe(wire, cb=self._on_message)
        # The server has the subscriptions once it answers a PING sent after them.
        await nc.flush(self._timeout)

    async def _add_consumer(self, wire: str) -> Any:
        backend = self.backend
        js = self._nc.jsm(timeout=self._timeout)
        info = await backend.ensure_stream(self._nc)
        last = info.state.last_seq
        start = self._resume_from.pop(wire, None)
        if start is not None and (start > last or (start + 1 < info.state.first_seq)):
            if start != last:
                # The stream no longer holds what this channel may have missed (or was
                # made anew, its sequence starting again below ours).
                self._push((wire, None))
            start = None
        if start is None:
            start = last
        with self._lock:
            self._seen[wire] = max(self._seen.get(wire, 0), start)
        deliver = self._nc.new_inbox()
        sub = await self._nc.subscribe(deliver, cb=self._consumer_callback(wire))
        heartbeat = backend.config["probe_interval"]
        config = nats.js.api.ConsumerConfig(
            deliver_subject=deliver,
            filter_subject=wire,
            deliver_policy=nats.js.api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start + 1,
            ack_policy=nats.js.api.AckPolicy.NONE,
            idle_heartbeat=heartbeat,
            flow_control=True,
            inactive_threshold=max(5.0, 3 * heartbeat),
            mem_storage=True,
        )
        consumer = await js.add_consumer(backend.stream_name, config)
        self._heard[wire] = time.monotonic()
        return (sub, consumer.name)

    def unlisten(self, channels: Collection[str]) -> None:
        self._run(self._unlisten(list(channels)))

    async def _unlisten(self, channels: list[str]) -> None:
        for wire in channels:
            sub = self._subs.pop(wire, None)
            self._heard.pop(wire, None)
            if isinstance(sub, tuple):
                await sub[0].unsubscribe()
                try:
                    await self._nc.jsm(timeout=self._timeout).delete_consumer(
                        self.backend.stream_name, sub[1]
                    )
                except nats.js.errors.NotFoundError:
                    pass
            elif sub is not None:
                await sub.unsubscribe()

    def read(self) -> list[tuple[str, str | None]]:
        drain(self._pipe_r)
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
            dead = self._dead
        if dead:
            if items:
                poke(self._pipe_w)  # hand these out first; raise on the next read
                return items
            raise ConnectionLost(dead)
        return items

    def position(self) -> Any:
        if not self.backend.jetstream:
            return None
        with self._lock:
            return {"stream": self.backend.stream_name, "seen": dict(self._seen)}

    def resume(self, position: Any) -> bool:
        if not (self.backend.jetstream and isinstance(position, dict)):
            return False
        if position.get("stream") != self.backend.stream_name:
            return False
        self._resume_from = dict(position.get("seen") or {})
        return True

    def probe(self, channel: str, payload: str) -> None:
        if self.backend.jetstream:
            # A push consumer whose server went away without taking this
            # connection along says so only by falling silent.
            limit = 3 * self.backend.config["probe_interval"] + self._timeout
            now = time.monotonic()
            for wire, heard in list(self._heard.items()):
                if now - heard > limit:
                    raise ConnectionLost(f"the JetStream consumer for {wire!r} fell silent")
        self._runner.submit(self._probe(channel, payload))

    def send_from_listener(self, channel: str, payload: str) -> None:
        self._runner.submit(self._probe(channel, payload))

    async def _probe(self, channel: str, payload: str) -> None:
        try:
            await self.backend.publish_on(self._nc, channel, payload.encode())
        except Exception as exc:
            self._push(dead=f"probe not sent: {self.backend.explain(exc)}")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._runner.run(self._nc.close(), self._timeout)
        except BaseException:
            pass  # closing a dead connection: nothing to save
        finally:
            close_fds(self._pipe_r, self._pipe_w)

    def _run(self, coro: Any) -> Any:
        try:
            return self._runner.run(coro, self._timeout + 1)
        except PubSubError:
            raise
        except BaseException as exc:
            raise ConnectionLost(self.backend.explain(exc)) from exc


class _Publisher:
    """One process's publishing connection, made on first use and again after a loss."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.nc: Client | None = None
        self.lock = threading.Lock()


class NatsBackend(BaseBackend):
    name = "nats"
    options: ClassVar[dict[str, Any]] = {
        # Credentials; each overrides what the URL carries.
        "user": None,
        "password": None,
        "token": None,
        # Paths: an NKey seed file, or a .creds file (user JWT and seed).
        "nkey_seed": None,
        "creds": None,
        # TLS (tls:// URLs, or a server that requires it): CA bundle, client certificate.
        "tls_ca": None,
        "tls_cert": None,
        "tls_key": None,
        "tls_hostname": None,
        # JetStream replay.
        "jetstream": False,
        "stream": None,
        "stream_max_age": 3600.0,
        "stream_max_bytes": 256 * 1024 * 1024,
        "stream_replicas": 1,
        "stream_storage": "file",
        # The server's HTTP monitoring endpoint, for pubsub_channels' subscriber counts.
        "monitor_url": None,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.servers = parse_servers(self.url or DEFAULT_URL)
        config = self.config
        for key in ("user", "password", "token", "nkey_seed", "creds", "tls_hostname", "stream"):
            if config[key] is not None and not (isinstance(config[key], str) and config[key]):
                raise ImproperlyConfigured(f"Option {key!r} for NatsBackend must be a string.")
        for key in ("nkey_seed", "creds", "tls_ca", "tls_cert", "tls_key"):
            path = config[key]
            if path is not None and not os.path.isfile(path):
                raise ImproperlyConfigured(
                    f"Option {key!r} for NatsBackend names {path!r}, which is not a readable file."
                )
        if sum(bool(config[k]) for k in ("token", "nkey_seed", "creds")) > 1:
            raise ImproperlyConfigured(
                "NatsBackend takes one of the options 'token', 'nkey_seed' and 'creds'."
            )
        if bool(config["tls_cert"]) != bool(config["tls_key"]):
            raise ImproperlyConfigured(
                "NatsBackend needs both 'tls_cert' and 'tls_key', or neither."
            )
        if not isinstance(config["jetstream"], bool):
            raise ImproperlyConfigured("Option 'jetstream' for NatsBackend must be True or False.")
        if config["stream_storage"] not in ("file", "memory"):
            raise ImproperlyConfigured(
                "Option 'stream_storage' for NatsBackend must be 'file' or 'memory'."
            )
        if config["monitor_url"] is not None:
            scheme = urlsplit(str(config["monitor_url"])).scheme
            if scheme not in ("http", "https"):
                raise ImproperlyConfigured(
                    "Option 'monitor_url' for NatsBackend must be an "
                    "http:// or https:// URL (the server's -m port)."
                )
        self.jetstream: bool = config["jetstream"]
        self._root = self._subject_root(self.channel_prefix)
        self.stream_name: str = config["stream"] or self._default_stream_name()
        self._stream_checked = False
        self._publisher = _Publisher()
        self._tls_context: ssl.SSLContext | None = None
        try:
            self.tls_context()
        except (OSError, ssl.SSLError) as exc:
            raise ImproperlyConfigured(f"NatsBackend cannot load its TLS files: {exc}") from None

    # -- names -----------------------------------------------------------------------

    @staticmethod
    def _subject_root(prefix: str) -> str:
        # One token, escaped like a channel name, so any valid prefix works.
        return escape_token(prefix) + "." if prefix else ""

    def _default_stream_name(self) -> str:
        root = self._root.rstrip(".")
        return "PUBSUB" + ("_" + _STREAM_NAME.sub("_", root) if root else "")

    @property
    def stream_subjects(self) -> str:
        """What the layer's stream captures: exactly one token under the prefix."""
        return self._root + "*"

    def wire_name(self, channel: str) -> str:
        # Checked as every backend checks it (prefix and name together), so a
        # name that works here works on the others too; then mapped.
        super().wire_name(channel)
        return self._root + escape_token(channel)

    def channel_name(self, wire: str) -> str | None:
        if not wire.startswith(self._root):
            return None
        token = wire[len(self._root) :]
        return None if "." in token else unescape_token(token)

    # -- connections -----------------------------------------------------------------

    def where(self) -> str:
        return ", ".join(server.shown for server in self.servers)

    def explain(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        if isinstance(exc, nats.errors.NoServersError | TimeoutError | ConnectionRefusedError):
            return f"{text} (no server of {self.where()} answered)"
        lowered = str(exc).lower()
        if "authorization" in lowered or "authentication" in lowered:
            return f"{text} (check the credentials in PUBSUB_URL or PUBSUB_OPTIONS)"
        if "permissions violation" in lowered:
            prefix = self._root or "<channel>"
            return f"{text} (the NATS user needs publish and subscribe on {prefix}>)"
        return text

    def tls_context(self) -> ssl.SSLContext | None:
        config = self.config
        wanted = any(s.tls for s in self.servers) or config["tls_ca"] or config["tls_cert"]
        if not wanted:
            return None
        if self._tls_context is None:
            ctx = ssl.create_default_context(cafile=config["tls_ca"])
            if config["tls_cert"]:
                ctx.load_cert_chain(config["tls_cert"], config["tls_key"])
            self._tls_context = ctx
        return self._tls_context

    async def connect(self, role: str = "publisher", **kwargs: Any) -> Client:
        """A connection with the configured credentials; reconnecting is the caller's.

        Its name (shown by the server's monitoring) says the role and the pid.
        """
        config = self.config
        options: dict[str, Any] = {
            "servers": [server.url for server in self.servers],
            "connect_timeout": config["connect_timeout"],
            # Each server twice, 50 ms apart, then NoServersError: a connect fails as soon
            # as no server answers (nats-py would otherwise cycle until our deadline), and
            # the listener's backoff decides when to try again.
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.05,
            "name": f"pulp-pubsub {role} pid {os.getpid()}",
        }
        credentials = self.servers[0].credentials
        if credentials is not None:
            if credentials[1] is None:
                options["token"] = credentials[0]
            else:
                options["user"], options["password"] = credentials
        if config["user"] is not None:
            options["user"] = config["user"]
        if config["password"] is not None:
            options["password"] = config["password"]
        if config["token"]:
            options["token"] = config["token"]
        if config["nkey_seed"]:
            options["nkeys_seed"] = config["nkey_seed"]
        if config["creds"]:
            options["user_credentials"] = config["creds"]
        tls = self.tls_context()
        if tls is not None:
            options["tls"] = tls
            if config["tls_hostname"]:
                options["tls_hostname"] = config["tls_hostname"]
        options.update(kwargs)

        async def no_error(exc: Exception) -> None:
            pass  # nats-py prints errors without an error_cb; they reach the caller instead

        options.setdefault("error_cb", no_error)
        nc = Client()
        try:
            await nc.connect(**options)
        except BaseException:
            # Also when cancelled at the caller's deadline: a half-made
            # connection's socket is closed now, not whenever it is collected.
            await _abandon(nc)
            raise
        return nc

    async def ensure_stream(self, nc: Client) -> Any:
        """The stream's info; made by the layer when it does not exist yet."""
        jsm = nc.jsm(timeout=self.config["connect_timeout"])
        try:
            info = await jsm.stream_info(self.stream_name)
        except nats.js.errors.NotFoundError:
            if self.config["stream"]:
                raise PubSubError(
                    f"The JetStream stream {self.stream_name!r} named in PUBSUB_OPTIONS does not "
                    f"exist; create it with the subjects {self.stream_subjects!r}."
                ) from None
            config = nats.js.api.StreamConfig(
                name=self.stream_name,
                description="pulp-pubsub replay history",
                subjects=[self.stream_subjects],
                max_age=float(self.config["stream_max_age"]),
                max_bytes=int(self.config["stream_max_bytes"]),
                num_replicas=int(self.config["stream_replicas"]),
                storage=nats.js.api.StorageType(self.config["stream_storage"]),
                discard=nats.js.api.DiscardPolicy.OLD,
            )
            try:
                info = await jsm.add_stream(config)
            except nats.js.errors.BadRequestError:
                # Another process made it first.
                info = await jsm.stream_info(self.stream_name)
        if not self._stream_checked:
            subjects = info.config.subjects or []
            if self.stream_subjects not in subjects and ">" not in subjects:
                raise PubSubError(
                    f"The JetStream stream {self.stream_name!r} captures {subjects}, "
                    f"not this install's subjects {self.stream_subjects!r}."
                )
            self._stream_checked = True
        return info

    async def publish_on(self, nc: Client, wire: str, data: bytes) -> None:
        timeout = self.config["publish_timeout"]
        if self.jetstream:
            await nc.jetstream(timeout=timeout).publish(wire, data, timeout=timeout)
        else:
            await nc.publish(wire, data)
            await nc.flush(timeout)

    async def _send(self, wire: str, data: bytes) -> None:
        publisher = self._publisher
        nc = publisher.nc
        if nc is None or not nc.is_connected:
            if nc is not None:
                await nc.close()
            publisher.nc = None
            nc = publisher.nc = await self.connect(allow_reconnect=False)
            if self.jetstream:
                await self.ensure_stream(nc)
        try:
            await self.publish_on(nc, wire, data)
        except BaseException:
            # Unknown state (a frozen server, a lost ack): start afresh next time.
            publisher.nc = None
            self._close_later(nc)
            raise

    def _close_later(self, nc: Client) -> None:
        loop_runner().submit(_abandon(nc))

    def send(self, channel: str, payload: str) -> None:
        publisher = self._publisher
        if publisher.pid != os.getpid():
            # Forked: the parent's connection is not ours; its loop thread is gone.
            publisher = self._publisher = _Publisher()
        timeout = self.config["publish_timeout"]
        deadline = time.monotonic() + timeout
        if not publisher.lock.acquire(timeout=timeout):
            raise PublishError(f"nats backend could not publish within {timeout} s")
        try:
            left = max(0.0, deadline - time.monotonic())
            loop_runner().run(self._send(channel, payload.encode("utf-8")), left)
        except PubSubError as exc:
            raise PublishError(f"nats backend could not publish: {exc}") from exc
        except BaseException as exc:
            if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
                detail = f"no answer from {self.where()} within {timeout} s"
            else:
                detail = self.explain(exc)
            raise PublishError(f"nats backend could not publish: {detail}") from exc
        finally:
            publisher.lock.release()

    def open_transport(self) -> NatsTransport:
        return NatsTransport(self)

    # -- introspection and lifecycle -----------------------------------------------------

    def subscriber_counts(self, channels: Collection[str]) -> dict[str, int] | None:
        """Counted from the monitoring endpoint's ``/connz?subs=1``; None without one."""
        monitor = self.config["monitor_url"]
        if not monitor:
            return None
        names = list(channels)
        wires = {self.wire_name(name): name for name in names}
        counts = dict.fromkeys(names, 0)
        if self.jetstream:
            # Subscribers are the stream's consumers, one per subscriber and channel.
            path = "jsz?accounts=true&streams=true&consumers=true&config=true"
            subjects = []
            for account in self._monitor(path).get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if stream.get("name") != self.stream_name:
                        continue
                    for consumer in stream.get("consumer_detail") or []:
                        subjects.append((consumer.get("config") or {}).get("filter_subject"))
        else:
            subjects = [
                subject
                for conn in self._monitor("connz?subs=1&limit=100000").get("connections") or []
                for subject in _subjects(conn.get("subscriptions_list"))
            ]
        for subject in subjects:
            if subject in wires:
                counts[wires[subject]] += 1
        return counts

    def _monitor(self, path: str) -> dict[str, Any]:
        monitor = str(self.config["monitor_url"]).rstrip("/")
        try:
            with urllib.request.urlopen(
                f"{monitor}/{path}", timeout=self.config["connect_timeout"]
            ) as reply:
                data = json.load(reply)
        except (OSError, ValueError) as exc:
            raise PubSubError(
                f"nats backend could not read the monitoring endpoint "
                f"{hide_password(monitor)}: {exc}"
            ) from exc
        return data if isinstance(data, dict) else {}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            url=self.where(),
            servers=[server.shown for server in self.servers],
            channel_prefix=self.channel_prefix,
            subject_example=self.wire_name("pulp_worker_wakeup"),
            tls=self.tls_context() is not None,
            auth=self._auth_kind(),
            jetstream=self.jetstream,
            nats_py=NATS_PY_VERSION,
        )
        if self.jetstream:
            info.update(stream=self.stream_name, stream_subjects=self.stream_subjects)
        info["monitor_url"] = hide_password(self.config["monitor_url"])
        info["warnings"] = (
            []
            if self.config["monitor_url"]
            else ["No monitor_url in PUBSUB_OPTIONS: subscriber counts are not available."]
        )
        return info

    def _auth_kind(self) -> str:
        config = self.config
        for key in ("creds", "nkey_seed", "token"):
            if config[key]:
                return key
        credentials = self.servers[0].credentials
        if config["user"] or (credentials and credentials[1] is not None):
            return "user/password"
        if credentials:
            return "token"
        return "none"

    def __repr__(self) -> str:
        return f"<NatsBackend {self.where()} jetstream={self.jetstream}>"

    def close(self) -> None:
        super().close()
        publisher = self._publisher
        nc, publisher.nc = publisher.nc, None
        if nc is not None and publisher.pid == os.getpid():
            try:
                loop_runner().run(nc.close(), self.config["connect_timeout"])
            except BaseException:
                pass


async def _abandon(nc: Client) -> None:
    """Close a connection in an unknown state, without waiting on its server."""
    transport = getattr(nc, "_transport", None)
    if transport is not None:
        transport.close()  # the socket goes now, whatever the server does
    try:
        await asyncio.wait_for(nc.close(), 1.0)
    except BaseException:
        pass


def _subjects(subs: Any) -> Iterable[str]:
    for sub in subs or []:
        if isinstance(sub, str):
            yield sub
        elif isinstance(sub, dict) and isinstance(sub.get("subject"), str):
            yield sub["subject"]
