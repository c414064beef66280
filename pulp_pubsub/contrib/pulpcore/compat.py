"""Which pulpcore the integration supports, and whether its seams are still there.

The integration relies on a handful of facts about pulpcore's source, listed
in :data:`SEAMS`, and on pulpcore sending LISTEN/NOTIFY from exactly the
places in :data:`EXPECTED_SITES`. Those facts, not the version number, decide
whether it installs: every start-up reads pulpcore's own classes (never the
integrated subclass put in their place) and a moved seam or a new pub/sub
site is an error. The version only decides whether a release whose seams all
match is one the end-to-end run has covered (:data:`SUPPORTED`) or merely
looks the same (a warning).
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

#: The pulpcore series supported: the oldest and the newest are run end to end.
SUPPORTED = ((3, 105), (3, 123))
SUPPORTED_TEXT = ">=3.105,<3.124"
#: The series the end-to-end run installs from PyPI (the ends of SUPPORTED).
E2E_SERIES = ("3.105", "3.123")
#: What pulpcore's own wake-up reasons may be (pulpcore.constants.TASK_WAKEUP_*).
WAKEUP_REASONS = frozenset({"unblock", "handle"})


def pulpcore_version() -> str | None:
    try:
        return metadata.version("pulpcore")
    except metadata.PackageNotFoundError:
        return None


def version_problem(found: str | None = None) -> str | None:
    """Why this pulpcore is outside the supported series, or None when it is inside.

    Outside is a warning, not a refusal: the seams decide (:func:`seam_problems`).
    """
    found = pulpcore_version() if found is None else found
    if found is None:
        return "pulpcore is not installed"
    match = re.match(r"(\d+)\.(\d+)(?:\.\d+)*", found)
    if match is None:
        return f"pulpcore reports an unreadable version {found!r}"
    series = (int(match[1]), int(match[2]))
    if not SUPPORTED[0] <= series <= SUPPORTED[1]:
        return (
            f"pulpcore {found} is outside the series this pulp-pubsub supports "
            f"(pulpcore{SUPPORTED_TEXT})"
        )
    return None


@dataclass(frozen=True)
class Seam:
    """One fact about pulpcore's source the integration depends on."""

    where: str  # module:qualname, or module for the whole file
    needs: tuple[str, ...]  # substrings that must all be present
    why: str


SEAMS: tuple[Seam, ...] = (
    Seam(
        "pulpcore.tasking.tasks:wakeup_worker",
        ("connection.connection.cursor()", "pg_notify('pulp_worker_wakeup', %s)"),
        "wake-ups are sent with this statement on the module's `connection`",
    ),
    Seam(
        "pulpcore.tasking.tasks:cancel_task",
        ("connection.cursor()", "pg_notify('pulp_worker_cancel', %s)", "wakeup_worker("),
        "cancels are sent with this statement on the module's `connection`",
    ),
    Seam(
        "pulpcore.tasking.tasks:dispatch",
        ("wakeup_worker(",),
        "dispatch wakes workers through wakeup_worker()",
    ),
    Seam(
        "pulpcore.tasking.tasks:adispatch",
        ("wakeup_worker)(",),
        "adispatch wakes workers through wakeup_worker()",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.__init__",
        ("self.cursor = connection.cursor()",),
        "the worker keeps one cursor for its messaging",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.run",
        (
            'self.cursor.execute("LISTEN pulp_worker_wakeup")',
            'self.cursor.execute("LISTEN pulp_worker_cancel")',
            'self.cursor.execute("LISTEN pulp_worker_metrics_heartbeat")',
        ),
        "the worker subscribes through that cursor",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.notify_workers",
        ("self.cursor.execute(",),
        "the worker's own wake-ups go through that cursor",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.record_unblocked_waiting_tasks_metric",
        ("self.cursor.execute(", "NOTIFY pulp_worker_metrics_heartbeat"),
        "the metrics heartbeat goes through that cursor",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.sleep",
        ("select.select(",),
        "the idle worker waits in the module's select.select()",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker.supervise_task",
        ("select.select(",),
        "the busy worker waits in the module's select.select()",
    ),
    Seam(
        "pulpcore.tasking.worker:PulpcoreWorker._pg_notify_handler",
        ("notification.channel", "notification.payload"),
        "messages are mapped to flags from .channel and .payload",
    ),
)

#: Checked in the source text without importing it: importing the entry
#: point runs django.setup().
ENTRYPOINT = "pulpcore.tasking.entrypoint"


