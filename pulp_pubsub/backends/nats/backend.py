"""NATS: clustered pub/sub, with replay through JetStream when asked for.

nats-py is an asyncio client; the layer's API is synchronous and
``fileno()``-based. So each process hosts one asyncio loop on a daemon
thread (:mod:`pulp_pubsub.backends.nats.loop`) and the subscribers' and
JetStream publishing connections live there. A subscriber's transport hands
what arrives to its listener thread through a self-pipe, the descriptor the
listener (and thus Pulp's ``select()``) waits on. A core NATS publish runs
in the publishing thread, on a loop of its connection's own (:mod:`.direct`).

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
is the leading token, escaped the same way: with ``pulp``, ``pulp_worker_wakeup``
is sent as ``pulp.pulp_worker_wakeup`` and ``a.b`` as ``pulp.a%2Eb``
(see :mod:`.names`; the connection itself is :mod:`.transport`).

With ``PUBSUB_OPTIONS = {"jetstream": True}`` publishes go into a stream
(made by the layer, bounded by ``stream_max_age``/``stream_max_bytes``,
unless the operator names an existing one in ``stream``) and each
subscription is an ephemeral push consumer. A reconnecting subscriber
starts its consumers just after the last stream sequence it saw, so a gap
is delivered rather than resynced; a channel is resynced only when the
stream no longer holds that sequence.

With JetStream, targeted (work-queue) delivery is native too: a targeted
publish goes to ``<prefix>._work.<channel>.<group>``, captured by a second
stream with interest retention (``<stream>_WORK``, or the one the operator
names in ``work_stream``), and each (channel, group) is one durable pull
consumer with explicit acks and ``ack_wait = claim_timeout`` (see
:mod:`.transport`). Core NATS falls back to broadcast: its queue groups
hand a message to one member but cannot hand it again when that member dies
before acting on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.request
from collections.abc import Collection, Iterable
from typing import Any, ClassVar
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

from ...conf import hide_password
from ...exceptions import MissingDependency, PublishError, PubSubError
from ..base import BaseBackend
from ..perprocess import PerProcess
from .loop import loop_runner
from .names import (
    LIVE_TOKEN,
    MSG_ID,
    UNSTORED_HEADER,
    WORK_TOKEN,
    escape_token,
    parse_servers,
    unescape_token,
    work_subject,
)

try:
    import nats
    import nats.errors
    import nats.js.api
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.client import __version__ as NATS_PY_VERSION
except ImportError as exc:
    raise MissingDependency("nats", "nats", exc) from exc

from .direct import DirectPublisher, can_run_here
from .storing import message_id, store
from .transport import NatsTransport

#: What a publish sees when its connection dies under it.
_LOST = (
    nats.errors.ConnectionClosedError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    ConnectionError,
)

logger = logging.getLogger(__name__)

DEFAULT_URL = "nats://localhost:4222"
#: Pull requests one targeted-delivery consumer keeps waiting at most: one per member.
MAX_WAITING = 16384
_STREAM_NAME = re.compile(r"[^A-Za-z0-9_-]")


class _Publisher:
    """One process's publishing connection, made on first use and again after a loss."""

    def __init__(self) -> None:
        self.nc: Client | None = None
        self.lock = threading.Lock()
        # The targeted-delivery stream was checked (or made) on this connection.
        self.work_ready = False
        #: Core NATS: the connection publishes use from a thread that runs no loop of its
        #: own, made on first use (see .direct).
        self.direct: DirectPublisher | None = None


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
        # JetStream targeted delivery: the work-queue stream, when the operator makes it.
        "work_stream": None,
        # The server's HTTP monitoring endpoint, for pubsub_channels' subscriber counts.
        "monitor_url": None,
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.servers = parse_servers(self.url or DEFAULT_URL)
        config = self.config
        strings = ("user", "password", "token", "nkey_seed", "creds", "tls_hostname")
        for key in (*strings, "stream", "work_stream"):
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
        self.work_stream_name: str = config["work_stream"] or self.stream_name + "_WORK"
        self._stream_checked = False
        #: Known once the stream was checked: it republishes what it stores and answers
        #: direct gets, so subscribers need no consumer (see .transport).
        self.live = False
        self._work_stream_checked = False
        # Per stream: whether a publish may be sent again (its duplicate window covers
        # ``publish_timeout``, so a retried publish is stored once); see :mod:`.storing`.
        self._retries: dict[str, bool] = {}
        # Targeted delivery needs what only JetStream has: a message handed to a member
        # that dies before acking goes to another after ack_wait. Core NATS broadcasts.
        self.targets = self.jetstream
        # Forked: the parent's connection is not ours; its loop thread is gone.
        self._publisher: PerProcess[_Publisher] = PerProcess(_Publisher, self._close_publisher)
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

    @property
    def work_subjects(self) -> str:
        """What the targeted-delivery stream captures: ``<prefix>._work.<channel>.<group>``."""
        return f"{self._root}{WORK_TOKEN}.*.*"

    def live_subject(self, wire: str) -> str:
        """Where the replay stream republishes what it stored on ``wire`` (see .transport)."""
        return f"{self._root}{LIVE_TOKEN}.{wire[len(self._root) :]}"

    @property
    def _republish(self) -> nats.js.api.RePublish:
        return nats.js.api.RePublish(
            src=self.stream_subjects, dest=f"{self._root}{LIVE_TOKEN}.{{{{wildcard(1)}}}}"
        )

    def work_subject(self, wire: str, group: str) -> str:
        """The subject a targeted publish of ``wire`` (a wire name) to ``group`` goes to."""
        return work_subject(self._root, wire[len(self._root) :], group)

    def work_consumer(self, wire: str, group: str) -> str:
        """The durable consumer of one (channel, group): a digest, as names allow few characters."""
        digest = hashlib.sha256(self.work_subject(wire, group).encode()).hexdigest()
        return f"pubsub_{digest[:32]}"

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

    async def ensure_stream(self, nc: Client, timeout: float | None = None) -> Any:
        """The stream's info; made by the layer when it does not exist yet.

        ``timeout`` bounds each request (default ``connect_timeout``).
        """
        jsm = nc.jsm(timeout=timeout or self.config["connect_timeout"])
        try:
            info = await jsm.stream_info(self.stream_name)
        except nats.js.errors.NotFoundError:
            if self.config["stream"]:
                raise PubSubError(
                    f"The JetStream stream {self.stream_name!r} named in PUBSUB_OPTIONS does not "
                    f"exist; create it with the subjects {self.stream_subjects!r}."
                ) from None
            config = self._stream_config(
                self.stream_name,
                "pulp-pubsub replay history",
                self.stream_subjects,
                republish=self._republish,
                allow_direct=True,
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
            if not self._republishes(info) and not self.config["stream"]:
                # The layer's own stream, made by an older release: it republishes from now on.
                info = await self._add_republish(jsm, info)
            self._stream_checked = True
            self._note_window(info)
            self._note_live(info)
        return info

    def _republishes(self, info: Any) -> bool:
        config, wanted = info.config, self._republish
        republish = config.republish
        return bool(
            config.allow_direct
            and republish is not None
            and republish.src == wanted.src
            and republish.dest == wanted.dest
            and not republish.headers_only
        )

    async def _add_republish(self, jsm: Any, info: Any) -> Any:
        config = info.config
        config.republish, config.allow_direct = self._republish, True
        try:
            return await jsm.update_stream(config)
        except nats.js.errors.APIError as exc:
            logger.warning(
                "The JetStream stream %r could not be made to republish what it stores "
                "(%s): its subscribers go on making consumers, and after a node's loss wait "
                "for the meta group's leader. nats-server 2.10 and later allow the change; "
                "or delete the stream (and its history) to have it made again.",
                self.stream_name,
                self.explain(exc),
            )
            return await jsm.stream_info(self.stream_name)

    @property
    def stream_checked(self) -> bool:
        return self._stream_checked

    def _note_live(self, info: Any) -> None:
        """Whether subscribers read this stream without consumers (see .transport's doc)."""
        self.live = self._republishes(info)
        if not self.live:
            logger.info(
                "The JetStream stream %r does not republish what it stores to %r with direct "
                "gets allowed: subscribers make a consumer per channel, which after a node's "
                "loss waits for the meta group's leader.",
                self.stream_name,
                self._republish.dest,
            )

    def _note_window(self, info: Any) -> None:
        """Whether a publish to this stream may be retried: its duplicate window must cover it."""
        name = info.config.name
        window = float(info.config.duplicate_window or 0)
        timeout = float(self.config["publish_timeout"])
        self._retries[name] = window >= timeout
        if not self._retries[name]:
            logger.warning(
                "The JetStream stream %r deduplicates within %.1f s, less than publish_timeout "
                "(%.1f s): a publish to it is sent once, not again during a leader election "
                "(a retry could be stored twice). Give the stream a longer duplicate window.",
                name,
                window,
                timeout,
            )

    def _stream_config(
        self, name: str, description: str, subjects: str, **extra: Any
    ) -> nats.js.api.StreamConfig:
        """A stream the layer makes: bounded in age and size as the options say."""
        return nats.js.api.StreamConfig(
            name=name,
            description=description,
            subjects=[subjects],
            max_age=float(self.config["stream_max_age"]),
            max_bytes=int(self.config["stream_max_bytes"]),
            num_replicas=int(self.config["stream_replicas"]),
            storage=nats.js.api.StorageType(self.config["stream_storage"]),
            discard=nats.js.api.DiscardPolicy.OLD,
            **extra,
        )

    async def ensure_work_stream(self, nc: Client) -> None:
        """The targeted-delivery stream; made by the layer when it does not exist yet.

        Interest retention: a message is kept until its (channel, group) consumer acks it,
        and one published before any member joined is dropped at once, like a broadcast
        nobody hears (as on the other backends that target).
        """
        jsm = nc.jsm(timeout=self.config["connect_timeout"])
        name = self.work_stream_name
        try:
            info = await jsm.stream_info(name)
        except nats.js.errors.NotFoundError:
            if self.config["work_stream"]:
                raise PubSubError(
                    f"The JetStream stream {name!r} named in PUBSUB_OPTIONS['work_stream'] does "
                    f"not exist; create it with the subjects {self.work_subjects!r} and "
                    "interest or work-queue retention."
                ) from None
            config = self._stream_config(
                name,
                "pulp-pubsub targeted delivery",
                self.work_subjects,
                retention=nats.js.api.RetentionPolicy.INTEREST,
            )
            try:
                info = await jsm.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                try:  # another process made it first
                    info = await jsm.stream_info(name)
                except nats.js.errors.NotFoundError:
                    raise PubSubError(
                        f"JetStream refused to make the stream {name!r} for "
                        f"{self.work_subjects!r}: {exc.description} (does another stream, such "
                        "as a replay stream capturing '>', overlap these subjects?)"
                    ) from None
        if not self._work_stream_checked:
            subjects = info.config.subjects or []
            if self.work_subjects not in subjects:
                raise PubSubError(
                    f"The JetStream stream {name!r} captures {subjects}, not this install's "
                    f"targeted-delivery subjects {self.work_subjects!r}."
                )
            self._work_stream_checked = True
            self._note_window(info)

    async def ensure_work_consumer(self, nc: Client, wire: str, group: str) -> tuple[str, bool]:
        """The durable pull consumer of (``wire``, ``group``), shared by its members.

        A message handed to a member and not acked within ``ack_wait`` (the
        ``claim_timeout``) goes to another; ``max_deliver`` is unlimited, so
        nothing is dropped for having been redelivered often. Returns its name
        and whether it had to be made (what was published while it did not exist
        reached nobody).
        """
        name = self.work_consumer(wire, group)
        subject = self.work_subject(wire, group)
        ack_wait = float(self.config["claim_timeout"])
        jsm = nc.jsm(timeout=self.config["connect_timeout"])
        try:
            info = await jsm.consumer_info(self.work_stream_name, name)
        except nats.js.errors.NotFoundError:
            made = True
        else:
            made = False
            if info.config.ack_wait == ack_wait:
                return name, made
        config = nats.js.api.ConsumerConfig(
            durable_name=name,
            description=f"pulp-pubsub targeted delivery of {subject}",
            filter_subject=subject,
            deliver_policy=nats.js.api.DeliverPolicy.ALL,
            ack_policy=nats.js.api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=-1,
            max_waiting=MAX_WAITING,
        )
        try:
            # Made, or (another claim_timeout) updated: the server changes an existing
            # consumer's ack_wait, so a changed setting takes effect as the fleet restarts.
            await jsm.add_consumer(self.work_stream_name, config)
        except nats.js.errors.BadRequestError:
            if made:
                raise
            # A change this server does not allow: join the consumer as it is.
        return name, made

    async def publish_on(
        self, nc: Client, wire: str, data: bytes, deadline: float | None = None
    ) -> None:
        """Publish on ``nc``; into JetStream, sent again through a leader election.

        ``deadline`` (monotonic) defaults to ``publish_timeout`` from now.
        """
        timeout = self.config["publish_timeout"]
        if deadline is None:
            deadline = time.monotonic() + timeout
        if self.jetstream:
            await self._store(nc, wire, data, deadline, self.stream_name)
        else:
            await nc.publish(wire, data)
            await nc.flush(timeout)

    async def _store(
        self,
        nc: Client,
        wire: str,
        data: bytes,
        deadline: float,
        stream: str,
        msg_id: str | None = None,
        channel: str | None = None,
    ) -> None:
        """Store ``data``; while the stream cannot, the subscribers of ``channel`` (a wire
        name) are told, where they listen to its live subject (see .storing): with the
        message itself (``data`` is the channel's broadcast), or, for a targeted publish
        (``stream`` is the work stream), to resync: every subscriber of the channel hears
        a notice, and a targeted message is for one member of a group only."""
        tell = None
        if channel is not None and self.live:
            live = self.live_subject(channel)
            carried = stream == self.stream_name

            async def tell(msg_id: str) -> None:
                if carried:
                    await nc.publish(live, data, headers={UNSTORED_HEADER: "1", MSG_ID: msg_id})
                else:
                    await nc.publish(live, b"", headers={UNSTORED_HEADER: "1"})

        async def remake(timeout: float) -> None:
            if stream == self.stream_name:
                await self.ensure_stream(nc, timeout)
            else:
                await self.ensure_work_stream(nc)

        await store(
            nc,
            wire,
            data,
            deadline,
            f"the publish of a message to {wire!r}",
            retry=self._retries.get(stream, False),
            no_stream=remake,
            msg_id=msg_id,
            tell=tell,
        )

    async def _connection(self, publisher: _Publisher) -> Client:
        """The publisher's connection; a new one when it has none that lives."""
        nc = publisher.nc
        if nc is not None and nc.is_connected:
            return nc
        if nc is not None:
            await nc.close()
        publisher.nc = None
        publisher.work_ready = False
        nc = publisher.nc = await self.connect(allow_reconnect=False)
        if self.jetstream and not self._stream_checked:
            # Once per backend: a new connection during a leader election would wait
            # for the stream's info; a stream gone since is made again by the publish.
            await self.ensure_stream(nc)
        return nc

    async def _send(
        self,
        publisher: _Publisher,
        wire: str,
        data: bytes,
        deadline: float,
        copies: int = 0,
        channel: str | None = None,
    ) -> None:
        """Publish ``data`` to ``wire``; with ``copies``, that many targeted messages.

        Into JetStream, a publish whose connection dies under it (its server lost) is sent
        again on a new one, to another server, within the same deadline: with the same
        ``Nats-Msg-Id`` (one per copy), so the stream stores it once.
        """
        stream = self.work_stream_name if copies else self.stream_name
        ids = [message_id() for _ in range(copies or 1)]
        while True:
            nc = await self._connection(publisher)
            try:
                if copies:
                    if not publisher.work_ready:
                        await self.ensure_work_stream(nc)
                        publisher.work_ready = True
                    # Each copy is stored (acked by the stream) before the publish returns.
                    # The first copy tells the channel's subscribers when it must wait.
                    tells = [channel] + [None] * (len(ids) - 1)
                    await asyncio.gather(
                        *(
                            self._store(nc, wire, data, deadline, stream, i, told)
                            for i, told in zip(ids, tells, strict=True)
                        )
                    )
                elif self.jetstream:
                    await self._store(nc, wire, data, deadline, stream, ids[0], channel)
                else:
                    await self.publish_on(nc, wire, data, deadline)
                return
            except BaseException as exc:
                # Unknown state (a frozen server, a lost ack): start afresh next time.
                publisher.nc = None
                self._close_later(nc)
                again = self.jetstream and self._retries.get(stream, False)
                if not (again and isinstance(exc, _LOST) and time.monotonic() < deadline):
                    raise
                logger.info(
                    "The NATS connection was lost under a publish to %r (%s): sending it "
                    "again on a new one.",
                    wire,
                    self.explain(exc),
                )

    def _close_later(self, nc: Client) -> None:
        loop_runner().submit(_abandon(nc))

    def send(self, channel: str, payload: str) -> None:
        self._deliver(channel, payload, channel=channel)

    def send_targeted(self, channel: str, payload: str, group: str, receivers: int) -> None:
        self._deliver(self.work_subject(channel, group), payload, receivers, channel)

    def _deliver(
        self, subject: str, payload: str, copies: int = 0, channel: str | None = None
    ) -> None:
        publisher = self._publisher.get()
        timeout = self.config["publish_timeout"]
        deadline = time.monotonic() + timeout
        if not publisher.lock.acquire(timeout=timeout):
            raise PublishError(f"nats backend could not publish within {timeout} s")
        try:
            left = max(0.0, deadline - time.monotonic())
            data = payload.encode("utf-8")
            if not (copies or self.jetstream) and can_run_here():
                # In this thread, not through the loop thread's two wake-ups (see .direct).
                direct = publisher.direct
                if direct is None:
                    direct = publisher.direct = DirectPublisher(self._direct_connect, _abandon)
                direct.publish(subject, data, deadline)
                return
            # A moment past the deadline: the publish's own account of what it waited for
            # (see .storing) is the better error than a bare time-out.
            sending = self._send(publisher, subject, data, deadline, copies, channel)
            loop_runner().run(sending, left + 0.25)
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

    async def _direct_connect(self) -> Client:
        return await self.connect(allow_reconnect=False)

    def open_transport(self) -> NatsTransport:
        return NatsTransport(self, self)

    # -- introspection and lifecycle -----------------------------------------------------

    def subscriber_counts(self, channels: Collection[str]) -> dict[str, int] | None:
        """Counted from the monitoring endpoint's ``/connz?subs=1``; None without one."""
        monitor = self.config["monitor_url"]
        if not monitor:
            return None
        names = list(channels)
        wires = {self.wire_name(name): name for name in names}
        counts = dict.fromkeys(names, 0)
        connz = self._monitor("connz?subs=1&limit=100000").get("connections") or []
        subscribed = [sub for conn in connz for sub in _subjects(conn.get("subscriptions_list"))]
        if not self.jetstream:
            listened = dict(wires)
        else:
            # Subscribers listen to the live subjects the stream republishes to (see
            # .transport); on a stream that does not republish, they are its consumers.
            listened = {self.live_subject(wire): name for wire, name in wires.items()}
            path = "jsz?accounts=true&streams=true&consumers=true&config=true"
            for account in self._monitor(path).get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if stream.get("name") != self.stream_name:
                        continue
                    for consumer in stream.get("consumer_detail") or []:
                        subject = (consumer.get("config") or {}).get("filter_subject")
                        if subject in wires:
                            counts[wires[subject]] += 1
        for subject in subscribed:
            if subject in listened:
                counts[listened[subject]] += 1
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
            info.update(
                stream=self.stream_name,
                stream_subjects=self.stream_subjects,
                work_stream=self.work_stream_name,
                work_subjects=self.work_subjects,
                claim_timeout=self.config["claim_timeout"],
            )
        info["targeted_delivery"] = (
            "native (JetStream pull consumers)" if self.targets else "broadcast (core NATS)"
        )
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
        self._publisher.close()

    def _close_publisher(self, publisher: _Publisher) -> None:
        direct, publisher.direct = publisher.direct, None
        if direct is not None:
            direct.close(self.config["connect_timeout"])
        nc, publisher.nc = publisher.nc, None
        if nc is not None:
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
