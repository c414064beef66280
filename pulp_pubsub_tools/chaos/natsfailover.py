"""Kill the NATS node a JetStream subscriber is connected to, and time its return.

The figure the docs give for a JetStream subscriber's failover comes from here, so it can be
made again: each run starts a throwaway 3-node cluster on loopback, one subscriber with
``jetstream`` and ``stream_replicas`` 3 (its URL lists every node), and a publisher on the
other two nodes sending numbered messages at a steady rate; then the subscriber's node is
killed with SIGKILL. Measured from the kill:

- ``stored_again_s``: the first publish after the kill that the stream acknowledged (while
  the stream elects a new leader nothing can be stored, so no subscriber can do better; the
  publisher sends a publish again through the election, :mod:`pulp_pubsub.backends.nats.storing`,
  so this follows ``stream_leader_s``, the new leader as the monitoring port names it);
- ``delivered_again_s``: the first delivery, on the subscriber's new connection, of a
  message whose publish had not returned when the killed process was gone (the replay of
  the gap included). While the stream cannot store (no leader) the publisher sends its
  waiting message along to the channel's subscribers, once a second from its first retry,
  and they deliver it at once (counted as ``unstored_deliveries``), so this can come before
  ``stored_again_s``; a publish that then fails (the election outlasted its
  ``publish_timeout``) counts too (``delivered_despite_failure``: at least once);
- ``stored_delivered_again_s``: the first delivery of a message whose publish was called
  once the stream stored again: one that never waited for a leader, so what the subscriber
  delivered is the stream's copy (live or replayed). It is when the subscriber would be
  back without the early delivery;
- ``told_again_s``: the first delivery of anything after the kill: a message published
  after it, or a resync of the channel, which a publisher that does not send its message
  along (a targeted one, or an older release's) asks for instead (``unstored_resyncs``);
- ``reconnected_s``: the subscriber's new connection, its channels listened to again (gap replayed);
- ``behind_stream_s``: from ``stored_again_s`` to ``stored_delivered_again_s``, the
  subscriber's own share (a publisher that waited out the election too delays both).

And checked: nothing acknowledged is missing, no payload came twice (a message delivered
early is not delivered again when stored), everything came in publish order, and no resync
was needed for a gap (the stream's history reaches back; ``resyncs`` less
``unstored_resyncs``). The subscriber's
INFO and WARNING log lines are kept per run, timed from the kill, to say what it waited for.

``--server PATH`` runs another nats-server binary (``$PUBSUB_NATS_SERVER``, else the PATH's);
the JSON records its version and the 1-minute load average at each kill.

``--leader`` places the stream's leader before the kill: ``any`` leaves it where JetStream
put it, ``killed`` moves it onto the node to be killed (the worst case: the stream must elect
a new leader), ``kept`` onto another one.

    python -m pulp_pubsub_tools.chaos.natsfailover --runs 10 \\
        --json docs/figures/nats_js_failover_live.json
    python -m pulp_pubsub_tools.chaos.natsfailover --runs 10 --leader killed \\
        --json docs/figures/nats_js_failover_early_stream_leader.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

CHANNEL = "failover"
#: Seconds a run waits, from the kill, for the subscriber to deliver again.
GIVE_UP = 120.0


class _Flow:
    """Publishes numbered payloads at ``rate`` per second on a thread of its own."""

    def __init__(self, backend: Any, rate: float) -> None:
        self.backend = backend
        self.period = 1.0 / rate
        # (number, time.time() the publish was called, and when it returned)
        self.acked: list[tuple[int, float, float]] = []
        # (number, called, when it raised, the error)
        self.failures: list[tuple[int, float, float, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="failover-publisher", daemon=True)

    def _run(self) -> None:
        from pulp_pubsub.exceptions import PublishError

        number = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            called = time.time()
            try:
                self.backend.publish(CHANNEL, f"{number:07d}")
            except PublishError as exc:
                self.failures.append((number, called, time.time(), str(exc)[:200]))
            else:
                self.acked.append((number, called, time.time()))
            number += 1
            next_at = max(next_at + self.period, time.monotonic())
            self.stop.wait(next_at - time.monotonic())

    def __enter__(self) -> _Flow:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


class _Inbox:
    """What the subscriber delivered: (payload, received_at, resync), in delivery order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, float, bool]] = []
        self.cond = threading.Condition()

    def __call__(self, message: Any) -> None:
        with self.cond:
            self.items.append((message.payload, message.received_at, message.resync))
            self.cond.notify_all()

    def wait(self, predicate: Any, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.items), timeout)


