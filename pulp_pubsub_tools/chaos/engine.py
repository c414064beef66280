"""The orchestrator of a chaos run: subscribers, the publisher, the injector, the verdict.

One process holds the publisher (a thread), the injector (the calling thread), the proxies and
one reader thread per subscriber process. Every wait here is either the duration of a fault
(how long the server stays frozen), the publisher's cadence, or a wait for an event with a
deadline (every subscriber has received a message published after a fault healed).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from pulp_pubsub.exceptions import PubSubError

from .agent import build_backend
from .fleet import Agent, Collector
from .invariant import Fault, Publish
from .report import ChaosReport, build_report
from .targets import Target, make_target

logger = logging.getLogger(__name__)

#: A publish slower than publish_timeout plus this is reported as hung.
PUBLISH_SLACK = 1.0


@dataclass
class ChaosConfig:
    backend: str
    duration: float = 30.0
    subscribers: int = 3
    channels: int = 2
    rate: float = 20.0
    max_faults: int | None = None
    #: Fault kinds to inject (default: every kind the backend's target supports).
    faults: tuple[str, ...] | None = None
    seed: int | None = None
    #: Random fault-free stretch between a fault's recovery and the next fault, in seconds:
    #: every message published in it must arrive, and no resync may.
    gap: tuple[float, float] = (0.5, 2.0)
    #: The fault-free phase at the end of the run, in seconds: the same rule.
    quiet: float = 3.0
    #: How far before a subscriber's last proof of hearing a resync still covers a message
    #: (one the server had taken but not yet passed on). See invariant.covers().
    resync_margin: float = 0.5
    #: Break the subscribers on purpose (see chaos.mutations): the run must then fail.
    mutation: str | None = None
    #: Seconds the server stays down in the outage phase after the faults (0: no phase);
    #: the subscribers must be degraded meanwhile (see chaos.phases).
    outage: float = 0.0
    #: On a backend that targets: one more channel, declared for targeted delivery, whose
    #: messages are owed to the group of every subscriber (see chaos.phases).
    targeted: bool = True
    recovery_timeout: float = 20.0
    workdir: str | None = None
    log_level: str = "INFO"
    #: Backend options: short probe and backoff, so faults are noticed within seconds.
    options: dict[str, Any] = field(
        default_factory=lambda: {
            "probe_interval": 1.0,
            "probe_timeout": 1.0,
            "reconnect_min": 0.05,
            "reconnect_max": 1.0,
            "connect_timeout": 2.0,
            "publish_timeout": 1.0,
            # Degraded mode's resyncs, and a member's hold on a targeted message.
            "outage_interval": 1.0,
            "claim_timeout": 4.0,
        }
    )

    @property
    def detection(self) -> float:
        """How long a silent connection can go unnoticed: one probe interval plus its timeout."""
        return float(self.options["probe_interval"] + self.options["probe_timeout"])

    @property
    def settle_timeout(self) -> float:
        opts = self.options
        return self.detection + opts["reconnect_max"] + 2 * opts["connect_timeout"] + 10


#: The targeted channel's group, which every subscriber joins.
GROUP = "runners"


class Publisher(threading.Thread):
    """Sequence-numbered messages at a steady rate, round-robin over the channels.

    ``work`` names a channel among them whose messages go to :data:`GROUP`.
    """

    def __init__(
        self, backend: Any, channels: list[str], rate: float, work: str | None = None
    ) -> None:
        super().__init__(name="chaos-publisher", daemon=True)
        self.backend, self.channels, self.interval = backend, channels, 1.0 / rate
        self.work = work
        self.records: list[Publish] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._next = 1

    def mark(self) -> tuple[float, int]:
        """(now, the first sequence number whose publish starts after now)."""
        with self.lock:
            return time.time(), self._next

    def run(self) -> None:
        due = time.monotonic()
        while not self.stopping.is_set():
            with self.lock:
                seq, self._next = self._next, self._next + 1
                started = time.time()
            channel = self.channels[seq % len(self.channels)]
            group = GROUP if channel == self.work else None
            error, foreign = None, False
            try:
                self.backend.publish(channel, str(seq), group=group)
            except PubSubError as exc:
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                error, foreign = f"{type(exc).__name__}: {exc}", True
            ended = time.time()
            record = Publish(seq, channel, started, ended, error is None, error, foreign, group)
            with self.lock:
                self.records.append(record)
            # Keep the cadence, but never burst to catch up after a slow publish.
            due = max(due + self.interval, time.monotonic())
            self.stopping.wait(max(0.0, due - time.monotonic()))
        # PostgreSQL's default path publishes on this thread's own Django connection.
        from django.db import connections

        connections.close_all()


class _LogCapture(logging.Handler):
    """Every log record of the orchestrator's process, for the password scan."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Chaos:
    def __init__(self, config: ChaosConfig, progress: Callable[[str], None] | None = None):
        if config.seed is None:
            # Chosen here and reported, so any run can be repeated with --seed.
            config = replace(config, seed=random.SystemRandom().randrange(1 << 31))
        self.config = config
        self.progress = progress or (lambda text: None)
        self.rng = random.Random(config.seed)
        self.run_id = uuid.uuid4().hex[:8]
        self.halt = threading.Event()
        self.faults: list[Fault] = []
        self.target: Target = make_target(
            config.backend, self.run_id, dict(config.options), config.subscribers
        )
        kinds = config.faults or self.target.fault_kinds
        unknown = sorted(set(kinds) - set(self.target.fault_kinds))
        if unknown:
            raise ValueError(
                f"the {config.backend} chaos run cannot inject {', '.join(unknown)}; "
                f"it can inject {', '.join(self.target.fault_kinds)}"
            )
        self.kinds = tuple(kinds)
        self.channels = [f"ch{i}" for i in range(config.channels)]
        self.prefix = f"chaos{self.run_id}."
        #: Every subscriber must receive this message or a later one once the faults are over.
        self.final_seq: int | None = None
        #: When the final fault-free phase began.
        self.quiet_start: float | None = None
        #: The targeted channel, on a backend that targets (decided once its server is up).
        self.work: str | None = None
        #: The outage phase: from the server's exit until it is started again.
        self.outage: tuple[float, float] | None = None

    # -- the run -----------------------------------------------------------------

    def run(self) -> ChaosReport:
        config = self.config
        workdir = config.workdir or tempfile.mkdtemp(prefix="pubsub-chaos-")
        os.makedirs(workdir, exist_ok=True)
        capture = _LogCapture()
        layer_logger = logging.getLogger("pulp_pubsub")
        old_level = layer_logger.level
        logging.getLogger().addHandler(capture)
        layer_logger.setLevel(logging.INFO)
        names = [f"sub{i}" for i in range(config.subscribers)]
        collector = Collector(names)
        agents: list[Agent] = []
        publisher: Publisher | None = None
        backend = None
        started = time.time()
        notes: list[str] = []
        try:
            self.progress(f"starting a throwaway {config.backend} server")
            self.target.start()
            backend = build_backend({**self.target.spec("publisher"), "prefix": self.prefix})
            if config.targeted and backend.targets:
                self.work = "work"
            for i, name in enumerate(names):
                spec = {
                    **self.target.spec("subscriber"),
                    "name": name,
                    "prefix": self.prefix,
                    "channels": self.channels,
                    "work": self.work,
                    "group": GROUP,
                    "mode": "dispatch" if i % 2 == 0 else "thread",
                    "log_level": config.log_level,
                    "mutation": config.mutation,
                    "seed": (config.seed or 0) + i,
                }
                agent = Agent(name, spec, collector, workdir)
                agent.start(self.target.cross_process)
                agents.append(agent)
            ready = collector.wait_for(
                lambda: all(a.subscribed_at or a.errors for a in collector.agents.values()), 60
            )
            failed = [a for a in collector.agents.values() if a.errors or not a.subscribed_at]
            if not ready or failed:
                raise RuntimeError(
                    "subscribers did not start: "
                    + "; ".join(f"{a.name}: {a.errors or 'no report'}" for a in failed)
                    + f" (logs in {workdir})"
                )
            self.progress(
                f"{len(agents)} subscribers ready; publishing at {config.rate}/s"
                + (f", one in {len(self.all_channels)} to group {GROUP!r}" if self.work else "")
            )
            publisher = Publisher(backend, self.all_channels, config.rate, self.work)
            publisher.start()
            started = time.time()
            self._inject_until_done(publisher, collector, started)
            if config.outage > 0:
                self._outage(publisher, collector)
            notes += self._settle(publisher, collector)
        finally:
            if publisher is not None:
                publisher.stopping.set()
                publisher.join(config.options["publish_timeout"] + 10)
                if publisher.is_alive():
                    notes.append("the publisher thread was still inside publish() at the end")
            for agent in agents:
                agent.stop(config.options["connect_timeout"] + 15)
            if backend is not None:
                backend.close()
            self.target.cleanup()
            logging.getLogger().removeHandler(capture)
            layer_logger.setLevel(old_level)
        ended = time.time()
        records = list(publisher.records) if publisher else []
        texts = [agent.log_text() for agent in agents] + capture.lines
        texts += [p.error for p in records if p.error]
        report = build_report(
            config=config,
            kinds=self.kinds,
            publishes=records,
            agents=list(collector.agents.values()),
            faults=self.faults,
            elapsed=ended - started,
            texts=texts,
            secrets=self.target.secrets,
            notes=notes,
            workdir=workdir,
            publish_limit=self.target.publish_bound() + PUBLISH_SLACK,
            publish_path=self.target.publish_path,
            final_seq=self.final_seq,
            quiet_start=self.quiet_start,
            channels=self.all_channels,
            outage=self.outage,
        )
        with open(os.path.join(workdir, "report.json"), "w") as f:
            json.dump(report.as_dict(), f, indent=2)
        return report

    def _inject_until_done(self, publisher: Publisher, collector: Collector, start: float) -> None:
        """Faults in shuffled rounds of every kind, until the duration or the count runs out.

        The run goes on past ``duration`` only to give every kind one turn, and never past
        twice the duration.
        """
        config = self.config
        deadline, hard_deadline = start + config.duration, start + 2 * config.duration
        queue: list[str] = []
        seen: set[str] = set()
        while not self.halt.is_set():
            now = time.time()
            if config.max_faults is not None and len(self.faults) >= config.max_faults:
                break
            if now >= hard_deadline or (now >= deadline and seen >= set(self.kinds)):
                break
            self.halt.wait(self.rng.uniform(*config.gap))
            if not queue:
                queue = list(self.kinds)
                self.rng.shuffle(queue)
            kind = queue.pop()
            seen.add(kind)
            fault = self._inject(kind, publisher)
            self.faults.append(fault)
            fault.recovered = collector.wait_for(
                partial(collector.all_past, fault.heal_seq), config.recovery_timeout
            )
            if fault.recovered:
                fault.recovered_at = time.time()
            self.progress(
                f"fault {len(self.faults)}: {kind} ({fault.detail}), "
                f"{fault.healed - fault.started:.1f} s, "
                + ("recovered" if fault.recovered else "NOT RECOVERED")
            )

    @property
    def all_channels(self) -> list[str]:
        return self.channels + ([self.work] if self.work else [])

    def _outage(self, publisher: Publisher, collector: Collector) -> None:
        """The server down for ``outage`` seconds: the subscribers must be degraded."""
        seconds = self.config.outage
        stopping = time.time()
        self.target.begin_outage()
        # Timed from the server's exit (a graceful stop can take a while to close
        # connections): from here on no subscriber can reach it.
        began = time.time()
        self._pause(seconds)
        restarting = time.time()
        self.target.end_outage()
        healed, heal_seq = publisher.mark()
        fault = Fault("outage", f"down {seconds:.1f} s", stopping, healed, heal_seq)
        self.faults.append(fault)
        self.outage = (began, restarting)
        fault.recovered = collector.wait_for(
            partial(collector.all_past, heal_seq), self.config.recovery_timeout
        )
        if fault.recovered:
            fault.recovered_at = time.time()
        self.progress(
            f"outage: server down {healed - began:.1f} s, "
            + ("recovered" if fault.recovered else "NOT RECOVERED")
        )

    def _pause(self, seconds: float) -> None:
        self.halt.wait(seconds)

    def _inject(self, kind: str, publisher: Publisher) -> Fault:
        rng, target, detection = self.rng, self.target, self.config.detection
        began = time.time()
        detail = ""
        if kind in ("restart_graceful", "restart_kill"):
            mode = "kill" if kind == "restart_kill" else "graceful"
            target.stop_server(mode)
            down = rng.uniform(0.0, 1.5)
            self._pause(down)
            target.start_server()
            detail = f"down {down:.1f} s before the restart"
        elif kind == "kill_connections":
            detail = f"{target.kill_subscriber_connections()} killed server-side"
        elif kind == "freeze":
            frozen = detection + rng.uniform(0.5, 2.0)
            target.freeze()
            try:
                self._pause(frozen)
            finally:
                target.thaw()
            detail = f"frozen for {frozen:.1f} s"
        else:
            roles = rng.choice([["subscriber"], ["publisher"], ["subscriber", "publisher"]])
            proxies = [target.proxies[role] for role in roles]
            detail = "+".join(roles)
            if kind == "proxy_cut":
                for proxy in proxies:
                    proxy.cut()
            elif kind == "proxy_stall":
                held = rng.uniform(0.3, detection + 2.0)
                for proxy in proxies:
                    proxy.stall()
                try:
                    self._pause(held)
                finally:
                    for proxy in proxies:
                        proxy.resume()
                detail += f", {held:.1f} s"
            elif kind == "proxy_slow":
                delay, held = rng.uniform(0.01, 0.2), rng.uniform(1.0, 3.0)
                for proxy in proxies:
                    proxy.slow(delay)
                try:
                    self._pause(held)
                finally:
                    for proxy in proxies:
                        proxy.resume()
                detail += f", {delay * 1000:.0f} ms a chunk for {held:.1f} s"
            else:
                raise ValueError(f"unknown fault kind {kind!r}")
        healed, heal_seq = publisher.mark()
        return Fault(kind, detail, began, healed, heal_seq)

    def _settle(self, publisher: Publisher, collector: Collector) -> list[str]:
        """After the last fault: every subscriber must hear again, then a fault-free phase."""
        notes: list[str] = []
        _, seq = publisher.mark()
        # One more second of traffic that every subscriber must receive.
        tail = seq + max(1, int(self.config.rate))
        self.final_seq = tail
        if not collector.wait_for(lambda: collector.all_past(tail), self.config.settle_timeout):
            notes.append(f"not every subscriber heard message {tail} after the last fault")
        # The fault-free phase: every message published from here on must arrive, no resync.
        self.quiet_start = time.time()
        self._pause(self.config.quiet)
        publisher.stopping.set()
        publisher.join(self.config.options["publish_timeout"] + 10)
        quiet = [p for p in publisher.records if p.ok and p.started >= self.quiet_start]
        owed = [(p.channel, p.seq) for p in quiet if p.group is None]
        # A targeted one is owed to the group: some member has it.
        owed_once = [(p.channel, p.seq) for p in quiet if p.group is not None]

        def drained() -> bool:
            agents = collector.agents.values()
            return all(key in agent.delivered for agent in agents for key in owed) and all(
                any(key in agent.delivered for agent in agents) for key in owed_once
            )

        if not collector.wait_for(drained, 5.0 + self.config.detection):
            notes.append("some subscriber did not receive every message of the fault-free phase")
        return notes


def run(config: ChaosConfig, progress: Callable[[str], None] | None = None) -> ChaosReport:
    """Run one chaos run and return its report (``report.ok`` says whether it passed)."""
    return Chaos(config, progress).run()
