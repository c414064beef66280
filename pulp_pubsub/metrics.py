"""Every event the layer counts goes through :func:`count`.

The in-process ``stats`` counters of backends and subscribers are updated
here, in one place, and the same events are exported as OpenTelemetry
metrics, so the code that counts knows nothing about exporting.

OpenTelemetry is optional (``pip install "pulp-pubsub[otel]"``). Without
``opentelemetry-api`` only ``stats`` is updated. With it, the instruments
are created once per process, on the first event, from
``opentelemetry.metrics.get_meter("pulp_pubsub")``. Until the application
installs an SDK (Pulp does when ``OTEL_ENABLED`` is set) that meter is the
API's proxy: recording is a no-op, and an SDK installed later, even after
the first event, takes over the instruments already made.

The instruments; every one carries ``messaging.system`` (the backend's
alias: ``postgres``, ``redis``, ``memory``...), and those about a channel
carry ``messaging.destination.name``:

- ``messaging.client.sent.messages``: publishes handed to the server, with
  ``messaging.operation.name=publish``; a failed one also has ``error.type``.
- ``messaging.client.consumed.messages``: messages dispatched to callbacks
  (resync messages too), with ``messaging.operation.name=dispatch``.
- ``pulp_pubsub.received.messages``: messages from the server queued for dispatch.
- ``pulp_pubsub.folded.messages``: messages folded into an identical one waiting.
- ``pulp_pubsub.dropped.messages``: messages dropped by a full queue (a resync
  replaces them).
- ``pulp_pubsub.handler.errors``: callbacks that raised, with ``error.type``.
- ``pulp_pubsub.publish.deferred_failures``: publishes deferred to a commit
  that then failed, with ``error.type`` (also in ``sent.messages``).
- ``pulp_pubsub.reconnects``: subscriber connection failures, each followed by
  a reconnect attempt, with ``error.type``; no channel.
- ``pulp_pubsub.resyncs``: resync messages ("messages may have been missed").
- ``pulp_pubsub.degraded``: outages in which a subscriber went degraded (periodic
  resyncs while its server is unreachable); no channel.
- ``pulp_pubsub.probe.failures``: liveness probes that did not come back; no channel.
- ``pulp_pubsub.probe.duration``: histogram of liveness probe round trips, in seconds.
- ``pulp_pubsub.subscriptions``: observable up-down counter, channels subscribed
  to by this process's open subscribers.
- ``pulp_pubsub.subscribers``: observable up-down counter, this process's open
  subscribers by ``pulp_pubsub.connected`` (``true``/``false``): a subscriber
  that went deaf shows up as ``false``.
- ``pulp_pubsub.events``: any other counted event, named by ``pulp_pubsub.event``.

``messaging.destination.name`` is the channel as the application names it,
without ``PUBSUB_CHANNEL_PREFIX``.

Setting ``PUBSUB_METRICS_CHANNEL_ATTRIBUTES`` (default ``True``, a bool):
when ``False``, no instrument carries ``messaging.destination.name``, for
installs whose channel names are unbounded (one per task, say) and would
make a metric series each, or that must not leave the process. Every
backend reads it.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

from django.conf import settings
from django.core.signals import setting_changed

logger = logging.getLogger(__name__)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class Observed(Protocol):
    """What the observable instruments read of a subscriber.

    A protocol, not the listener's class: the listener counts through this module.
    """

    @property
    def backend(self) -> _Named: ...

    @property
    def channels(self) -> Sequence[str]: ...

    @property
    def connected(self) -> bool: ...

    @property
    def closed(self) -> bool: ...


METER_NAME = "pulp_pubsub"
CHANNEL_SETTING = "PUBSUB_METRICS_CHANNEL_ATTRIBUTES"

SYSTEM = "messaging.system"
OPERATION = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
ERROR_TYPE = "error.type"

#: event -> (instrument, unit, description, fixed attributes)
EVENTS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "published": (
        "messaging.client.sent.messages",
        "{message}",
        "Messages the producer attempted to send to the server.",
        {OPERATION: "publish"},
    ),
    "delivered": (
        "messaging.client.consumed.messages",
        "{message}",
        "Messages dispatched to the application's callbacks, resync messages included.",
        {OPERATION: "dispatch"},
    ),
    "received": (
        "pulp_pubsub.received.messages",
        "{message}",
        "Messages that arrived from the server and were queued for dispatch.",
        {},
    ),
    "folded": (
        "pulp_pubsub.folded.messages",
        "{message}",
        "Messages folded into an identical one already waiting for dispatch.",
        {},
    ),
    "dropped": (
        "pulp_pubsub.dropped.messages",
        "{message}",
        "Messages dropped by a full subscriber queue (a resync replaces them).",
        {},
    ),
    "handler_errors": (
        "pulp_pubsub.handler.errors",
        "{error}",
        "Callbacks that raised an exception.",
        {},
    ),
    "deferred_failures": (
        "pulp_pubsub.publish.deferred_failures",
        "{message}",
        "Publishes deferred to a transaction's commit that then failed.",
        {},
    ),
    "reconnects": (
        "pulp_pubsub.reconnects",
        "{reconnect}",
        "Subscriber connection failures, each followed by an attempt to reconnect.",
        {},
    ),
    "degraded": (
        "pulp_pubsub.degraded",
        "{outage}",
        "Outages in which a subscriber went degraded: a resync on each channel every "
        "outage_interval until its server was back.",
        {},
    ),
    "resyncs": (
        "pulp_pubsub.resyncs",
        "{resync}",
        "Resync messages: messages on the channel may have been missed.",
        {},
    ),
    "probe_failures": (
        "pulp_pubsub.probe.failures",
        "{probe}",
        "Liveness probes that could not be sent or did not come back in time.",
        {},
    ),
}
#: Failed publishes are sent messages with ``error.type`` set.
EVENTS["publish_errors"] = EVENTS["published"]

OTHER_EVENTS = "pulp_pubsub.events"
PROBE_DURATION = "pulp_pubsub.probe.duration"
SUBSCRIPTIONS = "pulp_pubsub.subscriptions"
SUBSCRIBERS = "pulp_pubsub.subscribers"
#: OpenTelemetry's recommended buckets for durations in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


def count(
    stats: Counter[str],
    event: str,
    backend: str,
    channel: str | None = None,
    *,
    error: BaseException | None = None,
    n: int = 1,
) -> None:
    """Count ``n`` of ``event`` of ``backend`` (on ``channel``, failing with ``error``)."""
    stats[event] += n
    instruments = _made_instruments if _made else _instruments()
    if instruments is None:
        return
    if channel is not None and not (
        _channel_attributes if _channel_attributes is not None else channel_attributes()
    ):
        channel = None
    if error is None:
        # Every message counts two or three times on its way: its instrument and attributes
        # are made once per (event, backend, channel) and handed over unchanged (an SDK
        # copies the attributes it keeps; nothing here changes them after).
        key = (event, backend, channel)
        found = _recorded.get(key)
        if found is None:
            found = _describe(event, backend, channel, None)
            if len(_recorded) < RECORDED_LIMIT:
                _recorded[key] = found
    else:
        found = _describe(event, backend, channel, error)
    name, attributes = found
    try:
        instruments.counters[name].add(n, attributes)
    except Exception:
        # An exporter's problem must never become the listener's.
        logger.debug("Recording %s failed", name, exc_info=True)


def _describe(
    event: str, backend: str, channel: str | None, error: BaseException | None
) -> tuple[str, dict[str, str]]:
    """The instrument that counts ``event`` and the attributes of this count.

    ``channel``: None where the channel is not to be named (see ``channel_attributes()``).
    """
    name, _, _, fixed = EVENTS.get(event, (OTHER_EVENTS, "", "", {"pulp_pubsub.event": event}))
    attributes = {SYSTEM: backend, **fixed}
    if channel is not None:
        attributes[DESTINATION] = channel
    if error is not None:
        attributes[ERROR_TYPE] = error_type(error)
    return name, attributes


def record_probe_rtt(backend: str, seconds: float) -> None:
    """Record one liveness probe's round trip."""
    instruments = _instruments()
    if instruments is None:
        return
    try:
        instruments.probe_duration.record(seconds, {SYSTEM: backend})
    except Exception:
        logger.debug("Recording %s failed", PROBE_DURATION, exc_info=True)


