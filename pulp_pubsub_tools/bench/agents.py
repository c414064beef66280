"""Agents: the benchmark's worker processes, driven over socket pairs.

An agent is forked after Django is set up, so 250 of them share the parent's
imported code copy-on-write (``gc.freeze()`` keeps the collector from
touching, and so copying, those pages). Each agent opens its own connections:
at fork it forgets the Django connections it inherited without closing them
(closing would end the parent's sessions) and exits with ``os._exit()``, which
runs no finalizer that could. It watches its control socket in every wait, so
it ends by itself when the parent dies.

The in-process memory backend reaches no other process, so for it an agent
is a thread of the parent instead; the protocol is the same.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from . import BenchError

Role = Callable[["Link"], None]

#: Parent-side sockets of live agents: a newly forked agent closes its copies,
#: so each agent sees end-of-file as soon as the parent is gone.
_PARENT_ENDS: set[socket.socket] = set()
#: What an agent inherited and must keep referenced (never closed) until it exits.
_INHERITED: list[Any] = []


class Link:
    """Newline-delimited JSON over one end of a socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._lines: list[dict[str, Any]] = []
        self.eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    @property
    def pending(self) -> bool:
        return bool(self._lines)

    def fill(self) -> None:
        """Read what the socket has (call when it is readable); sets ``eof`` at the end."""
        try:
            data = self.sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return
        *complete, self._buffer = (self._buffer + data).split(b"\n")
        self._lines.extend(json.loads(line) for line in complete if line)

    def take(self) -> list[dict[str, Any]]:
        lines, self._lines = self._lines, []
        return lines

    def take_one(self) -> dict[str, Any]:
        return self._lines.pop(0)

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message; None on timeout or end-of-file."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._lines and not self.eof:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], left)[0]:
                return None
            self.fill()
        return self._lines.pop(0) if self._lines else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Agent:
    def __init__(self, name: str, link: Link, pid: int | None, thread: threading.Thread | None):
        self.name, self.link, self.pid, self.thread = name, link, pid, thread

    def __repr__(self) -> str:
        return f"<Agent {self.name} {'pid ' + str(self.pid) if self.pid else 'thread'}>"


def _forget_inherited_connections() -> None:
    from asgiref.local import Local
    from django.db import connections

    handler: Any = connections
    _INHERITED.append(handler._connections)
    handler._connections = Local(handler.thread_critical)


def _run(role: Role, sock: socket.socket) -> int:
    link = Link(sock)
    try:
        role(link)
        return 0
    except BaseException:
        with contextlib.suppress(OSError):
            link.send({"error": traceback.format_exc(limit=8)})
        return 1
    finally:
        link.close()


def spawn(name: str, role: Role, *, in_process: bool, setup: Callable[[], None] | None) -> Agent:
    """Start ``role(link)`` in a forked process (or a thread) with ``setup()`` run first."""
    parent, child = socket.socketpair()
    if in_process:
        thread = threading.Thread(target=_run, args=(role, child), name=name, daemon=True)
        thread.start()
        return Agent(name, Link(parent), None, thread)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the agent
        code = 1
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us on Ctrl-C
            parent.close()
            for other in _PARENT_ENDS:
                with contextlib.suppress(OSError):
                    other.close()
            _forget_inherited_connections()
            if setup is not None:
                setup()
            code = _run(role, child)
        finally:
            os._exit(code)
    child.close()
    _PARENT_ENDS.add(parent)
    return Agent(name, Link(parent), pid, None)


class Fleet:
    """A group of agents the parent talks to together."""

    def __init__(self) -> None:
        self.agents: list[Agent] = []
        #: When the last agent was started.
        self.grown_at = time.monotonic()

    def __len__(self) -> int:
        return len(self.agents)

    def spawn(
        self,
        count: int,
        name: str,
        make_role: Callable[[int], Role],
        *,
        in_process: bool,
        setup: Callable[[], None] | None = None,
    ) -> list[Agent]:
        """Start ``count`` agents; ``make_role(i)`` is what agent ``i`` of the fleet does."""
        if not in_process:
            gc.freeze()
        new = [
            spawn(f"{name}-{i}", make_role(i), in_process=in_process, setup=setup)
            for i in range(len(self.agents), len(self.agents) + count)
        ]
        self.agents += new
        self.grown_at = time.monotonic()
        return new

    def send(self, message: dict[str, Any], agents: Iterable[Agent] | None = None) -> None:
        for agent in self.agents if agents is None else agents:
            agent.link.send(message)

    def gather(
        self,
        timeout: float,
        accept: Callable[[dict[str, Any]], bool] = lambda message: True,
        agents: list[Agent] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> dict[int, dict[str, Any]]:
        """The first accepted message of each agent (by index into ``agents``).

        Stops at ``timeout``; a message with ``error`` raises at once. Messages
        not accepted (late replies from an earlier round) are dropped.
        """
        agents = self.agents if agents is None else agents
        got: dict[int, dict[str, Any]] = {}
        by_fd = {agent.link.fileno(): i for i, agent in enumerate(agents)}
        deadline = time.monotonic() + timeout
        while len(got) < len(agents):
            for i, agent in enumerate(agents):
                while i not in got and agent.link.pending:
                    message = agent.link.take_one()
                    _raise_on_error(agent, message)
                    if accept(message):
                        got[i] = message
                        if progress:
                            progress(1)
            waiting = [agents[i].link.sock for i in range(len(agents)) if i not in got]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            for sock in select.select(waiting, [], [], left)[0]:
                agent = agents[by_fd[sock.fileno()]]
                agent.link.fill()
                if agent.link.eof and not agent.link.pending:
                    raise BenchError(f"{agent.name} ended unexpectedly.")
        return got

    def shrink(self, count: int, timeout: float = 20.0) -> None:
        """Stop the agents beyond the first ``count``."""
        if count >= len(self.agents):
            return
        leaving, self.agents = self.agents[count:], self.agents[:count]
        for agent in leaving:
            with contextlib.suppress(OSError):
                agent.link.send({"cmd": "stop"})
        deadline = time.monotonic() + timeout
        for agent in leaving:
            if agent.thread is not None:
                agent.thread.join(max(0.1, deadline - time.monotonic()))
            elif agent.pid is not None:
                _reap(agent.pid, deadline)
            _PARENT_ENDS.discard(agent.link.sock)
            agent.link.close()

    def close(self, timeout: float = 20.0) -> None:
        """Ask every agent to stop, then end what is left by its own pid."""
        self.shrink(0, timeout)
        gc.unfreeze()


def _raise_on_error(agent: Agent, message: dict[str, Any]) -> None:
    if "error" in message:
        raise BenchError(f"{agent.name} failed:\n{message['error']}")


def _reap(pid: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
            time.sleep(0.01)
            continue
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
