"""The chaos run: its invariant checks on hand-made records, and runs on every backend.

Each backend gets a three-second run of the faults that drop connections in the default tier,
and a 25-second run of every fault kind in the ``long`` tier; both end with an outage phase
(the server down, the subscribers degraded) and, on the backends that target (memory, redis,
nats with JetStream), carry targeted traffic besides the broadcasts. The longer run still is
``python manage.py pubsub_chaos --backend redis --duration 600`` (see docs/reliability.md).
"""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import CommandError, call_command

from pulp_pubsub.backends.listener.loop import Loop
from pulp_pubsub_tools.chaos import ChaosConfig, run
from pulp_pubsub_tools.chaos.invariant import (
    AgentLog,
    Fault,
    Publish,
    check_invariant,
    check_quiet,
    leaking_lines,
    percentile,
    recovery_times,
)
from pulp_pubsub_tools.chaos.mutations import MUTATIONS
from pulp_pubsub_tools.chaos.phases import check_outage, check_targeted
from pulp_pubsub_tools.chaos.targets import PROXY_FAULTS, SERVER_FAULTS, TARGETS

from .conftest import CONTRACT_BACKENDS

# -- the invariant, on records made by hand ---------------------------------------------


def published(seq: int, at: float, ok: bool = True, channel: str = "a") -> Publish:
    return Publish(seq, channel, at, at + 0.01, ok, None if ok else "PublishError: down")


def subscriber(subscribed_at: float = 0.0) -> AgentLog:
    return AgentLog("sub0", subscribed_at=subscribed_at)


MARGIN = 0.5


def test_a_delivered_message_meets_the_invariant():
    agent = subscriber()
    agent.add_message("a", 1, 10.5)
    verdict = check_invariant([published(1, 10.0)], agent, MARGIN)
    assert (verdict.expected, verdict.delivered, verdict.missing) == (1, 1, [])


def test_a_lost_message_is_covered_by_a_resync_received_after_its_publish():
    agent = subscriber()
    agent.add_resync("a", 12.0)
    verdict = check_invariant([published(1, 10.0)], agent, MARGIN)
    assert (verdict.covered_by_resync, verdict.missing) == (1, [])


def test_a_resync_covers_only_what_was_published_after_the_last_proof_of_hearing():
    """The bounded window: a message the subscriber should have read before its connection
    went quiet is not excused by a resync that came later."""
    agent = subscriber()
    agent.add_resync("a", 20.0, since=15.0)
    publishes = [published(1, 10.0), published(2, 14.6), published(3, 17.0), published(4, 20.5)]
    verdict = check_invariant(publishes, agent, MARGIN)
    assert verdict.covered_by_resync == 2  # 14.6 (inside the margin) and 17.0
    assert verdict.missing == [("a", 1), ("a", 4)]
    assert verdict.widest_window == pytest.approx(5.5)


def test_a_resync_that_never_heard_before_covers_everything_since_subscribing():
    agent = subscriber()
    agent.add_resync("a", 20.0, since=None)
    assert check_invariant([published(1, 10.0)], agent, MARGIN).missing == []


def test_fault_free_stretches_owe_every_message_and_no_resync():
    agent = subscriber()
    agent.add_message("a", 1, 10.1)
    agent.add_resync("a", 12.0, since=11.0)
    publishes = [published(1, 10.0), published(2, 11.0), published(3, 14.7)]
    verdict = check_quiet(publishes, [agent], [(9.0, 15.0)], MARGIN)
    # #3 ended within the margin of the stretch's end: the next fault may take it.
    assert (verdict.expected, verdict.delivered) == (2, 1)
    assert verdict.missing == [("sub0", "a", 2)]
    assert verdict.resyncs == [("sub0", "a", 12.0)]


def test_a_late_resync_for_a_loss_before_the_stretch_belongs_to_the_fault():
    agent = subscriber()
    agent.add_resync("a", 10.0, since=8.5)  # lost during the fault that ended at 9.0
    assert check_quiet([], [agent], [(9.0, 15.0)], MARGIN).resyncs == []


def test_a_resync_before_the_publish_or_on_another_channel_covers_nothing():
    agent = subscriber()
    agent.add_resync("a", 9.0)
    agent.add_resync("b", 12.0)
    verdict = check_invariant([published(1, 10.0)], agent, MARGIN)
    assert verdict.missing == [("a", 1)]


