"""Who may ask the fleet, and how often it answers.

Anyone who can publish on the server can put a message on the control
channel, so an answer must not follow from server access alone. A query is
signed with a key the fleet shares (HMAC-SHA256); a subscriber answers only
a query whose signature checks, whose timestamp is within :data:`WINDOW`
seconds of its own clock, and whose id it has not seen before (a replay
within the window is caught by the id, one outside it by the timestamp).
Every subscriber also answers at most ``PUBSUB_INTROSPECTION_RATE`` queries a
minute (a token bucket of that size), so a flood, even of valid queries,
costs the fleet a bounded number of answers. Answers are signed too, so a
party that reads a query's reply channel off the wire cannot pass its own
answers to a health check.

The key is ``PUBSUB_CONTROL_KEY`` when set, else derived from Django's
``SECRET_KEY``, which every process of a Pulp install already shares. Either
way it goes through HMAC with a label of its own, so the bytes that sign
control messages are never the bytes that sign Django's sessions.

Settings are read when a subscriber or a client is made, never at import.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

ENABLED_SETTING = "PUBSUB_INTROSPECTION"
KEY_SETTING = "PUBSUB_CONTROL_KEY"
RATE_SETTING = "PUBSUB_INTROSPECTION_RATE"
CHANNELS_SETTING = "PUBSUB_INTROSPECTION_CHANNELS"
METRICS_CHANNELS_SETTING = "PUBSUB_METRICS_CHANNEL_ATTRIBUTES"

DEFAULT_RATE = 30
#: Shortest ``PUBSUB_CONTROL_KEY`` accepted (and the length below which a
#: ``SECRET_KEY`` used for it earns a deployment warning).
MIN_KEY_LENGTH = 32
#: Seconds a query stays valid either side of the answerer's clock: the
#: fleet's clocks must agree to within this.
WINDOW = 30.0
#: Query ids remembered per subscriber; when full (only valid queries get in),
#: new queries are refused rather than the memory growing.
MAX_SEEN = 4096
#: (query id, reply channel, the querier's wall-clock time).
Query = tuple[str, str, float]
_LABEL = b"pulp-pubsub control channel v1"
_VERSION = "v1"
#: What a signature adds to a payload: "v1 ", 64 hex digits and a space.
OVERHEAD = len(_VERSION) + 1 + 64 + 1


class SigningKey(bytes):
    """The derived key: bytes to ``hmac``, ``b'***'`` to a traceback or a debugger."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "b'***'"


@dataclass(frozen=True)
class ControlPolicy:
    """The control-channel settings of this process, read once per subscriber."""

    answers: bool
    rate: float
    channels: bool
    #: None when no key can be had (no SECRET_KEY): nothing is answered then.
    key: bytes | None = field(default=None, repr=False)
    key_error: str | None = None


def policy() -> ControlPolicy:
    """This process's policy; ImproperlyConfigured for a setting of the wrong type.

    A missing key is not an error here (a process may never be asked): the
    policy then answers nothing and says why in ``key_error``.
    """
    answers = getattr(settings, ENABLED_SETTING, True)
    rate = getattr(settings, RATE_SETTING, DEFAULT_RATE)
    channels = getattr(settings, CHANNELS_SETTING, None)
    if channels is None:
        channels = getattr(settings, METRICS_CHANNELS_SETTING, True)
    for name, value in ((ENABLED_SETTING, answers), (CHANNELS_SETTING, channels)):
        if not isinstance(value, bool):
            raise ImproperlyConfigured(f"{name} must be True or False, not {value!r}.")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
        raise ImproperlyConfigured(
            f"{RATE_SETTING} must be a positive number (answers per minute), not {rate!r}."
        )
    try:
        key, key_error = control_key(), None
    except ImproperlyConfigured as exc:
        key, key_error = None, str(exc)
    return ControlPolicy(
        answers=answers, rate=float(rate), channels=channels, key=key, key_error=key_error
    )


