"""A flood: a publisher far faster than a subscriber whose handler is busy.

The subscriber consumes as Pulp's worker does (``dispatch()`` in its own thread), here slowly,
while a publisher process sends as fast as pipelining allows. Sampled during the flood: the
process's resident memory (the listener's queue and buffers must stay bounded) and the
liveness probe (it must keep running, its round trips are reported). Run it with
``python -m pulp_pubsub_tools.chaos.flood --seconds 20`` against a throwaway Redis; it prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from .invariant import percentile

#: The publisher process: pipelines of PUBLISH, as fast as the server takes them.
PUBLISHER = """
import sys, redis
client = redis.Redis.from_url(sys.argv[1])
channel, pad, n = sys.argv[2], "x" * int(sys.argv[3]), 0
while True:
    pipe = client.pipeline(transaction=False)
    for i in range(1000):
        pipe.publish(channel, f"{n + i} {pad}")  # distinct: nothing folds
    pipe.execute()
    n += 1000
    if sys.stdin.closed:
        break
"""


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def flood(
    url: str,
    seconds: float = 5.0,
    payload_size: int = 100,
    handler_seconds: float = 0.001,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Flood one Redis subscriber for ``seconds``; return what was measured."""
    from pulp_pubsub.backends.redis.backend import RedisBackend

    opts = {"probe_interval": 0.5, "probe_timeout": 5.0, "max_pending": 1000, **(options or {})}
    backend = RedisBackend(url=url, options=opts)
    handled = 0

    def slow(message: Any) -> None:
        nonlocal handled
        handled += 1
        time.sleep(handler_seconds)  # the handler's work, not synchronisation

    rtts: list[float] = []
    rss: list[int] = []
    stop = threading.Event()
    try:
        with backend.subscriber() as sub:
            sub.subscribe("flood", slow)
            if not sub.wait_connected(10):
                raise RuntimeError(f"the subscriber did not connect: {sub.last_error}")
            baseline = rss_bytes()
            probes_before = sub.stats["probes"]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
            publisher = subprocess.Popen(
                [sys.executable, "-c", PUBLISHER, url, "flood", str(payload_size)],
                stdin=subprocess.PIPE,
                env=env,
            )

            def sample() -> None:
                last = None
                while not stop.wait(0.1):
                    rss.append(rss_bytes())
                    if sub.probe_rtt is not None and sub.probe_rtt != last:
                        last = sub.probe_rtt
                        rtts.append(sub.probe_rtt)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                sub.dispatch(timeout=0.1)
            publisher.kill()
            publisher.wait()
            stop.set()
            sampler.join()
            # What waits now, and the resync owed for what the full queue dropped.
            sub.dispatch()
            stats = dict(sub.stats)
    finally:
        stop.set()
        backend.close()
    return {
        "seconds": seconds,
        "received": stats.get("received", 0),
        "handled": handled,
        "dropped": stats.get("dropped", 0),
        "folded": stats.get("folded", 0),
        "resyncs": stats.get("resyncs", 0),
        "reconnects": stats.get("reconnects", 0),
        "probes_sent": stats.get("probes", 0) - probes_before,
        "probe_rtts": len(rtts),
        "probe_rtt_p50": percentile(rtts, 50),
        "probe_rtt_max": max(rtts, default=None),
        "rss_baseline_mb": round(baseline / 2**20, 1),
        "rss_peak_mb": round(max(rss, default=baseline) / 2**20, 1),
        "rss_growth_mb": round((max(rss, default=baseline) - baseline) / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--payload-size", type=int, default=100)
    args = parser.parse_args()
    import django
    from django.conf import settings

    settings.configure(INSTALLED_APPS=[], DATABASES={}, USE_TZ=True, LOGGING_CONFIG=None)
    django.setup()
    from ..testing import RedisServer

    with RedisServer() as server:
        result = flood(server.url, args.seconds, args.payload_size)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