def test_failed_publishes_and_those_before_subscribing_owe_nothing():
    agent = subscriber(subscribed_at=5.0)
    verdict = check_invariant([published(1, 4.0), published(2, 6.0, ok=False)], agent, MARGIN)
    assert (verdict.expected, verdict.missing) == (0, [])


def test_a_duplicate_delivery_is_counted_not_double_credited():
    agent = subscriber()
    agent.add_message("a", 1, 10.5)
    agent.add_message("a", 1, 10.6)
    assert agent.duplicates == 1
    assert check_invariant([published(1, 10.0)], agent, MARGIN).delivered == 1


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


def targeted(seq: int, at: float, ok: bool = True) -> Publish:
    publish = published(seq, at, ok, channel="work")
    publish.group = "runners"
    return publish


def test_a_targeted_message_is_owed_to_the_group_not_to_each_member():
    one, two = subscriber(), AgentLog("sub1", subscribed_at=0.0)
    one.add_message("work", 1, 10.1)  # reached one member: enough
    two.add_resync("work", 21.0, since=19.0)  # covers #2 for the group
    publishes = [targeted(1, 10.0), targeted(2, 20.0), targeted(3, 30.0)]
    # Neither member is owed a targeted message of its own.
    assert check_invariant(publishes, two, MARGIN).expected == 0
    verdict = check_targeted(publishes, [one, two], MARGIN, 4.0, [])
    assert (verdict.expected, verdict.delivered, verdict.covered_by_resync) == (3, 1, 1)
    assert verdict.missing == [("work", 3)]


def test_a_targeted_message_later_than_its_claim_timeout_or_lost_while_fault_free_fails():
    one = subscriber()
    one.add_message("work", 1, 16.0)  # six seconds after its publish: late
    one.add_message("work", 2, 20.5)
    publishes = [targeted(1, 10.0), targeted(2, 20.0), targeted(3, 30.0)]
    verdict = check_targeted(publishes, [one], MARGIN, 4.0, [(29.0, 40.0)])
    assert [(c, s) for c, s, _ in verdict.late] == [("work", 1)]
    assert verdict.lost_while_fault_free == [("work", 3)] and verdict.failures == 3
    # A fault between its publish and its arrival (a frozen server) makes it due later.
    excused = check_targeted(publishes, [one], MARGIN, 4.0, [], faults=[(10.5, 14.0)])
    assert excused.late == []


def test_the_outage_needs_every_subscriber_degraded_at_about_its_interval():
    steady, silent = subscriber(), AgentLog("sub1", subscribed_at=0.0)
    for at in (100.9, 101.8, 102.7, 103.6, 104.5):
        steady.add_resync("a", at, since=99.0, degraded=True)
    silent.add_resync("a", 100.9, since=99.0, degraded=True)  # then nothing for 4 s
    good = check_outage([steady], ["a"], 100.0, 105.0, 1.0, notice=2.0)
    assert good.ok and good.fewest_resyncs == 5 and good.widest_gap == pytest.approx(0.9)
    bad = check_outage([steady, silent], ["a"], 100.0, 105.0, 1.0, notice=2.0)
    assert not bad.ok and bad.widest_gap == pytest.approx(4.1)
    # A channel with none at all falls short.
    bad = check_outage([steady], ["a", "b"], 100.0, 105.0, 1.0, notice=2.0)
    assert not bad.ok and bad.short == ["sub0:b"]
    # A resync that is not degraded mode's (a reconnect's) does not count.
    plain = subscriber()
    plain.add_resync("a", 101.0, since=99.0)
    assert check_outage([plain], ["a"], 100.0, 105.0, 1.0, notice=2.0).degraded_agents == 0
    # A connection attempt holds the next resync back for up to its connect_timeout.
    slow = subscriber()
    for at in (100.9, 103.4, 105.0):
        slow.add_resync("a", at, since=99.0, degraded=True)
    assert not check_outage([slow], ["a"], 100.0, 105.0, 1.0, notice=2.0).ok
    assert check_outage([slow], ["a"], 100.0, 105.0, 1.0, notice=2.0, opening=2.0).ok


# -- the run itself ------------------------------------------------------------------------


