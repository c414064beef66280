"""A ``pubsub_relay`` process, for the relay backend's tests, the benchmark and the chaos run."""

from __future__ import annotations

import os
import signal
import sys
import time

import pulp_pubsub

from .processes import ServerProcess


class RelayServer(ServerProcess):
    """``manage.py pubsub_relay`` on a free port, in the current Django settings.

    ``database_url`` is the PostgreSQL server to LISTEN on; None runs the relay
    with ``--no-postgres`` (direct publishing only). The token goes through a
    file, never the command line, where ``ps`` would show it.
    """

    kind = "relay"
    stop_signals = {"graceful": signal.SIGTERM, "kill": signal.SIGKILL}

    def __init__(
        self,
        database_url: str | None,
        token: str | None = None,
        probe_interval: float = 30.0,
        probe_timeout: float = 10.0,
        extra_args: list[str] | None = None,
        require_listening: bool = True,
        tls: bool = False,
    ) -> None:
        super().__init__()
        self.database_url = database_url
        self.token = token
        self.probe_interval, self.probe_timeout = probe_interval, probe_timeout
        self.extra_args = list(extra_args or [])
        # Ready only once its PostgreSQL session is proved to hear (unless told otherwise).
        self.require_listening = require_listening and database_url is not None
        self.token_file = os.path.join(self.dir, "token")
        #: With ``tls``, the CA that signed the relay's certificate (for ``ssl_ca_certs``).
        self.ca_file: str | None = None
        if tls:
            from .redis import _make_certs

            self.ca_file, cert, key = _make_certs(self.dir)
            self.extra_args += ["--certfile", cert, "--keyfile", key]
        if token is not None:
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)

    def __repr__(self) -> str:
        return f"<RelayServer {self.url}>"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # The project root (holding pulp_pubsub and the settings module) on the path.
        root = os.path.dirname(os.path.dirname(os.path.abspath(pulp_pubsub.__file__)))
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
        # Not on the command line, where ps would show its password.
        env.pop("PUBSUB_RELAY_DATABASE_URL", None)
        if self.database_url is not None:
            env["PUBSUB_RELAY_DATABASE_URL"] = self.database_url
        return env

    def _command(self) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "django",
            "pubsub_relay",
            "--bind",
            f"{self.host}:{self.port}",
            "--probe-interval",
            str(self.probe_interval),
            "--probe-timeout",
            str(self.probe_timeout),
        ]
        if self.database_url is None:
            args.append("--no-postgres")
        if self.token is not None:
            args += ["--token-file", self.token_file]
        return args + self.extra_args

    def _probe(self) -> bool:
        from pulp_pubsub.backends.relay.protocol import RelayConnection
        from pulp_pubsub.exceptions import ConnectionLost

        context = None
        if self.ca_file is not None:
            import ssl

            context = ssl.create_default_context(cafile=self.ca_file)
        try:
            conn = RelayConnection(self.url, self.token, 2.0, context)
        except ConnectionLost:
            return False
        try:
            deadline = time.monotonic() + 2.0
            conn.send(deadline, type="ping", id=0)
            while conn.wait(deadline):
                for frame in conn.read():
                    if frame["type"] == "pong":
                        return not self.require_listening or frame["postgres"] == "listening"
            return False
        except ConnectionLost:
            return False
        finally:
            conn.close()

    @property
    def url(self) -> str:
        return f"{'wss' if self.ca_file else 'ws'}://{self.host}:{self.port}"
