from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import replace
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from pulp_pubsub.exceptions import PubSubError
from pulp_pubsub_tools.bench import ALONE, SCENARIOS, BenchError, fleet_report
from pulp_pubsub_tools.bench.fleet import QUICK_FLEET, FleetParams, run_fleet
from pulp_pubsub_tools.bench.progress import Progress
from pulp_pubsub_tools.bench.report import (
    evaluate_targets,
    render_markdown,
    render_text,
    write_markdown,
)
from pulp_pubsub_tools.bench.runner import QUICK, Params, run_benchmark
from pulp_pubsub_tools.bench.servers import ServerSet

DEFAULTS = Params()
FLEET = FleetParams()


#: Every backend with a server: the default run draws the whole picture.
DEFAULT_BACKENDS = ("postgres", "redis", "nats", "etcd", "relay")
#: The fleet adds NATS with JetStream, the other backend that targets (work-queue streams),
#: beside core NATS, which broadcasts. ZooKeeper is left out: its fleet run is not made yet.
FLEET_BACKENDS = (*DEFAULT_BACKENDS, "natsjs")


class Command(BaseCommand):
    help = (
        "Benchmark the pub/sub backends side by side with their bare client libraries and with "
        "Pulp's polling workers: " + ", ".join(SCENARIOS) + ". Starts throwaway PostgreSQL "
        "and Redis servers unless given their URLs."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "scenarios",
            nargs="*",
            metavar="SCENARIO",
            help=f"What to run (default: all): {', '.join(SCENARIOS)}; or, alone, "
            f"{', '.join(ALONE)}.",
        )
        parser.add_argument(
            "--backends",
            default=None,
            help=f"Comma-separated backends (default: {','.join(DEFAULT_BACKENDS)}; for fleet, "
            f"{','.join(FLEET_BACKENDS)}).",
        )
        add = parser.add_argument
        add("--subscribers", type=int, help=f"N (default {DEFAULTS.subscribers}).")
        add("--pings", type=int, help=f"Latency round trips (default {DEFAULTS.pings}).")
        add("--rounds", type=int, help=f"Fanout publishes (default {DEFAULTS.rounds}).")
        add("--window", type=float, help=f"Idle window, s (default {DEFAULTS.window:g}).")
        add("--writers", type=int, help=f"Commit writers (default {DEFAULTS.writers}).")
        add(
            "--duration",
            type=float,
            help=f"Seconds per commit measurement (default {DEFAULTS.duration:g}).",
        )
        add(
            "--repeats",
            type=int,
            help="Commit measurements per level, with and without a wake-up in turn; the "
            f"medians count (default {DEFAULTS.repeats}).",
        )
        add(
            "--poll-rounds",
            type=int,
            help=f"Wake-ups for the poll baseline (default {DEFAULTS.poll_rounds}).",
        )
        add(
            "--fleet-sizes",
            help="fleet: the sizes the fleet grows through (default "
            f"{','.join(map(str, FLEET.sizes))}).",
        )
        add(
            "--per-agent",
            type=int,
            help=f"fleet: subscribers per agent process (default {FLEET.per_agent}).",
        )
        add(
            "--burst",
            type=int,
            help=f"fleet: targeted publishes whose server CPU is read (default {FLEET.burst}).",
        )
        add(
            "--probe-interval",
            type=float,
            help=f"fleet: the subscribers' probe_interval, s (default {FLEET.probe_interval:g}, "
            "so that each probes in a short idle window; the layer's own default is 30).",
        )
        add(
            "--quick",
            action="store_true",
            help="Tiny defaults for CI smoke runs: N=5, short windows (flags still win).",
        )
        add("--postgres-url", help="Use this PostgreSQL instead of a throwaway one.")
        add("--redis-url", help="Use this Redis instead of a throwaway one.")
        add(
            "--server-url",
            action="append",
            default=[],
            metavar="KIND=URL",
            help="A server for another backend's adapter, e.g. nats=nats://127.0.0.1:4222.",
        )
        add("--json", metavar="FILE", help="Write the full result as JSON.")
        add("--plot", metavar="FILE.png", help="Draw the result (needs matplotlib).")
        add(
            "--markdown",
            metavar="FILE",
            help="Write the tables as Markdown; in a file with the results markers, "
            "only between them (docs/benchmark.md).",
        )
        add(
            "--load",
            metavar="FILE",
            help="Run nothing: report, plot and convert an earlier --json result.",
        )
        add("--no-progress", action="store_true", help="No progress output.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            result = self._load(options) if options["load"] else self._run(options)
            self._output(result, options)
        except (BenchError, PubSubError, ImproperlyConfigured) as exc:
            raise CommandError(str(exc)) from exc

    def _run(self, options: dict[str, Any]) -> dict[str, Any]:
        chosen = options["scenarios"] or list(SCENARIOS)
        if set(chosen) & set(ALONE):
            if len(chosen) > 1:
                raise CommandError(f"{', '.join(ALONE)} runs alone: name no other scenario.")
            return self._run_fleet(options)
        params = QUICK if options["quick"] else DEFAULTS
        fields = (
            "subscribers",
            "pings",
            "rounds",
            "window",
            "writers",
            "duration",
            "repeats",
            "poll_rounds",
        )
        params = replace(params, **{f: options[f] for f in fields if options[f] is not None})
        backends = self._backends(options, DEFAULT_BACKENDS)
        if not backends and set(chosen) - {"poll"}:
            raise CommandError("--backends names no backend.")
        servers = ServerSet(self._urls(options), max_connections=100)
        try:
            return run_benchmark(
                params, chosen, backends, servers, self._progress(options), self._command_line()
            )
        finally:
            servers.close()

    def _run_fleet(self, options: dict[str, Any]) -> dict[str, Any]:
        params = QUICK_FLEET if options["quick"] else FLEET
        given = {"per_agent": options["per_agent"], "burst": options["burst"]}
        given["rounds"], given["window"] = options["rounds"], options["window"]
        given["probe_interval"] = options["probe_interval"]
        if options["fleet_sizes"]:
            try:
                given["sizes"] = tuple(int(n) for n in options["fleet_sizes"].split(","))
            except ValueError:
                raise CommandError(
                    f"--fleet-sizes takes numbers such as 250,500: not {options['fleet_sizes']!r}."
                ) from None
        params = replace(params, **{k: v for k, v in given.items() if v is not None})
        backends = self._backends(options, FLEET_BACKENDS)
        if not backends:
            raise CommandError("--backends names no backend.")
        servers = ServerSet(self._urls(options), max_connections=100)
        try:
            return run_fleet(
                params, backends, servers, self._progress(options), self._command_line()
            )
        finally:
            servers.close()

    @staticmethod
    def _backends(options: dict[str, Any], default: tuple[str, ...]) -> list[str]:
        given = options["backends"]
        if given is None:
            return list(default)
        return [b.strip() for b in given.split(",") if b.strip()]

    @staticmethod
    def _urls(options: dict[str, Any]) -> dict[str, str]:
        urls = {"postgres": options["postgres_url"], "redis": options["redis_url"]}
        for item in options["server_url"]:
            kind, sep, url = item.partition("=")
            if not sep or not kind or not url:
                raise CommandError(f"--server-url takes KIND=URL, not {item!r}.")
            urls[kind] = url
        return urls

    def _progress(self, options: dict[str, Any]) -> Progress:
        stream = getattr(self.stderr, "_out", sys.stderr)

        def note(line: str) -> None:
            if not options["no_progress"]:
                self.stderr.write(line, style_func=str)

        return Progress(stream, note, bars=not options["no_progress"])

    @staticmethod
    def _command_line() -> str:
        argv = sys.argv[:]
        if "pubsub_bench" not in argv[1:]:
            return "pubsub_bench (called from code)"
        program = "python manage.py" if argv[0].endswith("manage.py") else os.path.basename(argv[0])
        return f"{program} {shlex.join(argv[1:])}"

    def _load(self, options: dict[str, Any]) -> dict[str, Any]:
        try:
            with open(options["load"]) as f:
                result = dict(json.load(f))
        except (OSError, ValueError) as exc:
            raise CommandError(f"Cannot read {options['load']}: {exc}") from exc
        # Judged by this version's rules.
        if "fleet" in result:
            result["goals"] = fleet_report.evaluate_goals(result)
        else:
            result["targets"] = evaluate_targets(result)
        return result

    def _output(self, result: dict[str, Any], options: dict[str, Any]) -> None:
        if "fleet" in result:
            self._output_fleet(result, options)
            return
        self.stdout.write(render_text(result))
        self._write_json(result, options)
        if options["plot"]:
            from pulp_pubsub_tools.bench.plot import save_plot

            save_plot(result, options["plot"])
            self.stdout.write(f"Plot: {options['plot']}")
        if options["markdown"]:
            write_markdown(
                options["markdown"], render_markdown(result, plot=self._plot_link(options))
            )
            self.stdout.write(f"Markdown: {options['markdown']}")
        self._summary(result.get("targets", []), "targets")

    def _output_fleet(self, result: dict[str, Any], options: dict[str, Any]) -> None:
        self.stdout.write(fleet_report.render_text(result))
        self._write_json(result, options)
        if options["plot"]:
            fleet_report.save_plot(result, options["plot"])
            self.stdout.write(f"Plot: {options['plot']}")
        if options["markdown"]:
            text = fleet_report.render_markdown(result, plot=self._plot_link(options))
            write_markdown(options["markdown"], text, fleet_report.START, fleet_report.END)
            self.stdout.write(f"Markdown: {options['markdown']}")
        self._summary(result.get("goals", []), "goals")

    def _write_json(self, result: dict[str, Any], options: dict[str, Any]) -> None:
        if options["json"] and not options["load"]:
            with open(options["json"], "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
            self.stdout.write(f"JSON: {options['json']}")

    @staticmethod
    def _plot_link(options: dict[str, Any]) -> str | None:
        plot = options["plot"]
        if plot:  # as the page links it: relative to the page
            plot = os.path.relpath(plot, os.path.dirname(os.path.abspath(options["markdown"])))
        return plot

    def _summary(self, judged: list[dict[str, Any]], what: str) -> None:
        missed = [t for t in judged if t["met"] is False]
        summary = f"{len(judged) - len(missed)} {what} met, {len(missed)} missed."
        self.stdout.write(self.style.WARNING(summary) if missed else self.style.SUCCESS(summary))
