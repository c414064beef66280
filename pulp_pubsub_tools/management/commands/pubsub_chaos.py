from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from pulp_pubsub_tools.chaos import ChaosConfig, run
from pulp_pubsub_tools.chaos.mutations import MUTATIONS
from pulp_pubsub_tools.chaos.targets import PROXY_FAULTS, SERVER_FAULTS, TARGETS


class Command(BaseCommand):
    help = (
        "Break a throwaway server on purpose while messages flow, then check that every "
        "subscriber got every message or a later resync, that none stayed deaf and that no "
        "publish hung; exits non-zero when the run fails. The server is always a new one of "
        "the run's own on a free loopback port (never the configured PUBSUB_URL)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--backend", choices=sorted(TARGETS), default="memory", help="Backend to break."
        )
        parser.add_argument(
            "--duration",
            type=float,
            default=60.0,
            help="Seconds of faults (extended until every fault kind has had a turn, at most "
            "twice this).",
        )
        parser.add_argument("--subscribers", type=int, default=4, help="Subscriber processes.")
        parser.add_argument("--channels", type=int, default=2, help="Channels to publish on.")
        parser.add_argument("--rate", type=float, default=50.0, help="Messages per second.")
        parser.add_argument("--max-faults", type=int, help="Stop after this many faults.")
        parser.add_argument(
            "--faults",
            help="Comma-separated fault kinds (default: all the backend supports): "
            + ", ".join(SERVER_FAULTS + PROXY_FAULTS),
        )
        parser.add_argument(
            "--quiet-phase",
            type=float,
            default=3.0,
            help="Seconds of the fault-free phase that ends the run, in which every message "
            "must arrive and no resync may.",
        )
        parser.add_argument(
            "--resync-margin",
            type=float,
            default=0.5,
            help="How far before a subscriber's last proof of hearing a resync still covers a "
            "lost message (seconds).",
        )
        parser.add_argument(
            "--mutation",
            choices=MUTATIONS,
            help="Break the subscribers on purpose (drop_1pct: one message in a hundred; "
            "drop_after_reconnect: every message in the second after a reconnect); the run "
            "must then fail and name the lost messages.",
        )
        parser.add_argument(
            "--outage",
            type=float,
            default=10.0,
            help="Seconds the server stays down after the faults, while every subscriber must "
            "be degraded and deliver a resync on each channel every outage_interval (1 s); "
            "0: no outage phase.",
        )
        parser.add_argument(
            "--no-targeted",
            action="store_true",
            help="No targeted traffic (by default, on a backend that targets, one more "
            "channel's messages go to a group every subscriber joins).",
        )
        parser.add_argument("--seed", type=int, help="Seed of the fault schedule.")
        parser.add_argument("--workdir", help="Directory for the subscribers' logs.")
        parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
        parser.add_argument("--save", help="Also write the report as JSON to this file.")
        parser.add_argument(
            "--tables",
            help="Run nothing: render the results table from these comma-separated saved "
            "reports into --markdown (between its markers).",
        )
        parser.add_argument("--markdown", help="The page whose results table --tables rewrites.")
        parser.add_argument(
            "--long", action="store_true", help="With --tables: the long, per-figure table."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["tables"]:
            self._tables(options)
            return
        if options["quiet_phase"] <= 0 or options["resync_margin"] < 0 or options["outage"] < 0:
            raise CommandError(
                "--quiet-phase must be positive, --resync-margin and --outage not negative."
            )
        for name in ("duration", "rate"):
            if options[name] <= 0:
                raise CommandError(f"--{name} must be positive.")
        for name in ("subscribers", "channels"):
            if options[name] < 1:
                raise CommandError(f"--{name} must be at least 1.")
        faults = None
        if options["faults"]:
            faults = tuple(kind.strip() for kind in options["faults"].split(",") if kind.strip())
        config = ChaosConfig(
            backend=options["backend"],
            duration=options["duration"],
            subscribers=options["subscribers"],
            channels=options["channels"],
            rate=options["rate"],
            max_faults=options["max_faults"],
            faults=faults,
            seed=options["seed"],
            workdir=options["workdir"],
            quiet=options["quiet_phase"],
            resync_margin=options["resync_margin"],
            mutation=options["mutation"],
            outage=options["outage"],
            targeted=not options["no_targeted"],
        )
        quiet = options["json"] or options["verbosity"] < 1

        def progress(text: str) -> None:
            if not quiet:
                self.stdout.write(text)
                self.stdout.flush()

        try:
            report = run(config, progress)
        except (ValueError, RuntimeError) as exc:
            raise CommandError(f"The chaos run could not run: {exc}") from exc
        if options["save"]:
            with open(options["save"], "w") as f:
                json.dump(report.as_dict(), f, indent=2)
                f.write("\n")
        if options["json"]:
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
        else:
            style = self.style.SUCCESS if report.ok else self.style.ERROR
            self.stdout.write(style(report.format()))
        if not report.ok:
            raise CommandError(f"The chaos run on {config.backend} failed: see the report above.")

    def _tables(self, options: dict[str, Any]) -> None:
        from pulp_pubsub_tools.chaos import tables

        if not options["markdown"]:
            raise CommandError("--tables needs --markdown, the page to rewrite.")
        paths = [path.strip() for path in options["tables"].split(",") if path.strip()]
        try:
            text = tables.render(tables.load(paths), long=options["long"])
            tables.write(options["markdown"], text, long=options["long"])
        except (OSError, ValueError, KeyError) as exc:
            raise CommandError(f"Cannot render the chaos tables: {exc}") from exc
        self.stdout.write(f"Rewrote the chaos results in {options['markdown']}")