def track(subscriber: Observed) -> None:
    """Let the observable instruments see ``subscriber`` while it lives."""
    with _tracked_lock:
        _tracked.add(subscriber)


def error_type(error: BaseException) -> str:
    """The exception's class, fully qualified as ``error.type`` wants it."""
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def channel_attributes() -> bool:
    """Whether instruments may carry channel names (``PUBSUB_METRICS_CHANNEL_ATTRIBUTES``)."""
    global _channel_attributes
    value = _channel_attributes
    if value is None:
        value = bool(getattr(settings, CHANNEL_SETTING, True)) if settings.configured else True
        _channel_attributes = value
    return value


# -- the instruments -------------------------------------------------------------


class _Instruments:
    def __init__(self, meter: Any) -> None:
        self.counters: dict[str, Any] = {}
        for name, unit, description, _ in EVENTS.values():
            if name not in self.counters:
                self.counters[name] = meter.create_counter(name, unit, description)
        self.counters[OTHER_EVENTS] = meter.create_counter(
            OTHER_EVENTS, "{event}", "Counted events that have no instrument of their own."
        )
        description = "Round trip of a subscriber's liveness probe through the server."
        try:
            self.probe_duration = meter.create_histogram(
                PROBE_DURATION,
                "s",
                description,
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
        except TypeError:  # opentelemetry-api older than 1.23 takes no advice
            self.probe_duration = meter.create_histogram(PROBE_DURATION, "s", description)
        meter.create_observable_up_down_counter(
            SUBSCRIPTIONS,
            callbacks=[_observe_subscriptions],
            unit="{subscription}",
            description="Channels subscribed to by this process's open subscribers.",
        )
        meter.create_observable_up_down_counter(
            SUBSCRIBERS,
            callbacks=[_observe_subscribers],
            unit="{subscriber}",
            description="This process's open subscribers, by whether they are connected.",
        )


_lock = threading.Lock()
_made = False
_made_instruments: _Instruments | None = None
_channel_attributes: bool | None = None
#: (event, backend, channel or None) -> (instrument, attributes) of counts without an error.
_recorded: dict[tuple[str, str, str | None], tuple[str, dict[str, str]]] = {}
#: Counted series remembered at most: channel names may be unbounded (one per task, say).
RECORDED_LIMIT = 4096
_tracked_lock = threading.Lock()
_tracked: weakref.WeakSet[Observed] = weakref.WeakSet()


def _instruments() -> _Instruments | None:
    global _made, _made_instruments
    if _made:
        return _made_instruments
    with _lock:
        if not _made:
            try:
                from opentelemetry import metrics
            except ImportError:
                pass
            else:
                _made_instruments = _Instruments(metrics.get_meter(METER_NAME))
            _made = True
    return _made_instruments


def _live_subscribers() -> list[Observed]:
    with _tracked_lock:
        subscribers = list(_tracked)
    return [sub for sub in subscribers if not sub.closed]


def _observe_subscriptions(options: Any) -> Iterator[Any]:
    from opentelemetry.metrics import Observation

    per_key: Counter[tuple[str, str | None]] = Counter()
    named = channel_attributes()
    for sub in _live_subscribers():
        for channel in sub.channels:
            per_key[sub.backend.name, channel if named else None] += 1
    for (backend, name), n in sorted(per_key.items(), key=str):
        attributes = {SYSTEM: backend}
        if name is not None:
            attributes[DESTINATION] = name
        yield Observation(n, attributes)


def _observe_subscribers(options: Any) -> Iterable[Any]:
    from opentelemetry.metrics import Observation

    per_key: Counter[tuple[str, bool]] = Counter()
    for sub in _live_subscribers():
        per_key[sub.backend.name, True] += 0
        per_key[sub.backend.name, False] += 0
        per_key[sub.backend.name, sub.connected] += 1
    return [
        Observation(n, {SYSTEM: backend, "pulp_pubsub.connected": connected})
        for (backend, connected), n in sorted(per_key.items())
    ]


def _after_fork_in_child() -> None:
    # A thread of the parent may have held a lock at fork(); the child's copy
    # would then stay locked, and the child's first Subscriber would hang.
    global _lock, _tracked_lock
    _lock = threading.Lock()
    _tracked_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _reset_on_change(*, setting: str, **kwargs: object) -> None:
    global _channel_attributes
    if setting == CHANNEL_SETTING:
        _channel_attributes = None


setting_changed.connect(_reset_on_change, dispatch_uid="pulp_pubsub.metrics.reset")
