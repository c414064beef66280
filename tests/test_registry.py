"""Channel declarations, handler registration and wiring handlers to a subscriber."""

from __future__ import annotations

import sys
import types

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from pulp_pubsub import CANCEL, METRICS_HEARTBEAT, WAKEUP, get_backend, publish
from pulp_pubsub.exceptions import InvalidPayload

from .test_subscriber import MEMORY


def test_the_three_pulp_channels_are_built_in(clean_registry):
    assert {c.name for c in clean_registry.channels()} == {WAKEUP, CANCEL, METRICS_HEARTBEAT}


def test_handlers_are_wired_to_a_subscriber(clean_registry):
    calls: list[tuple[str, str]] = []

    @clean_registry.handler(WAKEUP)
    def on_wakeup(message):
        calls.append(("wakeup", message.payload))

    @clean_registry.handler(CANCEL)
    def on_cancel(message):
        calls.append(("cancel", message.payload))

    with override_settings(**MEMORY), get_backend().subscriber() as sub:
        assert clean_registry.connect(sub) == [CANCEL, WAKEUP]
        publish(WAKEUP, "handle")
        publish(CANCEL, "6f1c1f3e-7e0e-4c59-a0c8-8f1d2b7e9a10")
        while len(calls) < 2:
            sub.dispatch(timeout=5)
    assert calls == [("wakeup", "handle"), ("cancel", "6f1c1f3e-7e0e-4c59-a0c8-8f1d2b7e9a10")]


def test_a_handler_for_an_undeclared_channel_fails_at_registration(clean_registry):
    with pytest.raises(ImproperlyConfigured, match="not declared"):

        @clean_registry.handler("nobody_declared_this")
        def handler(message):
            pass


def test_the_same_handler_twice_fails_at_registration(clean_registry):
    def handler(message):
        pass

    clean_registry.add_handler(WAKEUP, handler)
    with pytest.raises(ImproperlyConfigured, match="registered twice"):
        clean_registry.add_handler(WAKEUP, handler)


def test_redeclaring_a_channel_differently_is_an_error(clean_registry):
    clean_registry.declare("app.events", "first")
    clean_registry.declare("app.events", "first")  # identical: fine
    with pytest.raises(ImproperlyConfigured, match="already declared"):
        clean_registry.declare("app.events", "second")


@pytest.mark.parametrize(
    "channel, payload",
    [
        (WAKEUP, "unblock"),
        (WAKEUP, "handle"),
        (WAKEUP, "a reason a later pulpcore adds"),  # receivers do both; never refused
        (CANCEL, "6f1c1f3e-7e0e-4c59-a0c8-8f1d2b7e9a10"),
        (METRICS_HEARTBEAT, "2026-11-26 22:02:04.317465+00:00"),  # what Pulp sends: str(datetime)
        (METRICS_HEARTBEAT, "2026-11-26T22:02:04+00:00"),
    ],
)
def test_the_pulp_payloads_pass_their_checks(clean_registry, channel, payload):
    clean_registry.check_payload(channel, payload)


@pytest.mark.parametrize(
    "channel, payload, expects",
    [
        (CANCEL, "not-a-uuid", "a task UUID"),
        (METRICS_HEARTBEAT, "yesterday", "ISO-8601"),
    ],
)
def test_a_payload_that_fails_its_channel_check_is_refused(
    clean_registry, channel, payload, expects
):
    with override_settings(**MEMORY), get_backend().subscriber() as sub:
        got: list[str] = []
        sub.subscribe(channel, lambda m: got.append(m.payload))
        with pytest.raises(InvalidPayload, match=expects):
            publish(channel, payload)
        get_backend().publish(channel, "marker")  # the backend itself has no channel checks
        sub.dispatch(timeout=5)
        assert got == ["marker"]


def test_autodiscovery_imports_each_apps_pubsub_module(clean_registry, monkeypatch):
    calls: list[str] = []

    def fake_autodiscover(name):
        calls.append(name)
        module = types.ModuleType("someapp.pubsub")
        sys.modules["someapp.pubsub"] = module
        clean_registry.declare("someapp.things", "from someapp")

    module = sys.modules["pulp_pubsub.registry"]  # the attribute of the package is the instance
    monkeypatch.setattr(module, "autodiscover_modules", fake_autodiscover)
    clean_registry.autodiscover()
    assert calls == ["pubsub"]
    assert "someapp.things" in {c.name for c in clean_registry.channels()}
    sys.modules.pop("someapp.pubsub")


def test_the_demo_apps_module_was_discovered_at_startup():
    from pulp_pubsub import registry

    assert "demo_events" in {c.name for c in registry.channels()}
