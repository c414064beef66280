"""Run inside a network namespace whose resolver never answers: one publish or connect, as JSON.

Started by ``tests/test_lookup.py`` with ``/etc/resolv.conf`` bound to a file that
names 127.0.0.1, where this script holds a UDP socket that reads nothing.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import django

blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
blackhole.bind(("127.0.0.1", 53))

mode, backend_name, url, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])

# The premise: a plain lookup gets no answer for 2 s, so only a bounded one can return in
# time. It runs beside the bounded call rather than before it, and is checked at the end.
PREMISE = 2.0
answered = threading.Event()


def look_up() -> None:
    try:
        socket.getaddrinfo("resolver-check.test", 80)
    except OSError:
        pass
    answered.set()


premise_started = time.monotonic()
threading.Thread(target=look_up, daemon=True).start()

django.setup()
from pulp_pubsub.conf import PubSubSettings  # noqa: E402
from pulp_pubsub.exceptions import ConnectionLost  # noqa: E402
from pulp_pubsub.handler import create_backend  # noqa: E402

backend = create_backend(PubSubSettings(backend=backend_name, url=url, options=options))
started = time.monotonic()
try:
    if mode == "publish":
        backend.publish("lookup", "x")
    else:  # what a subscriber (and pubsub_ping) opens first
        backend.open_transport().close()
    outcome = {"error": None}
except Exception as exc:
    lost = isinstance(exc, ConnectionLost)
    outcome = {"error": type(exc).__name__, "lost": lost, "message": str(exc)}
outcome["elapsed"] = time.monotonic() - started
if answered.wait(max(0.0, premise_started + PREMISE - time.monotonic())):
    outcome = {"premise": "the resolver answered"}
print(json.dumps(outcome), flush=True)
os._exit(0)  # lookups still waiting on the resolver, and exit handlers, are not the test