class _LogKeeper(logging.Handler):
    """Keeps the layer's log records of one run, to be timed from the kill afterwards."""

    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, origin: float) -> list[str]:
        return [
            f"{r.created - origin:+8.3f} s {r.levelname} {r.name}: {r.getMessage()}"
            for r in self.records
        ]


def _leaders(cluster: Any, stream: str) -> tuple[str | None, str | None]:
    """The (meta leader, stream leader) server names, as a live node reports them."""
    for node in cluster.nodes:
        if not node.running:
            continue
        try:
            jsz = node.monitor("jsz?accounts=true&streams=true")
        except (OSError, ValueError):
            continue
        meta = (jsz.get("meta_cluster") or {}).get("leader")
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    return meta, (detail.get("cluster") or {}).get("leader")
        return meta, None
    return None, None


class _LeaderWatch:
    """Times, from the kill, when the surviving nodes name a new meta and stream leader."""

    def __init__(self, cluster: Any, stream: str, killed: str) -> None:
        self.cluster, self.stream, self.killed = cluster, stream, killed
        self.meta_at: float | None = None
        self.stream_at: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="failover-leaders", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05) and (self.meta_at is None or self.stream_at is None):
            meta, leader = _leaders(self.cluster, self.stream)
            now = time.time()
            if self.meta_at is None and meta and meta != self.killed:
                self.meta_at = now
            if self.stream_at is None and leader and leader != self.killed:
                self.stream_at = now

    def __enter__(self) -> _LeaderWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _place_leader(cluster: Any, backend: Any, want_on: str | None, avoid: str | None) -> None:
    """Step the stream's leader down until it sits where asked (each step picks another)."""
    from pulp_pubsub.backends.nats.loop import loop_runner

    async def step_down() -> None:
        nc = await backend.connect(role="failover-tool")
        try:
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{backend.stream_name}", b"", 5)
        finally:
            await nc.close()

    for _ in range(20):
        _, leader = _leaders(cluster, backend.stream_name)
        if leader and (want_on is None or leader == want_on) and leader != avoid:
            return
        if leader:
            loop_runner().run(step_down(), 10)
        time.sleep(0.5)  # a tool, not a test: the new leader is read from the monitor port
    raise RuntimeError(f"could not place the stream leader (want {want_on}, avoid {avoid})")


def run_once(
    options: dict[str, Any],
    rate: float = 50.0,
    leader: str = "any",
    after: float = 3.0,
    log_level: int = logging.INFO,
) -> dict[str, Any]:
    """One cluster, one kill; returns the run's figures and log lines (see the module doc)."""
    from pulp_pubsub.backends.nats import NatsBackend
    from pulp_pubsub_tools.testing import NatsCluster

    opts = {"jetstream": True, "stream_replicas": 3, "max_pending": 100_000, **options}
    keeper = _LogKeeper(log_level)
    layer_log = logging.getLogger("pulp_pubsub")
    old_level = layer_log.level
    layer_log.addHandler(keeper)
    layer_log.setLevel(min(log_level, old_level or logging.WARNING))
    try:
        with NatsCluster(3, jetstream=True) as cluster:
            sub_backend = NatsBackend(url=cluster.url, options=opts)
            pub_backend: Any = None
            inbox = _Inbox()
            try:
                sub = sub_backend.subscriber()
                sub.subscribe(CHANNEL, inbox)
                sub.start()
                node = None
                for _ in range(50):  # the monitor port lists a new connection a moment later
                    node = cluster.node_serving("subscriber")
                    if node is not None:
                        break
                    time.sleep(0.1)
                if node is None:
                    raise RuntimeError("no node holds the subscriber's connection")
                others = [n for n in cluster.nodes if n is not node]
                pub_backend = NatsBackend(url=",".join(n.address for n in others), options=opts)
                if leader == "killed":
                    _place_leader(cluster, pub_backend, node.server_name, None)
                elif leader == "kept":
                    _place_leader(cluster, pub_backend, None, node.server_name)
                with _Flow(pub_backend, rate) as flow:
                    if not inbox.wait(lambda items: len(items) >= rate, 30):
                        raise RuntimeError("messages did not flow before the kill")
                    meta, stream_leader = _leaders(cluster, sub_backend.stream_name)
                    keeper.records.clear()
                    watch = _LeaderWatch(cluster, sub_backend.stream_name, node.server_name)
                    killed_at = time.time()
                    node.stop("kill")
                    # Publishes called before the process was gone may still have been stored
                    # and delivered by it: only later ones show the subscriber back.
                    dead_at = time.time()
                    watch.__enter__()

                    def fresh(items: list[tuple[str, float, bool]]) -> bool:
                        return any(not resync and at > killed_at for _, at, resync in items[-5:])

                    inbox.wait(lambda items: _published_after(items, flow.acked, dead_at), GIVE_UP)
                    inbox.wait(fresh, 5)
                    settle = time.monotonic() + after
                    while time.monotonic() < settle:
                        inbox.wait(lambda items: False, settle - time.monotonic())
                    watch.__exit__()
                acked = [number for number, _, _ in flow.acked]
                last = f"{acked[-1]:07d}" if acked else None
                inbox.wait(lambda items: any(p == last for p, _, _ in items), 30)
                figures = _figures(inbox.items, flow, killed_at, dead_at, sub.connected_since)
                figures.update(
                    killed=node.server_name,
                    killed_led_stream=stream_leader == node.server_name,
                    killed_led_meta=meta == node.server_name,
                    meta_leader_s=_round(watch.meta_at and watch.meta_at - killed_at),
                    stream_leader_s=_round(watch.stream_at and watch.stream_at - killed_at),
                    reconnected_s=_round((sub.connected_since or 0) - killed_at),
                    load_average_1m=round(os.getloadavg()[0], 2),
                    reconnects=sub.stats["reconnects"],
                    replays=sub.stats["replays"],
                    # Resyncs because a publisher's message waited to be stored (no leader):
                    # not a gap in the history (see pulp_pubsub.backends.nats.storing).
                    unstored_resyncs=sub_backend.stats["unstored_resyncs"],
                    # Messages a publisher waiting to store sent along, delivered early.
                    unstored_deliveries=sub_backend.stats["unstored_deliveries"],
                    log=keeper.lines(killed_at),
                )
                sub.close()
                return figures
            finally:
                sub_backend.close()
                if pub_backend is not None:
                    pub_backend.close()
    finally:
        layer_log.removeHandler(keeper)
        layer_log.setLevel(old_level)


