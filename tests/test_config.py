"""Settings, backend loading, system checks and the naming and payload rules."""

from __future__ import annotations

import os

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.test import override_settings

from pulp_pubsub import checks as pubsub_checks
from pulp_pubsub import get_backend, publish
from pulp_pubsub.backends.memory import MemoryBackend
from pulp_pubsub.conf import hide_password
from pulp_pubsub.exceptions import (
    InvalidBackendError,
    InvalidChannel,
    InvalidPayload,
    MissingDependency,
)
from pulp_pubsub.handler import backend_class

from .test_subscriber import MEMORY


@pytest.fixture
def listening():
    """A memory subscriber on channel ``a`` and the list its messages land in."""
    got: list[str] = []
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}), get_backend().subscriber() as sub:
        sub.subscribe("a", lambda m: got.append(m.payload))
        sub.subscribe("marker", lambda m: got.append("<marker>"))
        yield sub, got


def drain(sub, got):
    """Send a marker and dispatch until it arrives: everything sent before it is in.

    The marker bypasses on-commit deferral, so this works inside ``atomic()`` too.
    """
    MemoryBackend(publish_on_commit=False).publish("marker")
    while "<marker>" not in got:
        sub.dispatch(timeout=5)
    got.remove("<marker>")
    return got


@override_settings(PUBSUB_BACKEND="memory")
def test_the_backend_is_cached_and_rebuilt_when_a_setting_changes():
    first = get_backend()
    assert get_backend() is first
    with override_settings(PUBSUB_CHANNEL_PREFIX="site1."):
        second = get_backend()
        assert second is not first
        assert second.channel_prefix == "site1."
    assert get_backend().channel_prefix == ""


def test_a_project_that_sets_nothing_gets_postgres(settings):
    for name in ["PUBSUB_BACKEND", "PUBSUB_URL", "PUBSUB_OPTIONS"]:
        delattr(settings, name)
    assert backend_class("postgres").__name__ == "PostgresBackend"
    from pulp_pubsub.conf import get_settings

    assert get_settings().backend_path.endswith("PostgresBackend")


def test_a_dotted_path_names_a_backend_class():
    assert backend_class("pulp_pubsub.backends.memory.MemoryBackend") is MemoryBackend


@pytest.mark.parametrize(
    "setting, message",
    [
        ("nosuch", "neither a known alias"),
        ("nosuch.module.Backend", "Could not import pub/sub backend 'nosuch.module.Backend'"),
        ("pulp_pubsub.conf.get_settings", "is not a subclass of BaseBackend"),
        (42, "neither a known alias"),
    ],
)
def test_a_bad_backend_setting_is_a_clear_configuration_error(setting, message):
    with pytest.raises(InvalidBackendError, match=message):
        backend_class(setting)
    assert issubclass(InvalidBackendError, ImproperlyConfigured)


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    def fail(path):
        raise ModuleNotFoundError("No module named 'redis'", name="redis")

    monkeypatch.setattr("pulp_pubsub.handler.import_string", fail)
    with pytest.raises(MissingDependency, match=r'pip install "pulp-pubsub\[redis\]"'):
        backend_class("redis")


def test_an_unknown_option_names_the_backend_and_the_option():
    with pytest.raises(ImproperlyConfigured, match="Invalid option 'colour' for MemoryBackend"):
        MemoryBackend(options={"colour": "blue"})


@pytest.mark.parametrize("value", [-0.5, "0.01", True])
def test_send_interval_may_be_zero_but_not_negative(value):
    assert MemoryBackend(options={"send_interval": 0}).config["send_interval"] == 0
    with pytest.raises(ImproperlyConfigured, match=r"'send_interval'.* must be a number >= 0"):
        MemoryBackend(options={"send_interval": value})


@pytest.mark.parametrize("value", [0, -1, "5", True])
def test_a_numeric_option_must_be_a_positive_number(value):
    with pytest.raises(ImproperlyConfigured, match="must be a positive number"):
        MemoryBackend(options={"probe_interval": value})


