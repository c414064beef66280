"""The subscribers as the orchestrator sees them: processes (or threads) and their reports."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from .agent import run_agent
from .invariant import AgentLog

logger = logging.getLogger(__name__)


class Collector:
    """Everything the subscribers report, behind one condition the injector waits on."""

    def __init__(self, names: list[str]) -> None:
        self.cond = threading.Condition()
        self.agents = {name: AgentLog(name) for name in names}

    def handle(self, name: str, event: dict[str, Any]) -> None:
        with self.cond:
            agent = self.agents[name]
            kind = event.get("k")
            if kind == "m":
                agent.add_message(event["c"], int(event["s"]), float(event["t"]))
            elif kind == "r":
                since = event.get("since")
                agent.add_resync(
                    event["c"],
                    float(event["t"]),
                    None if since is None else float(since),
                    bool(event.get("d")),
                )
            elif kind == "drop":
                agent.dropped.add((event["c"], int(event["s"])))
            elif kind == "ready":
                agent.subscribed_at = float(event["t"])
                if not event.get("connected"):
                    agent.errors.append("not connected when it reported ready")
            elif kind == "x":
                agent.unexpected.append(f"{event.get('c')}: {event.get('p')!r}")
            elif kind == "stats":
                agent.stats = {k: int(v) for k, v in event["stats"].items()}
            elif kind == "err":
                agent.errors.append(str(event.get("e")))
            self.cond.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def all_past(self, seq: int) -> bool:
        """Every subscriber has received some message numbered ``seq`` or later."""
        return all(agent.max_seq >= seq for agent in self.agents.values())


class Agent:
    """One subscriber: a process of its own, or a thread for the memory backend."""

    def __init__(self, name: str, spec: dict[str, Any], collector: Collector, workdir: str):
        self.name, self.spec, self.collector = name, spec, collector
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread: threading.Thread | None = None
        self.reader: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1

    def start(self, cross_process: bool) -> None:
        if cross_process:
            env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "pulp_pubsub_tools.chaos.agent"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env=env,
                    start_new_session=True,  # a Ctrl-C reaches the orchestrator alone
                )
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(self.spec) + "\n").encode())
            self.proc.stdin.flush()
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        else:
            self._stop_r, self._stop_w = os.pipe()
            self.thread = threading.Thread(target=self._run_here, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"k": "err", "e": f"unreadable report line {line[:80]!r}"}
            self.collector.handle(self.name, event)

    def _run_here(self) -> None:
        def emit(event: dict[str, Any]) -> None:
            self.collector.handle(self.name, event)

        try:
            run_agent(self.spec, emit, self._stop_r)
            exit_code = 0
        except Exception as exc:
            logger.exception("chaos agent %s failed", self.name)
            emit({"k": "err", "e": f"{type(exc).__name__}: {exc}"})
            exit_code = 1
        finally:
            os.close(self._stop_r)
        with self.collector.cond:
            self.collector.agents[self.name].exit_code = exit_code

    def stop(self, timeout: float) -> None:
        agent = self.collector.agents[self.name]
        if self.proc is not None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                agent.exit_code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                agent.close_hung = True
                self.proc.kill()
                agent.exit_code = self.proc.wait()
            if self.reader is not None:
                self.reader.join(timeout)
        elif self.thread is not None:
            os.close(self._stop_w)
            self.thread.join(timeout)
            agent.close_hung = self.thread.is_alive()

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""