def _published_after(
    items: list[tuple[str, float, bool]], acked: list[tuple[int, float, float]], killed_at: float
) -> bool:
    after = next((number for number, called, _ in acked if called > killed_at), None)
    if after is None:
        return False
    return any(not resync and int(p) >= after for p, _, resync in items[-50:])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _figures(
    items: list[tuple[str, float, bool]],
    flow: _Flow,
    killed_at: float,
    dead_at: float,
    reconnected_at: float | None = None,
) -> dict[str, Any]:
    # Only a publish called once the killed process was gone counts: one called earlier may
    # have been stored, and delivered, by it.
    acked = {number: returned for number, _, returned in flow.acked}
    first_after = min((n for n, called, _ in flow.acked if called > dead_at), default=None)
    stored_again = acked[first_after] if first_after is not None else None
    # The first publish called once the stream stored again: it waited for no leader, so
    # no publisher sent it along early; its delivery is the stream's copy.
    first_stored = min(
        (n for n, called, _ in flow.acked if stored_again is not None and called >= stored_again),
        default=None,
    )
    payloads = [int(p) for p, _, resync in items if not resync]
    seen = set(payloads)
    # Delivering again: on the new connection, a message whose publish had not returned
    # when the killed process was gone: the one waiting through the election (sent along
    # while it waited, and delivered early, even if it then failed: the election outlasted
    # its publish_timeout) or a later one.
    returns = [(n, returned) for n, _, returned in flow.acked]
    returns += [(n, returned) for n, _, returned, _ in flow.failures]
    first_open = min((n for n, returned in returns if returned > dead_at), default=None)
    delivered_again = next(
        (
            at
            for p, at, resync in items
            if not resync
            and first_open is not None
            and int(p) >= first_open
            and at >= (reconnected_at or dead_at)
        ),
        None,
    )
    stored_delivered_again = next(
        (
            at
            for p, at, resync in items
            if not resync and first_stored is not None and int(p) >= first_stored
        ),
        None,
    )
    # The first delivery of anything after the kill: that message, or a resync (a
    # publisher saying the stream has not stored its message yet, without sending it).
    resynced = next((at for _, at, resync in items if resync and at > killed_at), None)
    told_again = min((t for t in (resynced, delivered_again) if t is not None), default=None)
    missing = sorted(n for n in acked if n not in seen)
    out_of_order = sum(1 for a, b in itertools.pairwise(payloads) if b <= a)
    return {
        "published": len(flow.acked),
        "publish_failures": len(flow.failures),
        # At least once: told early, then its publish failed.
        "delivered_despite_failure": len(seen & {n for n, *_ in flow.failures}),
        "delivered": len(payloads),
        "missing": len(missing),
        "missing_first": missing[:10],
        "duplicates": len(payloads) - len(seen),
        "out_of_order": out_of_order,
        "resyncs": sum(1 for _, _, resync in items if resync),
        "stored_again_s": _round(stored_again - killed_at if stored_again else None),
        "delivered_again_s": _round(delivered_again - killed_at if delivered_again else None),
        "stored_delivered_again_s": _round(
            stored_delivered_again - killed_at if stored_delivered_again else None
        ),
        "told_again_s": _round(told_again - killed_at if told_again else None),
        # The subscriber's own share: how long after the stream stored again it delivered
        # from the stream.
        "behind_stream_s": _round(
            stored_delivered_again - stored_again
            if stored_delivered_again and stored_again
            else None
        ),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [r["delivered_again_s"] for r in runs if r.get("delivered_again_s") is not None]
    told = [r["told_again_s"] for r in runs if r.get("told_again_s") is not None]
    stored = [
        r["stored_delivered_again_s"] for r in runs if r.get("stored_delivered_again_s") is not None
    ]
    return {
        "runs": len(runs),
        "told_again_s": {
            "worst": max(told, default=None),
            "median": statistics.median(told) if told else None,
            "all": told,
        },
        "delivered_again_s": {
            "worst": max(times, default=None),
            "median": statistics.median(times) if times else None,
            "best": min(times, default=None),
            "all": times,
        },
        "stored_delivered_again_s": {
            "worst": max(stored, default=None),
            "median": statistics.median(stored) if stored else None,
            "all": stored,
        },
        "stored_again_s_worst": max(
            (r["stored_again_s"] for r in runs if r.get("stored_again_s") is not None),
            default=None,
        ),
        "behind_stream_s_worst": max(
            (r["behind_stream_s"] for r in runs if r.get("behind_stream_s") is not None),
            default=None,
        ),
        "reconnected_s_worst": max((r["reconnected_s"] for r in runs), default=None),
        "never_delivered_again": len(runs) - len(times),
        "publish_failures": sum(r["publish_failures"] for r in runs),
        "delivered_despite_failure": sum(r.get("delivered_despite_failure", 0) for r in runs),
        "missing": sum(r["missing"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs),
        "out_of_order": sum(r["out_of_order"] for r in runs),
        "resyncs": sum(r["resyncs"] for r in runs),
        "unstored_resyncs": sum(r.get("unstored_resyncs", 0) for r in runs),
        "unstored_deliveries": sum(r.get("unstored_deliveries", 0) for r in runs),
        "killed_led_stream": sum(bool(r["killed_led_stream"]) for r in runs),
        "killed_led_meta": sum(bool(r["killed_led_meta"]) for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second")
    parser.add_argument("--leader", choices=("any", "killed", "kept"), default="any")
    parser.add_argument("--after", type=float, default=3.0, help="seconds of flow after")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a PUBSUB_OPTIONS entry for both clients, e.g. probe_interval=5 (repeatable)",
    )
    parser.add_argument(
        "--server",
        metavar="PATH",
        help="the nats-server binary to run (default: $PUBSUB_NATS_SERVER, else the PATH's)",
    )
    parser.add_argument("--debug", action="store_true", help="keep DEBUG lines too")
    parser.add_argument("--json", help="write every run's figures and the summary here")
    args = parser.parse_args(argv)
    options = {}
    for item in args.option:
        name, _, value = item.partition("=")
        options[name] = json.loads(value)
    import django
    from django.conf import settings

    from pulp_pubsub_tools.testing.nats import BINARY_ENV, nats_server_binary

    if args.server:
        os.environ[BINARY_ENV] = args.server
    binary = nats_server_binary()
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    print(f"{binary}: {version}", flush=True)
    # Stopped with SIGTERM: unwind, so the cluster's servers are stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if not settings.configured:
        settings.configure(INSTALLED_APPS=[], DATABASES={}, USE_TZ=True, LOGGING_CONFIG=None)
    django.setup()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    level = logging.DEBUG if args.debug else logging.INFO
    runs = []
    for i in range(args.runs):
        figures = run_once(options, args.rate, args.leader, args.after, level)
        runs.append(figures)
        shown = {k: v for k, v in figures.items() if k != "log"}
        print(f"run {i + 1}: {json.dumps(shown)}", flush=True)
        for line in figures["log"]:
            print(f"    {line}", flush=True)
    summary = summarise(runs)
    summary["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(summary, indent=2))
    if args.json:
        report = {
            "command": "python -m pulp_pubsub_tools.chaos.natsfailover "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "server": version,
            "options": options,
            "rate": args.rate,
            "leader": args.leader,
            "summary": summary,
            "runs": runs,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    bad = summary["missing"] or summary["out_of_order"] or summary["never_delivered_again"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