def chaos_config(backend: str, **overrides) -> ChaosConfig:
    settings = {
        "duration": 25.0,
        "subscribers": 3,
        "channels": 2,
        "rate": 20.0,
        "seed": 7,
        "outage": 5.0,
    }
    return ChaosConfig(backend=backend, **{**settings, **overrides})


CHAOS_BACKENDS = [name for name in CONTRACT_BACKENDS if name in TARGETS]
#: The backends that deliver targeted messages themselves (the others broadcast them).
TARGETING = {"memory", "redis", "natsjs"}
#: The two faults that drop every subscriber's connection on every backend, quickly.
SHORT_FAULTS = ("restart_kill", "kill_connections")


def check_run(backend: str, report, capfd) -> str:
    """What every chaos run must show, short or long: nothing lost silently, faults that
    really bit (covered by resyncs, or by replay where the backend replays), no secret out."""
    text = report.format()
    if backend == "postgres":
        assert report.publish_path == "Django's connection", text
    assert report.ok, text
    if TARGETS[backend].replays:
        # Replayed, not resynced: only degraded mode's resyncs, while the server was down,
        # and (NATS with JetStream) those a publisher asked for while the stream could not
        # store its message yet; never one for a gap in the history.
        assert report.reconnects > 0, text
        allowed = report.degraded_resyncs + report.unstored_resyncs
        assert report.degraded_resyncs <= report.resyncs <= allowed, text
    else:
        assert report.resyncs > 0 and report.reconnects > 0, text
    assert report.missing == 0 and report.stuck == [] and report.unrecovered_faults == 0, text
    assert report.quiet_final["expected"] > 0, text
    assert report.quiet_failures == 0, text
    assert set(report.publish_errors) <= {"PublishError"}, text
    # The outage phase: every subscriber degraded, resyncs at about outage_interval.
    assert report.outage["ok"] and report.outage["degraded_agents"] == 3, text
    if backend in TARGETING:
        assert report.targeted["expected"] > 0 and report.targeted["failures"] == 0, text
    else:
        assert report.targeted == {}, text
    captured = capfd.readouterr()
    secrets = TARGETS[backend]("x", {}).secrets
    assert leaking_lines([captured.out, captured.err, text], secrets) == []
    return text


@pytest.mark.backend
@pytest.mark.servers
@pytest.mark.parametrize("backend", CHAOS_BACKENDS)
def test_a_short_chaos_run_loses_nothing_silently(backend, capfd, django_db_blocker):
    """Three seconds of connection-dropping faults on each backend, then three seconds of
    outage: the default tier's run."""
    # PostgreSQL publishes the default way, on a Django connection of the run's own.
    config = chaos_config(backend, duration=3.0, quiet=1.5, faults=SHORT_FAULTS, outage=3.0)
    with django_db_blocker.unblock():
        report = run(config)
    text = check_run(backend, report, capfd)
    assert all(report.faults_by_kind[kind]["count"] for kind in SHORT_FAULTS), text


@pytest.mark.long
@pytest.mark.backend
@pytest.mark.servers
@pytest.mark.parametrize("backend", CHAOS_BACKENDS)
def test_a_chaos_run_of_every_fault_kind_loses_nothing_silently(backend, capfd, django_db_blocker):
    with django_db_blocker.unblock():
        report = run(chaos_config(backend))
    text = check_run(backend, report, capfd)
    kinds = TARGETS[backend].fault_kinds
    assert {kind for kind, entry in report.faults_by_kind.items() if entry["count"]} == set(
        kinds
    ), text
    assert report.quiet_between["expected"] > 0, text


def test_the_invariant_catches_a_subscriber_that_forgets_to_resync(monkeypatch):
    """The check has teeth: with resyncs switched off, server-side kills lose messages."""

    def no_resync(self, missed):
        return original(self, set())

    original = Loop._on_connected
    monkeypatch.setattr(Loop, "_on_connected", no_resync)
    # Degraded mode off too: its periodic resyncs would cover some of the losses.
    options = {**ChaosConfig("memory").options, "outage_interval": 0}
    config = chaos_config(
        "memory",
        duration=4.0,
        subscribers=2,
        rate=50.0,
        faults=("restart_graceful",),
        outage=0.0,
        options=options,
    )
    report = run(config)
    assert not report.ok
    assert report.missing > 0 and report.covered_by_resync == 0, report.format()


