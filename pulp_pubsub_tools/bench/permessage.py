"""The work of one message in one process: publish it, wait for it, dispatch it.

The round trip of ``pubsub_bench latency`` is two processes, each receiving and publishing
once per ping; on a loaded machine its p50 moves with everything else that runs. This loop
does the same work in one process, with the server on loopback, so its cost can be counted
in instructions (``valgrind --tool=callgrind``), which do not move with the machine's load,
and profiled (``--profile``). ``layer`` publishes with ``pulp_pubsub.publish`` and waits as
the benchmark's pinger does (``select()`` on ``fileno()``, then ``dispatch()``); ``bare``
does the same with the benchmark's bare client (:mod:`.raw`).

Run it from the root of the tree whose code is measured::

    DJANGO_SETTINGS_MODULE=demo.settings python -m pulp_pubsub_tools.bench.permessage \\
        --backend redis --url redis://127.0.0.1:6379/0 --mode layer --messages 3000

Instructions per message: run it under callgrind with ``--once`` at two counts and divide
the difference by the difference of the counts (what is made once, Django, the connections,
the warm-up, cancels out)::

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python -m \\
        pulp_pubsub_tools.bench.permessage --once --messages 200 ...   # then 1200
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import time
import uuid
from collections.abc import Callable

WARMUP = 200
RUNS = 5
#: Seconds one message may take before the loop gives up.
WAIT = 5.0

Step = Callable[[str], None]


def layer(backend: str, url: str | None, channel: str) -> tuple[Step, Callable[[], None]]:
    os.environ["PUBSUB_BACKEND"] = backend
    if url:
        os.environ["PUBSUB_URL"] = url
    if backend == "postgres" and not url:
        # demo.settings: the default database is SQLite; "postgres" is the server.
        os.environ.setdefault("PUBSUB_OPTIONS", '{"database": "postgres"}')
    import django

    django.setup()
    import pulp_pubsub

    sub = pulp_pubsub.get_backend().subscriber()
    got: list[str] = []
    sub.subscribe(channel, lambda message: got.append(message.payload))
    if not sub.wait_connected(WAIT):
        raise SystemExit(f"the {backend} subscriber did not connect: {sub.last_error}")
    publish = pulp_pubsub.publish

    def step(token: str) -> None:
        publish(channel, token)
        while not got:
            if not select.select([sub.fileno()], [], [], WAIT)[0]:
                raise SystemExit("a message did not come back")
            sub.dispatch()
        if got.pop() != token:
            raise SystemExit("a message came back changed")

    return step, sub.close


def bare(backend: str, url: str | None, channel: str) -> tuple[Step, Callable[[], None]]:
    from .raw import PsycopgClient, RawClient, RedisClient

    clients: dict[str, Callable[[str], RawClient]] = {
        "redis": RedisClient,
        "postgres": PsycopgClient,
    }
    if backend not in clients:
        raise SystemExit(f"--mode bare knows {', '.join(clients)}, not {backend}")
    default = {
        "redis": "redis://127.0.0.1:6379/0",
        "postgres": "postgresql://postgres@127.0.0.1:5432/postgres",
    }
    raw = clients[backend](url or default[backend])
    raw.subscribe(channel)
    got: list[str] = []

    def step(token: str) -> None:
        raw.publish(channel, token)
        while not got:
            if not select.select([raw.fileno()], [], [], WAIT)[0]:
                raise SystemExit("a message did not come back")
            got.extend(payload for _, payload in raw.read())
        if got.pop() != token:
            raise SystemExit("a message came back changed")

    return step, raw.close


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="redis")
    parser.add_argument("--url", default=None, help="the server (the backend's default if unset)")
    parser.add_argument("--mode", choices=("layer", "bare"), default="layer")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--once", action="store_true", help="one run, no output (callgrind)")
    parser.add_argument("--profile", metavar="FILE", help="write a cProfile of one run here")
    args = parser.parse_args(argv)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo.settings")
    channel = f"permessage_{uuid.uuid4().hex[:8]}"
    make = layer if args.mode == "layer" else bare
    step, close = make(args.backend, args.url, channel)
    try:
        for i in range(WARMUP):
            step(f"w{i}")
        if args.once or args.profile:
            if args.profile:
                import cProfile

                profiler = cProfile.Profile()
                profiler.enable()
            for i in range(args.messages):
                step(str(i))
            if args.profile:
                profiler.disable()
                profiler.dump_stats(args.profile)
            return
        runs = []
        for _ in range(RUNS):
            started = time.perf_counter()
            for i in range(args.messages):
                step(str(i))
            runs.append((time.perf_counter() - started) / args.messages * 1e6)
        shown = ", ".join(f"{r:.1f}" for r in runs)
        sys.stdout.write(
            f"{args.backend} {args.mode}: {statistics.median(runs):.1f} µs a message "
            f"(median of {RUNS} runs of {args.messages}: {shown})\n"
        )
    finally:
        close()


if __name__ == "__main__":
    main()
