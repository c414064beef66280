"""Running a server binary on a free loopback port in a directory of its own, and ending it.

The shared base of the throwaway servers: start with a readiness check against a deadline,
stop, restart on the same port, freeze and thaw with SIGSTOP/SIGCONT, clean up at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, TypeVar

LOOPBACK = "127.0.0.1"
_LIVE: set[ServerProcess] = set()
_S = TypeVar("_S", bound="ServerProcess")


def free_port() -> int:
    """An unused loopback port (racy until bound; ``start()`` retries once if it was taken)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _scratch_base() -> str | None:
    """$PUBSUB_TEST_TMPDIR, else /dev/shm if it has 1 GiB free, else the tempfile default."""
    if os.environ.get("PUBSUB_TEST_TMPDIR"):
        return os.environ["PUBSUB_TEST_TMPDIR"]
    with contextlib.suppress(OSError):
        st = os.statvfs("/dev/shm")
        if st.f_bavail * st.f_frsize > 2**30 and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    return None


def _as_postgres() -> dict[str, Any]:
    """Popen kwargs that drop root to the ``postgres`` user (initdb/postgres/pgbouncer insist)."""
    if os.geteuid() != 0:
        return {}
    return {"user": "postgres", "group": pwd.getpwnam("postgres").pw_gid, "extra_groups": []}


def _own(path: str) -> None:
    """Give a tree to ``postgres`` when we are root, so the dropped child can write there."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for root, dirs, files in os.walk(path):
            for p in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.lchown(p, pw.pw_uid, pw.pw_gid)


def _descendants(pid: int) -> list[int]:
    """Live descendants of ``pid``, from the ppid field of /proc/*/stat (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _signal_all(pids: list[int], sig: int) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def require_binary(path: str, package: str | None) -> None:
    """Fail with the line that installs a missing server, never with a bare traceback."""
    found = os.access(path, os.X_OK) if os.sep in path else shutil.which(path) is not None
    if not found and package is not None:
        raise RuntimeError(
            f"{os.path.basename(path)} is not installed; install it with: apt-get install {package}"
        )


class ServerProcess:
    """Shared lifecycle: spawn, probe the real protocol until ready, stop, freeze, clean up."""

    kind = "server"
    stop_signals: dict[str, int] = {"graceful": signal.SIGTERM, "kill": signal.SIGKILL}
    cleanup_mode: str | None = None  # stop mode cleanup() uses; None means the first one
    run_as_postgres = False
    #: The Debian package that brings the server's binary, named when it is missing.
    package: str | None = None

    def __init__(self) -> None:
        self.host = LOOPBACK
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"pubsub-{self.kind}-", dir=_scratch_base())
        self.log_path = os.path.join(self.dir, f"{self.kind}.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        _LIVE.add(self)

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Hook: write config files before each start (the first start may change the port)."""

    def _env(self) -> dict[str, str] | None:
        """Hook: the server's environment (None: this process's)."""
        return None

    def _probe(self) -> bool:
        """Hook: one readiness check; True once the server answers its protocol."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError("subclasses of ServerProcess must provide url")

    @property
    def pid(self) -> int | None:
        """The server's main process, for measuring what it and its children use."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    def start(self: _S, timeout: float = 30.0) -> _S:
        """Spawn the server and wait (with a deadline) until a real client request succeeds."""
        if self.running:
            return self
        for attempt in range(3):
            self._prepare()
            command = self._command()
            require_binary(command[0], self.package)
            kw = _as_postgres() if self.run_as_postgres else {}
            with open(self.log_path, "ab") as log:
                # New session: a Ctrl-C in the terminal must not reach the servers directly.
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=self.dir,
                    env=self._env(),
                    start_new_session=True,
                    **kw,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if self._probe():
                    self._started_once = True
                    return self
                time.sleep(0.02)
            tail = self.log_tail()
            self._kill_hard()
            if not self._started_once and attempt < 2 and "in use" in tail:
                self.port = free_port()  # lost the free_port() race; restarts keep the port
                continue
            raise RuntimeError(
                f"{self.kind} on port {self.port} did not come up within "
                f"{timeout}s; log {self.log_path}:\n{tail}"
            )
        raise AssertionError("unreachable")

    def stop(self, mode: str | None = None, timeout: float = 30.0) -> None:
        """Stop with a mode from ``stop_signals`` (default: the first); SIGKILL after timeout."""
        sig = self.stop_signals[mode or next(iter(self.stop_signals))]
        if not self.running or self._proc is None:
            return
        self.thaw()  # a stopped process acts on nothing but SIGKILL
        self._proc.send_signal(sig)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_hard()

    def _kill_hard(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            kids = _descendants(self._proc.pid)
            self._proc.kill()
            self._proc.wait()
            _signal_all(kids, signal.SIGKILL)

    def restart(self: _S, mode: str | None = None) -> _S:
        """Stop and start again: same port, same data directory."""
        self.stop(mode)
        return self.start()

    def freeze(self) -> None:
        """SIGSTOP the server and its children: sockets stay open but nothing answers."""
        if self._proc is not None and self.running:
            os.kill(self._proc.pid, signal.SIGSTOP)  # parent first, so it forks no new child
            _signal_all(_descendants(self._proc.pid), signal.SIGSTOP)

    def thaw(self) -> None:
        if self._proc is not None and self.running:
            _signal_all(_descendants(self._proc.pid), signal.SIGCONT)
            os.kill(self._proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        """Stop the server and delete its directory; safe to call twice."""
        try:
            self.stop(self.cleanup_mode, timeout=10)
        finally:
            self._kill_hard()
            shutil.rmtree(self.dir, ignore_errors=True)
            _LIVE.discard(self)

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@atexit.register
def _cleanup_all() -> None:
    for server in list(_LIVE):
        server.cleanup()