#: The long tier's: the default tier keeps the checker's teeth with the run above (no
#: resync) and its checks on hand-made records.
@pytest.mark.long
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_subscriber_that_loses_messages_while_resyncing_normally_fails_the_run(mutation):
    """The checker has teeth where it matters: resyncs keep working, yet silent losses
    (1% at random, or everything in the second after each reconnect) fail the run, and the
    report names the very messages the mutation dropped."""
    config = chaos_config(
        "memory",
        duration=4.0,
        subscribers=2,
        rate=50.0,
        faults=("restart_graceful", "kill_connections"),
        mutation=mutation,
    )
    report = run(config)
    text = report.format()
    assert not report.ok, text
    assert report.missing > 0 and report.resyncs > 0, text
    assert report.dropped_by_mutation >= report.missing, text
    # Every message named missing is one the mutation dropped, by subscriber and number.
    assert set(report.missing_messages) <= set(report.dropped_messages), text


def test_the_command_prints_the_report_and_exits_zero_when_the_run_passes():
    out = io.StringIO()
    call_command(
        "pubsub_chaos",
        "--backend=memory",
        "--duration=3",
        "--subscribers=2",
        "--faults=kill_connections",
        "--outage=2",
        "--seed=3",
        "--json",
        stdout=out,
    )
    report = json.loads(out.getvalue())
    assert report["ok"] is True and report["faults"] >= 1 and report["stuck"] == []
    assert report["outage"]["ok"] and report["targeted"]["expected"] > 0
    assert report["seed"] == 3


def test_the_command_refuses_a_fault_the_backend_cannot_inject():
    with pytest.raises(CommandError, match="cannot inject proxy_cut"):
        call_command("pubsub_chaos", "--backend=memory", "--faults=proxy_cut", "--duration=1")


def test_every_fault_kind_is_named_in_the_command_help():
    from pulp_pubsub_tools.management.commands import pubsub_chaos

    parser = pubsub_chaos.Command().create_parser("manage.py", "pubsub_chaos")
    help_text = " ".join(parser.format_help().split())
    for kind in SERVER_FAULTS + PROXY_FAULTS:
        assert kind in help_text


# -- the committed results ----------------------------------------------------------------


@pytest.mark.parametrize("long", [False, True], ids=["summary", "long"])
def test_the_published_chaos_tables_are_generated_from_the_committed_reports(long):
    """Nothing in them is typed by hand, and the runs they show passed every check."""
    from pathlib import Path

    from pulp_pubsub_tools.chaos import tables

    root = Path(__file__).resolve().parent.parent
    paths = [str(root / "docs" / "chaos" / f"{name}.json") for name in ("postgres", "redis")]
    reports = tables.load(paths)
    text = (root / "docs" / "reliability.md").read_text()
    start, end = tables.markers(long)
    assert text.count(start) == text.count(end) == 1
    assert tables.between(text, long).strip() == tables.render(reports, long=long).strip()
    for report in reports:
        assert report["ok"] and report["missing"] == 0 and report["stuck"] == []
        for part in (report["quiet_between"], report["quiet_final"]):
            assert part["expected"] > 0 and part["delivered"] == part["expected"]
            assert part["resyncs"] == []


def test_tables_rewrites_only_the_block_of_the_table_it_renders(tmp_path):
    """One page holds the summary and the long table; each run of --tables leaves the other."""
    from pathlib import Path

    from pulp_pubsub_tools.chaos import tables

    root = Path(__file__).resolve().parent.parent
    reports = ",".join(str(root / "docs" / "chaos" / f"{n}.json") for n in ("postgres", "redis"))
    page = tmp_path / "page.md"
    page.write_text(
        f"intro\n{tables.SUMMARY_START}\nold summary\n{tables.SUMMARY_END}\n"
        f"middle\n{tables.START}\nold long\n{tables.END}\nend\n"
    )
    call_command("pubsub_chaos", f"--tables={reports}", f"--markdown={page}", stdout=io.StringIO())
    text = page.read_text()
    assert "old summary" not in text and "old long" in text
    assert "| backend | faults |" in tables.between(text, long=False)
    call_command(
        "pubsub_chaos", f"--tables={reports}", f"--markdown={page}", "--long", stdout=io.StringIO()
    )
    text = page.read_text()
    assert "old long" not in text and "| passed |" in tables.between(text, long=True)
    assert "| backend | faults |" in tables.between(text, long=False)
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
