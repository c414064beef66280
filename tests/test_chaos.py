"""The chaos run: its invariant checks on hand-made records, and a short run on every backend.

The longer run is ``python manage.py pubsub_chaos --backend redis --duration 600`` (see
docs/reliability.md); this one is bounded to well under two minutes per backend.
"""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from pulp_pubsub.backends.listener import Subscriber
from pulp_pubsub.chaos import ChaosConfig, run
from pulp_pubsub.chaos.invariant import (
    AgentLog,
    Fault,
    Publish,
    check_invariant,
    leaking_lines,
    percentile,
    recovery_times,
)
from pulp_pubsub.chaos.targets import PROXY_FAULTS, SERVER_FAULTS, TARGETS

from .conftest import CONTRACT_BACKENDS

# -- the invariant, on records made by hand ---------------------------------------------


def published(seq: int, at: float, ok: bool = True, channel: str = "a") -> Publish:
    return Publish(seq, channel, at, at + 0.01, ok, None if ok else "PublishError: down")


def subscriber(subscribed_at: float = 0.0) -> AgentLog:
    return AgentLog("sub0", subscribed_at=subscribed_at)


def test_a_delivered_message_meets_the_invariant():
    agent = subscriber()
    agent.add_message("a", 1, 10.5)
    verdict = check_invariant([published(1, 10.0)], agent)
    assert (verdict.expected, verdict.delivered, verdict.missing) == (1, 1, [])


def test_a_lost_message_is_covered_by_a_resync_received_after_its_publish():
    agent = subscriber()
    agent.add_resync("a", 12.0)
    verdict = check_invariant([published(1, 10.0)], agent)
    assert (verdict.covered_by_resync, verdict.missing) == (1, [])


def test_a_resync_before_the_publish_or_on_another_channel_covers_nothing():
    agent = subscriber()
    agent.add_resync("a", 9.0)
    agent.add_resync("b", 12.0)
    verdict = check_invariant([published(1, 10.0)], agent)
    assert verdict.missing == [("a", 1)]


def test_failed_publishes_and_those_before_subscribing_owe_nothing():
    agent = subscriber(subscribed_at=5.0)
    verdict = check_invariant([published(1, 4.0), published(2, 6.0, ok=False)], agent)
    assert (verdict.expected, verdict.missing) == (0, [])


def test_a_duplicate_delivery_is_counted_not_double_credited():
    agent = subscriber()
    agent.add_message("a", 1, 10.5)
    agent.add_message("a", 1, 10.6)
    assert agent.duplicates == 1
    assert check_invariant([published(1, 10.0)], agent).delivered == 1


def test_recovery_is_measured_to_the_last_subscriber_hearing_a_later_message():
    early, late = subscriber(), AgentLog("sub1", subscribed_at=0.0)
    for agent, delay in ((early, 0.1), (late, 0.7)):
        agent.add_message("a", 4, 19.0)  # published before the fault healed: does not count
        agent.add_message("a", 5, 20.0 + delay)
    fault = Fault("freeze", "", 17.0, 20.0, heal_seq=5, recovered=True)
    unrecovered = Fault("freeze", "", 30.0, 31.0, heal_seq=9, recovered=False)
    recovery_times([fault, unrecovered], [early, late])
    assert fault.recovery == pytest.approx(0.7)
    assert unrecovered.recovery is None


def test_percentile_uses_the_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile([], 50)) == (50, 99, None)


def test_leaking_lines_finds_a_secret_anywhere_in_any_line():
    lines = leaking_lines(["ok\nurl redis://:pw%40x@h", "fine"], ["pw@x", "pw%40x", ""])
    assert lines == ["url redis://:pw%40x@h"]


# -- the run itself ------------------------------------------------------------------------


def chaos_config(backend: str, **overrides) -> ChaosConfig:
    settings = {"duration": 25.0, "subscribers": 3, "channels": 2, "rate": 20.0, "seed": 7}
    return ChaosConfig(backend=backend, **{**settings, **overrides})


@pytest.mark.backend
@pytest.mark.servers
@pytest.mark.parametrize("backend", CONTRACT_BACKENDS)
def test_a_short_chaos_run_loses_nothing_silently(backend, capfd):
    report = run(chaos_config(backend))
    text = report.format()
    assert report.ok, text
    kinds = TARGETS[backend].fault_kinds
    assert {kind for kind, entry in report.faults_by_kind.items() if entry["count"]} == set(
        kinds
    ), text
    if TARGETS[backend].replays:
        # The faults really bit, and every reconnect replayed the gap: no resync needed.
        assert report.reconnects > 0 and report.resyncs == 0, text
    else:
        # The faults really bit: messages were lost on the wire and covered by resyncs.
        assert report.resyncs > 0 and report.reconnects > 0, text
    assert report.missing == 0 and report.stuck == [] and report.unrecovered_faults == 0, text
    assert set(report.publish_errors) <= {"PublishError"}, text
    captured = capfd.readouterr()
    secrets = TARGETS[backend]("x", {}).secrets
    assert leaking_lines([captured.out, captured.err, text], secrets) == []


def test_the_invariant_catches_a_subscriber_that_forgets_to_resync(monkeypatch):
    """The check has teeth: with resyncs switched off, server-side kills lose messages."""

    def no_resync(self, missed):
        return original(self, set())

    original = Subscriber._on_connected
    monkeypatch.setattr(Subscriber, "_on_connected", no_resync)
    config = chaos_config(
        "memory", duration=4.0, subscribers=2, rate=50.0, faults=("restart_graceful",)
    )
    report = run(config)
    assert not report.ok
    assert report.missing > 0 and report.covered_by_resync == 0, report.format()


def test_the_command_prints_the_report_and_exits_zero_when_the_run_passes():
    out = io.StringIO()
    call_command(
        "pubsub_chaos",
        "--backend=memory",
        "--duration=3",
        "--subscribers=2",
        "--faults=kill_connections",
        "--seed=3",
        "--json",
        stdout=out,
    )
    report = json.loads(out.getvalue())
    assert report["ok"] is True and report["faults"] >= 1 and report["stuck"] == []
    assert report["seed"] == 3


def test_the_command_refuses_a_fault_the_backend_cannot_inject():
    with pytest.raises(CommandError, match="cannot inject proxy_cut"):
        call_command("pubsub_chaos", "--backend=memory", "--faults=proxy_cut", "--duration=1")


def test_every_fault_kind_is_named_in_the_command_help():
    from pulp_pubsub.management.commands import pubsub_chaos

    parser = pubsub_chaos.Command().create_parser("manage.py", "pubsub_chaos")
    help_text = " ".join(parser.format_help().split())
    for kind in SERVER_FAULTS + PROXY_FAULTS:
        assert kind in help_text