def control_key() -> bytes:
    """The fleet's signing key; ImproperlyConfigured when there is none."""
    explicit = getattr(settings, KEY_SETTING, None)
    if explicit is not None:
        if not isinstance(explicit, str) or len(explicit) < MIN_KEY_LENGTH:
            raise ImproperlyConfigured(
                f"{KEY_SETTING} must be a string of at least {MIN_KEY_LENGTH} characters."
            )
        material = explicit
    else:
        # Django raises ImproperlyConfigured itself for an empty SECRET_KEY.
        material = settings.SECRET_KEY
        if not isinstance(material, str) or not material:
            raise ImproperlyConfigured(f"Neither {KEY_SETTING} nor SECRET_KEY is set.")
    return SigningKey(hmac.new(material.encode(), _LABEL, hashlib.sha256).digest())


def sign(key: bytes, kind: str, wire: str, body: str) -> str:
    """``body`` with its signature, bound to its kind and to the wire channel it goes to.

    Binding the channel keeps a query of one install (one channel prefix)
    from being replayed to another that shares the key.
    """
    return f"{_VERSION} {_mac(key, kind, wire, body)} {body}"


def verify(key: bytes, kind: str, wire: str, payload: str) -> str | None:
    """The body of a correctly signed ``payload``, else None."""
    version, _, rest = payload.partition(" ")
    mac, _, body = rest.partition(" ")
    if version != _VERSION or len(mac) != 64:
        return None
    if not hmac.compare_digest(mac, _mac(key, kind, wire, body)):
        return None
    return body


def _mac(key: bytes, kind: str, wire: str, body: str) -> str:
    message = f"{kind}\n{wire}\n{body}".encode("utf-8", "surrogatepass")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class Gate:
    """One subscriber's door: signature, freshness, replay and rate.

    Used only by that subscriber's listener thread. ``refused`` counts what
    was turned away, by reason.
    """

    def __init__(
        self,
        policy: ControlPolicy,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.refused: Counter[str] = Counter()
        self.admitted = 0
        self._wall, self._clock = wall, clock
        self._seen: dict[str, float] = {}
        self._capacity = max(policy.rate, 1.0)
        self._tokens = self._capacity
        self._filled_at = clock()

    def admit(self, wire: str, payload: str, parse: Callable[[str], Query | None]) -> Query | None:
        """The parsed query when it may be answered now, else None."""
        key = self.policy.key
        if not self.policy.answers or key is None:
            self.refused["off"] += 1
            return None
        body = verify(key, "query", wire, payload)
        if body is None:
            self.refused["unauthenticated"] += 1
            return None
        query = parse(body)
        if query is None:
            self.refused["malformed"] += 1
            return None
        query_id, _, sent_at = query
        now = self._wall()
        if abs(now - sent_at) > WINDOW:
            self.refused["stale"] += 1
            return None
        if query_id in self._seen:
            self.refused["replayed"] += 1
            return None
        if len(self._seen) >= MAX_SEEN:
            self._seen = {q: t for q, t in self._seen.items() if t >= now}
            if len(self._seen) >= MAX_SEEN:
                self.refused["rate"] += 1
                return None
        # Kept by the query's own time: once that is out of the window, the
        # timestamp check refuses a replay by itself.
        self._seen[query_id] = sent_at + WINDOW
        if not self._take_token():
            self.refused["rate"] += 1
            return None
        self.admitted += 1
        return query

    def _take_token(self) -> bool:
        now = self._clock()
        refill = (now - self._filled_at) * self.policy.rate / 60.0
        self._tokens = min(self._capacity, self._tokens + refill)
        self._filled_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


def query_body(query_id: str, reply: str, sent_at: float | None = None) -> str:
    return json.dumps(
        {"query": query_id, "reply": reply, "ts": time.time() if sent_at is None else sent_at},
        separators=(",", ":"),
    )