@pytest.mark.parametrize("value", [0, "no", None])
def test_owner_reads_must_be_true_or_false(value):
    assert MemoryBackend(options={"owner_reads": False}).config["owner_reads"] is False
    with pytest.raises(ImproperlyConfigured, match=r"'owner_reads'.* must be True or False"):
        MemoryBackend(options={"owner_reads": value})


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "cannot be empty"),
        ("x" * 64, "64 bytes long; the limit is 63"),
        ("é" * 32, "64 bytes long"),
        ("two words", "whitespace"),
        ("tab\there", "whitespace"),
        ("bell\x07", "control"),
        ("quote'", "character"),
        ('dq"', "character"),
        ("semi;colon", "character"),
        ("a;DROP TABLE x", "character"),
        ("star*", "character"),
        (None, "must be a str"),
        (b"bytes", "must be a str"),
    ],
)
def test_bad_channel_names_are_refused_and_nothing_is_delivered(listening, name, problem):
    sub, got = listening
    with pytest.raises(InvalidChannel, match=problem):
        publish(name, "x")
    with pytest.raises(InvalidChannel, match=problem):
        sub.subscribe(name, lambda m: None)
    assert drain(sub, got) == []


def test_names_that_need_quoting_elsewhere_are_fine_and_case_sensitive(listening):
    sub, got = listening
    sub.subscribe("Upper.Case-Name_1", lambda m: got.append("U:" + m.payload))
    publish("Upper.Case-Name_1", "x")
    publish("upper.case-name_1", "lower")
    assert drain(sub, got) == ["U:x"]


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b"bytes", "must be a str"),
        (7, "must be a str"),
        ("x" * 8000, "8000 bytes; the memory backend's limit is 7999 bytes"),
        ("é" * 4000, "8000 bytes"),
        ("nul\x00", "NUL"),
        ("\ud800", "cannot be encoded as UTF-8"),
    ],
)
def test_bad_payloads_are_refused_before_sending(listening, payload, problem):
    sub, got = listening
    with pytest.raises(InvalidPayload, match=problem):
        publish("a", payload)
    assert drain(sub, got) == []


def test_the_largest_payload_arrives_byte_exact(listening):
    sub, got = listening
    payload = "é" * 3999 + "x"  # 7,999 UTF-8 bytes
    publish("a", payload)
    assert drain(sub, got) == [payload]


def test_the_prefix_is_applied_on_the_wire_and_hidden_from_receivers():
    with override_settings(**{**MEMORY, "PUBSUB_CHANNEL_PREFIX": "one."}):
        one = get_backend()
        got: list[tuple[str, str]] = []
        with one.subscriber() as sub:
            sub.subscribe("a", lambda m: got.append((m.channel, m.payload)))
            other = MemoryBackend(channel_prefix="two.")
            other.publish("a", "crosstalk")
            one.publish("a", "mine")
            sub.dispatch(timeout=5)
        assert got == [("a", "mine")]
        assert one.wire_name("a") == "one.a"


def test_a_prefix_that_makes_a_name_too_long_is_refused():
    backend = MemoryBackend(channel_prefix="p" * 60)
    with pytest.raises(InvalidChannel, match="prefixed channel name"):
        backend.publish("abcd", "x")


@pytest.mark.django_db(transaction=True)
def test_a_publish_inside_atomic_waits_for_the_commit(listening):
    sub, got = listening
    with transaction.atomic():
        publish("a", "committed")
        assert drain(sub, got) == []
    assert drain(sub, got) == ["committed"]


@pytest.mark.django_db(transaction=True)
def test_a_rollback_drops_the_publish(listening):
    sub, got = listening
    with pytest.raises(RuntimeError), transaction.atomic():
        publish("a", "rolled back")
        raise RuntimeError("abort")
    assert drain(sub, got) == []


