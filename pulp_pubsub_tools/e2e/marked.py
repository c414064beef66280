"""A docs page's generated block, between two markers: rewritten, or checked to be current.

The results tables in the docs are never typed by hand: each generator renders its block
from committed JSON and hands it here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def splice(text: str, block: str, start_marker: str, end_marker: str, where: str) -> str:
    """``text`` with what lies between the markers replaced by ``block``."""
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{where} has no {start_marker!r} ... {end_marker!r} markers")
    return text[: start + len(start_marker)] + "\n" + block + "\n" + text[end:]


def rewrite(path: Path, block: str, markers: tuple[str, str], check: bool, source: object) -> int:
    """Put ``block`` between the page's markers; with ``check`` only say whether it is current.

    Returns the exit status: 1 when ``check`` found the page out of date with ``source``.
    """
    text = path.read_text()
    updated = splice(text, block, *markers, where=path.name)
    if updated == text:
        return 0
    if check:
        sys.stderr.write(f"out of date with {source}: {path.name}\n")
        return 1
    path.write_text(updated)
    return 0


def add_result_options(
    parser: argparse.ArgumentParser, markers: tuple[str, str], *aliases: str
) -> None:
    """A run's ``--json``, ``--load``, ``--markdown`` (and ``aliases`` of it) and ``--check``."""
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--load", type=Path, default=None, help="run nothing: render this result")
    parser.add_argument(
        "--markdown",
        *aliases,
        dest="markdown",
        type=Path,
        default=None,
        help=f"also put the tables between the {markers[0]} and {markers[1]} markers of this file",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --load and --markdown: change nothing, exit 1 when the page differs",
    )


def result_options_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the options of :func:`add_result_options`, if anything."""
    if args.check and not (args.load and args.markdown):
        return "--check needs --load (the result) and --markdown (the page)"
    return None