#: Every LISTEN/NOTIFY statement in pulpcore's tasking code, as
#: (module, enclosing function, statement with ``{}`` for an f-string's
#: fields): the integration translates exactly these, so one more (or one
#: fewer) is a seam that moved.
EXPECTED_SITES: Counter[tuple[str, str, str]] = Counter(
    {
        ("tasks", "wakeup_worker", "SELECT pg_notify('pulp_worker_wakeup', %s)"): 1,
        ("tasks", "cancel_task", "SELECT pg_notify('pulp_worker_cancel', %s)"): 1,
        (
            "worker",
            "PulpcoreWorker.notify_workers",
            "SELECT pg_notify('pulp_worker_wakeup', %s)",
        ): 1,
        (
            "worker",
            "PulpcoreWorker.record_unblocked_waiting_tasks_metric",
            "NOTIFY pulp_worker_metrics_heartbeat, '{}'",
        ): 1,
        ("worker", "PulpcoreWorker.run", "LISTEN pulp_worker_cancel"): 1,
        ("worker", "PulpcoreWorker.run", "LISTEN pulp_worker_metrics_heartbeat"): 1,
        ("worker", "PulpcoreWorker.run", "LISTEN pulp_worker_wakeup"): 1,
        ("worker", "PulpcoreWorker.run", "UNLISTEN pulp_worker_cancel"): 1,
        ("worker", "PulpcoreWorker.run", "UNLISTEN pulp_worker_metrics_heartbeat"): 1,
        ("worker", "PulpcoreWorker.run", "UNLISTEN pulp_worker_wakeup"): 1,
    }
)
#: A string that is a pub/sub statement (not a docstring that mentions one).
_STATEMENT = re.compile(r"\s*(?:SELECT\s+pg_notify\s*\(|NOTIFY\s|(?:UN)?LISTEN\s)", re.IGNORECASE)
TASKING = "pulpcore.tasking"


def stock(obj: Any) -> Any:
    """pulpcore's own class behind an integrated subclass (the object itself otherwise).

    The check runs again in every ``pulpcore-manager`` command, after the
    integration has put its subclass in pulpcore's module: reading the
    subclass's methods would find our code, not pulpcore's.
    """
    from .worker import PubSubWorkerMixin

    if isinstance(obj, type) and issubclass(obj, PubSubWorkerMixin):
        return next(base for base in obj.__mro__ if not issubclass(base, PubSubWorkerMixin))
    return obj


def _source(where: str) -> str:
    module_name, _, qualname = where.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split(".") if qualname else ():
        obj = getattr(stock(obj), part)
    return inspect.getsource(stock(obj))