@pytest.mark.django_db(transaction=True)
def test_publish_on_commit_can_be_turned_off():
    with override_settings(**MEMORY, PUBSUB_PUBLISH_ON_COMMIT=False):
        got: list[str] = []
        with get_backend().subscriber() as sub:
            sub.subscribe("a", lambda m: got.append(m.payload))
            with pytest.raises(RuntimeError), transaction.atomic():
                publish("a", "sent at once")
                sub.dispatch(timeout=5)
                raise RuntimeError("abort")
        assert got == ["sent at once"]


@pytest.mark.django_db(transaction=True)
def test_a_failed_publish_after_commit_is_logged_and_counted_and_the_data_stays(caplog):
    from demo.models import Event
    from pulp_pubsub.backends import memory

    with override_settings(**MEMORY):
        backend = get_backend()
        with transaction.atomic():
            Event.objects.create(note="kept")
            publish("a", "x")
            memory.set_server_down(True)
        memory.set_server_down(False)
        assert Event.objects.filter(note="kept").count() == 1
        assert backend.stats["deferred_failures"] == 1
        assert "after commit failed" in caplog.text


def test_passwords_are_hidden_in_urls():
    assert hide_password("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert hide_password("redis://:s3cret@host") == "redis://:***@host"
    assert hide_password("redis://host:6379") == "redis://host:6379"
    assert "s3cret" not in str(hide_password("postgres://u:s3cret@[::1]:5432/db"))


def test_checks_pass_on_good_settings():
    with override_settings(**MEMORY, PUBSUB_OPTIONS={}):
        assert pubsub_checks.check_backend() == []
        assert pubsub_checks.check_prefix() == []
        assert pubsub_checks.check_types() == []


@pytest.mark.parametrize(
    "overrides, check, expected_id",
    [
        ({"PUBSUB_BACKEND": "nosuch"}, "check_backend", "pulp_pubsub.E001"),
        ({"PUBSUB_BACKEND": "x.y.Z"}, "check_backend", "pulp_pubsub.E001"),
        ({"PUBSUB_OPTIONS": {"nope": 1}}, "check_backend", "pulp_pubsub.E003"),
        ({"PUBSUB_OPTIONS": ["x"]}, "check_backend", "pulp_pubsub.E003"),
        ({"PUBSUB_CHANNEL_PREFIX": "bad prefix"}, "check_prefix", "pulp_pubsub.E004"),
        ({"PUBSUB_URL": 5}, "check_types", "pulp_pubsub.E005"),
        ({"PUBSUB_PUBLISH_ON_COMMIT": "yes"}, "check_types", "pulp_pubsub.E005"),
        ({"PUBSUB_BACKEND": "memory"}, "check_production_backend", "pulp_pubsub.W001"),
    ],
)
def test_checks_flag_bad_settings_with_a_hint(overrides, check, expected_id):
    with override_settings(**{**MEMORY, "PUBSUB_OPTIONS": {}, **overrides}):
        messages = getattr(pubsub_checks, check)()
    assert [m.id for m in messages] == [expected_id]
    assert messages[0].hint


def test_options_given_as_text_get_the_environment_spelling_as_hint():
    with override_settings(**MEMORY, PUBSUB_OPTIONS='{"publish": "direct"}'):
        [message] = pubsub_checks.check_backend()
    assert message.id == "pulp_pubsub.E003"
    assert "PULP_PUBSUB_OPTIONS='@json {" in message.hint


def test_the_missing_extra_check(monkeypatch):
    def fail(path):
        raise ModuleNotFoundError("No module named 'redis'", name="redis")

    monkeypatch.setattr("pulp_pubsub.handler.import_string", fail)
    with override_settings(PUBSUB_BACKEND="redis"):
        messages = pubsub_checks.check_backend()
    assert [m.id for m in messages] == ["pulp_pubsub.E002"]
    assert messages[0].hint == 'pip install "pulp-pubsub[redis]"'


def test_settings_are_not_read_at_import_time():
    import subprocess
    import sys

    code = (
        "import pulp_pubsub, pulp_pubsub.conf, pulp_pubsub.checks, pulp_pubsub.registry;"
        "from django.conf import settings; print(settings.configured)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
