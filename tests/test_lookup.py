"""A publish, or a subscriber's connect, gives up in time when DNS is silent.

Each case runs ``tests/lookup_child.py`` in a network and mount namespace of its own
(``unshare``), where ``/etc/resolv.conf`` names a loopback resolver that reads queries
and never answers, with one 30 s try: without a bounded lookup the call would wait
those 30 s. No server is needed: the lookup is as far as the call gets.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pulp_pubsub.backends.lookup import connect_tcp, is_address, lookup
from pulp_pubsub_tools.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "lookup_child.py"
NAME = "pubsub-lookup.test"
#: Far below the resolver's 30 s, far above the 1 s publish_timeout.
BOUND = 12.0
FAST = {"publish_timeout": 1.0, "connect_timeout": 1.0}
SILENT = "the DNS resolver did not answer"


def _in_silent_dns(tmp_path: Path, mode: str, backend: str, url: str, options: dict) -> dict:
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2"), ("mount", "mount")):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: apt-get install -y {package}")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:30 attempts:1\n")
    script = 'ip link set lo up && mount --bind "$0" /etc/resolv.conf && exec "$@"'
    command = ["unshare", "--net", "--mount", "--map-root-user", "sh", "-c", script]
    command += [str(resolv), sys.executable, str(CHILD), mode, backend, url, json.dumps(options)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DJANGO_SETTINGS_MODULE": "demo.settings"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert "premise" not in outcome, outcome["premise"]
    return outcome


CASES = [
    ("redis", f"redis://{NAME}:6379/0", {}, SILENT),
    ("redis", f"rediss://{NAME}:6379/0", {}, SILENT),
    # redis-py's words: which sentinel failed, not why.
    ("redis", f"redis+sentinel://{NAME}:26379/mymaster", {}, "No master found"),
    ("relay", f"ws://{NAME}:8765", {"publish": "direct"}, SILENT),
    ("etcd", f"etcd://{NAME}:2379", {}, SILENT),
    ("postgres", f"postgres://postgres@{NAME}:5432/postgres", {}, SILENT),
    # nats-py looks up on its loop, and the layer waits for that loop with a deadline.
    ("nats", f"nats://{NAME}:4222", {}, "no answer"),
]
IDS = ["redis", "redis-tls", "redis-sentinel", "relay", "etcd", "postgres", "nats"]


@pytest.mark.parametrize("backend, url, options, says", CASES, ids=IDS)
def test_a_publish_gives_up_at_its_timeout_when_dns_does_not_answer(
    tmp_path, backend, url, options, says
):
    outcome = _in_silent_dns(tmp_path, "publish", backend, url, {**FAST, **options})
    assert outcome["error"] == "PublishError", outcome
    assert says in outcome["message"], outcome
    assert outcome["elapsed"] < BOUND, outcome


@pytest.mark.parametrize("backend, url, options, says", CASES, ids=IDS)
def test_a_subscriber_connect_gives_up_at_its_timeout_when_dns_does_not_answer(
    tmp_path, backend, url, options, says
):
    outcome = _in_silent_dns(tmp_path, "connect", backend, url, {**FAST, **options})
    assert outcome["lost"], outcome  # ConnectionLost: the listener backs off and tries again
    assert says in outcome["message"], outcome
    assert outcome["elapsed"] < BOUND, outcome


def test_an_address_is_never_looked_up():
    port = free_port()
    assert is_address("127.0.0.1") and is_address("::1") and is_address("fe80::1%lo")
    assert not is_address("localhost")
    # No thread, no resolver: a zero timeout still gives the address.
    assert lookup("127.0.0.1", port, 0)[0][4][:2] == ("127.0.0.1", port)


def test_connect_tcp_connects_by_name_and_reports_a_refused_port():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with connect_tcp("localhost", port, 5) as sock:
            assert sock.getpeername()[:2] == ("127.0.0.1", port)
    with pytest.raises(ConnectionRefusedError):
        connect_tcp("127.0.0.1", free_port(), 2)
