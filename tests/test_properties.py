"""Arbitrary channel names and payloads, on every backend: byte-exact, or refused up front.

"Refused up front" means an ``InvalidChannel`` / ``InvalidPayload`` raised before anything is
sent, with a message that says the rule. What passes the checks must be accepted by the
server: the subscriber never has to reconnect over it, publish() never fails over it, and
(on PostgreSQL, whose log says so) the server logs no error for it.
"""

from __future__ import annotations

import os
import unicodedata
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pulp_pubsub.backends.listener.responder import CONTROL_CHANNEL
from pulp_pubsub.backends.listener.subscriber import RESERVED_PREFIXES
from pulp_pubsub.exceptions import InvalidChannel, InvalidPayload, PublishError
from pulp_pubsub.validation import FORBIDDEN_CHARACTERS, MAX_CHANNEL_BYTES

from .reliability_util import FAST, Inbox, build

EXAMPLES = settings(
    max_examples=50,
    deadline=None,
    database=None,  # no example files left in the checkout; failures print their example
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

#: Every code point, surrogates and controls included.
ANY_CHARACTER = st.characters(codec=None, exclude_categories=())
#: Characters a channel name may hold, to make accepted names common.
NAME_CHARACTER = st.characters(
    exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"),
    exclude_characters=FORBIDDEN_CHARACTERS,
)
NAMES = st.one_of(
    st.text(ANY_CHARACTER, max_size=70),
    st.text(NAME_CHARACTER, min_size=1, max_size=40),
    st.text(NAME_CHARACTER, min_size=55, max_size=70),  # around the 63-byte limit
)
PAYLOADS = st.one_of(
    st.text(ANY_CHARACTER, max_size=200),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=50),
    # Around PostgreSQL's 7,999-byte limit, in 1-, 2-, 3- and 4-byte characters.
    st.builds(
        lambda char, size: char * (size // len(char.encode())),
        st.sampled_from(["a", "é", "€", "😀"]),
        st.integers(7990, 8010),
    ),
)


class Rig:
    """One backend and one subscriber for every example of a test."""

    def __init__(self, harness: Any) -> None:
        self.harness = harness
        self.backend = build(harness, **FAST)
        self.sub = self.backend.subscriber()
        self.inbox = Inbox(self.sub)
        self.log_start = self._log_size()

    def _log_size(self) -> int:
        path = getattr(getattr(self.harness, "server", None), "log_path", None)
        return os.path.getsize(path) if path and os.path.exists(path) else 0

    def server_errors(self) -> list[str]:
        """ERROR lines PostgreSQL logged since the rig was built (other servers log none)."""
        if self.harness.name != "postgres":
            return []
        with open(self.harness.server.log_path, errors="replace") as log:
            log.seek(self.log_start)
            return [line for line in log if "ERROR:" in line]

    def round_trip(self, channel: str, payload: str) -> None:
        self.inbox.messages.clear()
        self.backend.publish(channel, payload)
        self.inbox.wait(lambda ms: any(m.channel == channel and m.payload == payload for m in ms))

    def close(self) -> None:
        self.sub.close()
        self.backend.close()


@pytest.fixture
def rig(harness) -> Iterator[Rig]:
    rig = Rig(harness)
    try:
        yield rig
    finally:
        rig.close()
    assert rig.server_errors() == []


def name_problem(name: str) -> str | None:
    """Why the shared rules refuse ``name``, written independently of the layer's check."""
    if not name:
        return "empty"
    for char in name:
        if char.isspace() or char in FORBIDDEN_CHARACTERS:
            return "character"
        if unicodedata.category(char) in {"Cc", "Cf", "Cs", "Co", "Cn"}:
            return "character"
    if len(name.encode("utf-8")) > MAX_CHANNEL_BYTES:
        return "length"
    return None


def payload_problem(payload: str, harness: Any) -> str | None:
    try:
        size = len(payload.encode("utf-8"))
    except UnicodeEncodeError:
        return "UTF-8"
    if "\x00" in payload and not harness.allows_nul:
        return "NUL"
    if harness.payload_limit is not None and size > harness.payload_limit:
        return "limit"
    return None


@EXAMPLES
@given(name=NAMES)
@example(name="pubsub_reply_")
def test_a_channel_name_round_trips_exactly_or_is_refused_up_front(rig, name):
    problem = name_problem(name)
    published_before = rig.backend.stats["published"]
    if problem:
        with pytest.raises(InvalidChannel) as refused:
            rig.sub.subscribe(name, rig.inbox)
        message = str(refused.value)
        assert "channel name" in message
        assert {"empty": "empty", "character": "contains", "length": "limit"}[problem] in message
        with pytest.raises(InvalidChannel):
            rig.backend.publish(name, "x")
        assert rig.backend.stats["published"] == published_before
        assert name not in rig.sub.channels
        return
    if name == CONTROL_CHANNEL or name.startswith(RESERVED_PREFIXES):
        # A valid name the layer keeps for its probes and introspection: no one may listen.
        with pytest.raises(InvalidChannel, match="reserved"):
            rig.sub.subscribe(name, rig.inbox)
        assert name not in rig.sub.channels
        return
    rig.sub.subscribe(name, rig.inbox)
    try:
        token = uuid.uuid4().hex
        rig.round_trip(name, token)
    finally:
        rig.sub.unsubscribe(name)
    assert rig.sub.stats["reconnects"] == 0, rig.sub.last_error


@EXAMPLES
@given(payload=PAYLOADS)
def test_a_payload_round_trips_byte_exact_or_is_refused_up_front(rig, payload):
    channel = "property_payloads"
    if channel not in rig.sub.channels:
        rig.sub.subscribe(channel, rig.inbox)
    problem = payload_problem(payload, rig.harness)
    published_before = rig.backend.stats["published"]
    if problem:
        with pytest.raises(InvalidPayload) as refused:
            rig.backend.publish(channel, payload)
        message = str(refused.value)
        expected = {"UTF-8": "UTF-8", "NUL": "NUL", "limit": "limit"}[problem]
        assert expected in message
        if problem == "limit":
            assert str(rig.harness.payload_limit) in message.replace(",", "")
        assert rig.backend.stats["published"] == published_before
        return
    try:
        rig.round_trip(channel, payload)
    except PublishError as exc:  # pragma: no cover - the failure message is the point
        raise AssertionError(f"the server refused a payload the layer let through: {exc}") from exc
    [got] = [m for m in rig.inbox.messages if m.channel == channel and m.payload == payload][:1]
    assert got.payload.encode("utf-8") == payload.encode("utf-8")
    assert rig.sub.stats["reconnects"] == 0, rig.sub.last_error


@EXAMPLES
@given(prefix=st.text(NAME_CHARACTER, min_size=1, max_size=8), name=NAMES)
def test_a_prefixed_name_is_checked_as_a_whole_before_it_reaches_the_server(harness, prefix, name):
    if name_problem(prefix):  # PUBSUB_CHANNEL_PREFIX itself is refused at start-up
        with pytest.raises(InvalidChannel):
            build(harness, prefix=prefix)
        return
    backend = build(harness, prefix=prefix, **FAST)
    try:
        wire = prefix + name
        if name_problem(name) or name_problem(wire):
            with pytest.raises(InvalidChannel):
                backend.publish(name, "x")
            assert backend.stats["published"] == 0
        else:
            # A backend may map names to the wire its own way (NATS escapes '.'), one to one.
            mapped = getattr(harness, "wire_name", lambda prefix, name: prefix + name)
            assert backend.wire_name(name) == mapped(prefix, name)
            wire = backend.wire_name(name)
            assert backend.channel_name(wire) == name
    finally:
        backend.close()
