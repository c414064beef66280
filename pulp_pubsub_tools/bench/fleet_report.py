"""What a person reads of a ``fleet`` run: the table, the goals, the projection, the plot."""

from __future__ import annotations

import math
from typing import Any

from .plot import _colour, pyplot
from .report import as_markdown, as_text, table

#: The goals of the fleet issue, as ratios from one run.
FIRST_RATIO = 1.5
FLAT = 1.2
BARE_RATIO = 1.2
#: The fleet the projection reaches for.
PROJECT_TO = 10_000

#: What each table column is: (header, path into a level, digits of precision is the table's).
COLUMNS: list[tuple[str, tuple[str, ...]]] = [
    ("targeted first p50 ms", ("targeted", "first", "p50")),
    ("targeted first p99 ms", ("targeted", "first", "p99")),
    ("receivers/msg", ("targeted", "receivers_per_message")),
    ("server CPU µs/targeted publish", ("publish_cpu", "server_cpu_us_per_publish")),
    ("broadcast each p50 ms", ("broadcast", "per_subscriber", "p50")),
    ("bare each p50 ms", ("raw", "per_subscriber", "p50")),
    ("broadcast last p50 ms", ("broadcast", "last", "p50")),
    ("bare last p50 ms", ("raw", "last", "p50")),
    ("idle server CPU %", ("idle", "server_cpu_pct")),
    ("server MB", ("idle", "server_pss_mb")),
    ("idle CPU µs/s per subscriber", ("idle", "cpu_us_per_s_per_subscriber")),
    ("MB per subscriber", ("idle", "pss_kb_per_subscriber")),
    ("probes/s", ("idle", "probes_per_s")),
    ("probes/subscriber/min", ("idle", "probes_per_subscriber_per_min")),
]

#: Costs that must not grow with N: (path, largest ratio top/smallest, goal).
GROWTH_GOALS: list[tuple[tuple[str, ...], float, str]] = [
    (
        ("targeted", "first", "p50"),
        FIRST_RATIO,
        f"targeted first receiver p50 at the top ≤ {FIRST_RATIO}x the smallest N",
    ),
    (
        ("publish_cpu", "server_cpu_us_per_publish"),
        FLAT,
        f"server CPU per targeted publish flat (≤ {FLAT}x)",
    ),
    (("idle", "cpu_us_per_s_per_subscriber"), FLAT, f"idle CPU per subscriber flat (≤ {FLAT}x)"),
    (
        ("idle", "probes_per_subscriber_per_min"),
        FLAT,
        f"probe traffic per subscriber flat (≤ {FLAT}x)",
    ),
]

#: What the projection extrapolates: (name, path, unit).
PROJECTED: list[tuple[str, tuple[str, ...], str]] = [
    ("server memory", ("idle", "server_pss_mb"), "MB"),
    ("idle server CPU", ("idle", "server_cpu_pct"), "% of a core"),
    ("server CPU per targeted publish", ("publish_cpu", "server_cpu_us_per_publish"), "µs"),
    ("broadcast last receiver p50", ("broadcast", "last", "p50"), "ms"),
    ("memory per subscriber", ("idle", "pss_kb_per_subscriber"), "kB"),
]