def _text(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(
            str(part.value) if isinstance(part, ast.Constant) else "{}" for part in node.values
        )
    return None


def pubsub_sites(directory: Path) -> Counter[tuple[str, str, str]]:
    """The LISTEN/NOTIFY statements in the ``.py`` files of ``directory``, read as source."""
    found: Counter[tuple[str, str, str]] = Counter()

    def visit(node: ast.AST, module: str, scope: tuple[str, ...]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, module, (*scope, child.name))
                continue
            text = _text(child)
            if text is not None and _STATEMENT.match(text):
                found[(module, ".".join(scope), text.strip())] += 1
            elif not isinstance(child, ast.JoinedStr):
                visit(child, module, scope)

    for path in sorted(directory.glob("*.py")):
        visit(ast.parse(path.read_text(encoding="utf-8")), path.stem, ())
    return found


def site_problems() -> list[str]:
    """A LISTEN/NOTIFY site pulpcore's tasking code added, or one it no longer has."""
    spec = importlib.util.find_spec(TASKING)
    if spec is None or not spec.submodule_search_locations:
        return [f"{TASKING} is missing"]
    found: Counter[tuple[str, str, str]] = Counter()
    for location in spec.submodule_search_locations:
        found += pubsub_sites(Path(location))
    problems = []
    for (module, scope, text), n in sorted((found - EXPECTED_SITES).items()):
        problems.append(
            f"{TASKING}.{module}:{scope or '<module>'} sends {text!r} ({n} new site(s)), "
            "which the integration does not carry"
        )
    for (module, scope, text), n in sorted((EXPECTED_SITES - found).items()):
        problems.append(f"{TASKING}.{module}:{scope} no longer sends {text!r} ({n} site(s) gone)")
    return problems


def wakeup_reason_problem() -> str | None:
    """A wake-up reason in ``pulpcore.constants`` the integration does not know."""
    try:
        constants = importlib.import_module("pulpcore.constants")
    except ImportError as exc:
        return f"pulpcore.constants cannot be read ({exc})"
    reasons = {
        value
        for name, value in vars(constants).items()
        if name.startswith("TASK_WAKEUP_") and isinstance(value, str)
    }
    if not reasons or reasons - WAKEUP_REASONS:
        return f"pulpcore's wake-up reasons are {sorted(reasons)}, not {sorted(WAKEUP_REASONS)}"
    return None


def _entrypoint_problem() -> str | None:
    spec = importlib.util.find_spec(ENTRYPOINT)
    if spec is None or spec.origin is None:
        return f"{ENTRYPOINT} is missing"
    with open(spec.origin, encoding="utf-8") as f:
        text = f.read()
    setup = text.find("django.setup()")
    imported = text.find("from pulpcore.tasking.worker import PulpcoreWorker")
    if setup < 0 or imported < setup:
        return (
            f"{ENTRYPOINT} no longer imports PulpcoreWorker after django.setup(), so "
            "pulpcore-worker would not run the integrated worker"
        )
    return None


#: pulpcore's own pub/sub interface (docs/upstream.md): its module and the setting naming its class.
PUBSUB_MODULE = f"{TASKING}.pubsub"
PUBSUB_SETTING = "TASKING_PUBSUB_BACKEND"
#: What that setting names unless an operator chose otherwise.
PUBSUB_DEFAULT = f"{PUBSUB_MODULE}.PostgresPubSub"


def has_pubsub_seam() -> bool:
    """Whether this pulpcore asks a pub/sub object for its messages (patched or upstream)."""
    from django.conf import settings

    return (
        importlib.util.find_spec(PUBSUB_MODULE) is not None
        and getattr(settings, PUBSUB_SETTING, None) is not None
    )


def pubsub_seam_problems() -> list[str]:
    """Whether the adapter still fits pulpcore's interface, and nothing goes around it."""
    from .seam import PubSubBackend

    problems = []
    module = importlib.import_module(PUBSUB_MODULE)
    base = getattr(module, "BasePubSubBackend", None)
    if base is None or not callable(getattr(module, "get_backend", None)):
        return [f"{PUBSUB_MODULE} no longer has BasePubSubBackend and get_backend()"]
    wanted = {name for name in dir(base) if not name.startswith("_")}
    if missing := sorted(wanted - set(dir(PubSubBackend))):
        problems.append(
            f"{PUBSUB_MODULE}.BasePubSubBackend asks for {missing}, which the "
            "adapter (contrib/pulpcore/seam.py) lacks"
        )
    spec = importlib.util.find_spec(TASKING)
    for location in (spec.submodule_search_locations or []) if spec else []:
        for (name, scope, text), n in sorted(pubsub_sites(Path(location)).items()):
            if name != PUBSUB_MODULE.rpartition(".")[2]:
                problems.append(
                    f"{TASKING}.{name}:{scope or '<module>'} sends {text!r} ({n} site(s)) "
                    f"around {PUBSUB_MODULE}"
                )
    return problems


def source_problems(seams: tuple[Seam, ...], read: Callable[[str], str] | None = None) -> list[str]:
    """Each of ``seams`` whose source (as ``read`` finds it) cannot be read or lacks a need."""
    read = read or _source
    problems = []
    for seam in seams:
        try:
            text = read(seam.where)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            problems.append(f"{seam.where} cannot be read ({exc}): {seam.why}")
            continue
        missing = [needle for needle in seam.needs if needle not in text]
        if missing:
            problems.append(f"{seam.where} no longer contains {missing}: {seam.why}")
    return problems


def seam_problems() -> list[str]:
    """Each seam that is not where the integration expects it, on pulpcore's own code."""
    if has_pubsub_seam():
        return pubsub_seam_problems()
    import select

    import django.db

    problems = source_problems(SEAMS)
    problems += site_problems()
    if problem := wakeup_reason_problem():
        problems.append(problem)
    tasks = importlib.import_module("pulpcore.tasking.tasks")
    worker = importlib.import_module("pulpcore.tasking.worker")
    from .publishers import NotifyingConnection
    from .worker import select_shim

    connection = getattr(tasks, "connection", None)
    if not (connection is django.db.connection or isinstance(connection, NotifyingConnection)):
        problems.append("pulpcore.tasking.tasks.connection is no longer django.db.connection")
    if getattr(worker, "select", None) not in (select, select_shim):
        problems.append("pulpcore.tasking.worker.select is no longer the select module")
    if problem := _entrypoint_problem():
        problems.append(problem)
    return problems