def pick(level: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = level
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _value(level: dict[str, Any], path: tuple[str, ...]) -> Any:
    value = pick(level, path)
    if path == ("idle", "pss_kb_per_subscriber") and value is not None:
        return round(value / 1024, 2)
    return value


def connections(level: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in level["idle"]["connections"].items())


def slope(points: list[tuple[int, float]]) -> float | None:
    """The log-log slope between the first and the last point: 1 is linear in N, 0 flat."""
    usable = [(n, y) for n, y in points if y and y > 0]
    if len(usable) < 2:
        return None
    (n1, y1), (n2, y2) = usable[0], usable[-1]
    return math.log(y2 / y1) / math.log(n2 / n1)


def project(result: dict[str, Any]) -> dict[str, Any]:
    """Each cost at PROJECT_TO subscribers, along the slope measured from the smallest size
    to the largest one the backend held."""
    out: dict[str, Any] = {}
    for backend, r in result.get("fleet", {}).items():
        levels = r["levels"]
        if len(levels) < 2:
            continue
        rows = {}
        for name, path, unit in PROJECTED:
            points = [(lv["subscribers"], pick(lv, path)) for lv in levels]
            b = slope(points)
            n_top, y_top = points[-1]
            if b is None or not y_top:
                continue
            rows[name] = {
                "unit": unit,
                "slope": round(b, 2),
                "measured_top": y_top,
                "at": n_top,
                "projected": round(y_top * (PROJECT_TO / n_top) ** b, 3),
            }
        top = levels[-1]
        rows["connections"] = {
            kind: round(count * PROJECT_TO / top["subscribers"])
            for kind, count in top["idle"]["connections"].items()
        }
        out[backend] = rows
    return out


def _goal(goal: str, backend: str, measured: str, met: bool | None) -> dict[str, Any]:
    return {"goal": goal, "backend": backend, "measured": measured, "met": met}


#: The parts of a level that measure targeted delivery.
TARGETED_PARTS = ("targeted", "publish_cpu")


def fans_out(receivers_per_message: float | None) -> bool:
    """Whether "targeted" publishes reached more than one subscriber each: broadcasts."""
    return (receivers_per_message or 0) > 1.5


def evaluate_goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for backend, r in result.get("fleet", {}).items():
        levels = r["levels"]
        if not levels:
            out.append(_goal("any size", backend, r.get("stopped", {}).get("reason", "-"), False))
            continue
        low, high = levels[0], levels[-1]
        short = " (stopped early)" if "stopped" in r else ""

        broadcasts = fans_out(pick(low, ("targeted", "receivers_per_message")))
        for path, limit, goal in GROWTH_GOALS:
            if broadcasts and path[0] in TARGETED_PARTS:
                # A backend that cannot target broadcasts instead (and says so): its
                # "targeted" cost is a broadcast's, O(N) by nature, and no goal of targeting.
                out.append(_goal(goal, backend, "does not target: broadcasts to all N", None))
                continue
            compare(out, backend, low, high, short, path, limit, goal)
        for level in (low, high) if low is not high else (low,):
            for what, key in (("last", "ratio_last_p50"), ("each", "ratio_each_p50")):
                factor = level.get(key)
                if factor is None:
                    continue
                path = ("last", "p50") if what == "last" else ("per_subscriber", "p50")
                measured = (
                    f"{_num(pick(level['broadcast'], path))} vs "
                    f"{_num(pick(level['raw'], path))} ms = {factor:.2f}x"
                )
                out.append(
                    _goal(
                        f"broadcast {what} receiver p50 ≤ {BARE_RATIO}x bare at "
                        f"N={level['subscribers']}",
                        backend,
                        measured,
                        factor <= BARE_RATIO,
                    )
                )
    return out


def compare(
    out: list[dict[str, Any]],
    backend: str,
    low: dict[str, Any],
    high: dict[str, Any],
    short: str,
    path: tuple[str, ...],
    limit: float,
    goal: str,
) -> None:
    """A goal on how a cost grows from the smallest size to the largest."""
    a, b = pick(low, path), pick(high, path)
    factor = ratio_of(b, a)
    span = f"N={low['subscribers']} to {high['subscribers']}"
    measured = f"{_num(a)} -> {_num(b)} ({span}){short}" + (
        f" = {factor:.2f}x" if factor is not None else ""
    )
    met = None if factor is None or low is high else factor <= limit and not short
    out.append(_goal(goal, backend, measured, met))


def _last_line(text: str, limit: int = 240) -> str:
    """A traceback's last line says what went wrong: the JSON keeps the whole of it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= limit else last[: limit - 1] + "…"


def ratio_of(b: Any, a: Any) -> float | None:
    if not a or b is None:
        return None
    return b / a


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def sections(result: dict[str, Any], markdown: bool = False) -> list[tuple[str, str]]:
    out = []
    headers = ["backend", "N", *(h for h, _ in COLUMNS), "connections"]
    rows = []
    stops = []
    for backend, r in result.get("fleet", {}).items():
        for level in r["levels"]:
            rows.append(
                [
                    backend,
                    level["subscribers"],
                    *(_value(level, path) for _, path in COLUMNS),
                    connections(level),
                ]
            )
        if "stopped" in r:
            stops.append([backend, r["stopped"]["at"], _last_line(r["stopped"]["reason"])])
    if rows:
        out.append(("Fleet: each cost at each N", table(headers, rows, markdown)))
    if stops:
        out.append(("Where a backend stopped", table(["backend", "N", "why"], stops, markdown)))
    projection = result.get("projection") or {}
    if projection:
        prow = []
        for backend, rows_ in projection.items():
            for name, p in rows_.items():
                if name == "connections":
                    prow.append(
                        [backend, name, "-", "-", ", ".join(f"{k} {v}" for k, v in p.items())]
                    )
                else:
                    prow.append(
                        [
                            backend,
                            f"{name} ({p['unit']})",
                            p["slope"],
                            f"{_num(p['measured_top'])} at {p['at']}",
                            _num(p["projected"]),
                        ]
                    )
        out.append(
            (
                f"Projection to {PROJECT_TO:,} subscribers (log-log slope from the smallest N to "
                "the largest held)",
                table(
                    ["backend", "cost", "slope", "measured", f"at {PROJECT_TO:,}"], prow, markdown
                ),
            )
        )
    goals = result.get("goals") or []
    if goals:
        grow = [
            [
                g["goal"],
                g["backend"],
                g["measured"],
                {True: "met", False: "MISSED"}.get(g["met"], "-"),
            ]
            for g in goals
        ]
        out.append(("Goals", table(["goal", "backend", "measured", ""], grow, markdown)))
    return out


def render_text(result: dict[str, Any]) -> str:
    return as_text(sections(result), result["meta"])


def render_markdown(result: dict[str, Any], plot: str | None = None) -> str:
    meta, m = result["meta"], result["meta"]["machine"]
    head = [
        "```",
        meta["command"],
        "```",
        "",
        f"- machine: {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), "
        f"{m.get('memory_gb', '?')} GB, {m.get('platform')}; shared with other work "
        f"(load average {m['load_before']} before, {meta.get('load_after')} after)",
        f"- run: {meta['started']}, {meta.get('duration_s')} s",
        "- parameters: " + ", ".join(f"{k}={v}" for k, v in meta["params"].items()),
    ]
    return as_markdown(head, sections(result, markdown=True), plot, "pubsub_bench fleet")


START = "<!-- pubsub_bench fleet: start (regenerated by pubsub_bench fleet --markdown) -->"
END = "<!-- pubsub_bench fleet: end -->"

#: The plot's panels: (title, path, y label).
PANELS: list[tuple[str, tuple[str, ...], str]] = [
    ("targeted: first receiver p50", ("targeted", "first", "p50"), "ms"),
    ("server CPU per targeted publish", ("publish_cpu", "server_cpu_us_per_publish"), "µs"),
    ("broadcast: last receiver p50 (dashed: bare)", ("broadcast", "last", "p50"), "ms"),
    ("broadcast: each receiver p50 (dashed: bare)", ("broadcast", "per_subscriber", "p50"), "ms"),
    ("idle: server CPU", ("idle", "server_cpu_pct"), "% of one core"),
    ("idle: server memory (PSS)", ("idle", "server_pss_mb"), "MB"),
    ("idle: CPU per subscriber", ("idle", "cpu_us_per_s_per_subscriber"), "µs CPU per s"),
    ("idle: probes per subscriber", ("idle", "probes_per_subscriber_per_min"), "per minute"),
]
BARE: dict[tuple[str, ...], tuple[str, ...]] = {
    ("broadcast", "last", "p50"): ("raw", "last", "p50"),
    ("broadcast", "per_subscriber", "p50"): ("raw", "per_subscriber", "p50"),
}


def save_plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(20, 9))
    meta = result["meta"]
    fig.suptitle(
        f"pubsub_bench fleet: cost against N (log-log), {meta['machine'].get('cpus')} CPUs "
        f"shared with other work ({meta['started']})",
        fontsize=12,
    )
    for ax, (title, ypath, ylabel) in zip(axes.flat, PANELS, strict=True):
        drawn = False
        for backend, r in result.get("fleet", {}).items():
            for p, style in ((ypath, "o-"), (BARE.get(ypath), "s--")):
                if p is None:
                    continue
                pts = [
                    (lv["subscribers"], pick(lv, p))
                    for lv in r["levels"]
                    if pick(lv, p) is not None and pick(lv, p) > 0
                ]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    label = backend if style == "o-" else f"{backend} bare"
                    ax.plot(
                        xs,
                        ys,
                        style,
                        color=_colour(backend),
                        label=label,
                        alpha=1.0 if style == "o-" else 0.6,
                    )
                    drawn = True
        ax.set_title(title, fontsize=10)
        if drawn:
            ax.set_xscale("log")
            ax.set_yscale("log")
            sizes = meta["params"]["sizes"]
            ax.set_xticks(sizes, [f"{n:,}" for n in sizes])
            ax.minorticks_off()
            ax.set_xlabel("subscribers (N)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
