"""One PNG with a panel per scenario, drawn from the JSON result alone (so it can be redrawn)."""

from __future__ import annotations

from typing import Any

from . import BenchError

COLOURS = {
    "postgres": "#336791",
    "redis": "#d82c20",
    "etcd": "#419eda",
    "nats": "#2ca02c",
    "natsjs": "#17becf",
    "relay": "#6a3d9a",
    "relay_direct": "#b15928",
    "zookeeper": "#d4a017",
    "memory": "#888888",
    "poll (Pulp)": "#e8a33d",
}


def _colour(name: str) -> str:
    return COLOURS.get(name, "#4c9a2a")


def pyplot() -> Any:
    """matplotlib's pyplot without a display, or an error that says how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise BenchError(
            f"--plot needs matplotlib ({exc}): pip install matplotlib, or pulp-pubsub[test]."
        ) from exc
    return plt


def save_plot(result: dict[str, Any], path: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    meta = result["meta"]
    fig.suptitle(
        f"pubsub_bench, N={meta['params']['subscribers']}, {meta['machine'].get('cpus')} CPUs "
        f"({meta['started']})",
        fontsize=12,
    )
    _latency(axes[0][0], result.get("latency") or {})
    _fanout_cdf(axes[0][1], result.get("fanout") or {}, result.get("poll"))
    _commit(axes[0][2], result.get("commit") or {})
    _sessions(axes[1][0], result.get("connections") or {}, result.get("poll"))
    _idle(axes[1][1], axes[1][2], result.get("idle") or {}, result.get("poll"))
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _empty(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _latency(ax: Any, data: dict[str, Any]) -> None:
    title = "1. Round trip, layer vs raw client (ms)"
    if not data:
        return _empty(ax, title)
    names = list(data)
    for offset, kind, hatch in ((-0.2, "layer", ""), (0.2, "raw", "//")):
        xs = [i + offset for i, b in enumerate(names) if kind in data[b]]
        p50 = [data[b][kind]["p50"] for b in names if kind in data[b]]
        p99 = [data[b][kind]["p99"] for b in names if kind in data[b]]
        colours = [_colour(b) for b in names if kind in data[b]]
        ax.bar(xs, p50, 0.38, color=colours, hatch=hatch, edgecolor="black", label=f"{kind} p50")
        ax.scatter(
            xs,
            p99,
            marker="_",
            s=300,
            color="black",
            label="p99" if kind == "layer" and xs else None,
        )
    for i, b in enumerate(names):
        if data[b].get("ratio_p50"):
            ax.annotate(
                f"layer/raw {data[b]['ratio_p50']:.2f}x",
                (i, data[b]["layer"]["p50"]),
                ha="center",
                va="bottom",
                textcoords="offset points",
                xytext=(0, 4),
                fontsize=9,
            )
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.legend(fontsize=8)


def _fanout_cdf(ax: Any, data: dict[str, Any], poll: dict[str, Any] | None) -> None:
    title = "2. Wake-up latency of each subscriber (CDF)"
    curves = [(b, r["per_subscriber_cdf"]) for b, r in data.items()]
    if poll:
        curves.append(("poll (Pulp)", poll["per_worker_cdf"]))
    curves = [(b, c) for b, c in curves if c]
    if not curves:
        return _empty(ax, title)
    for name, cdf in curves:
        ax.plot(
            [max(v, 1e-3) for v in cdf],
            [i / (len(cdf) - 1) for i in range(len(cdf))],
            label=name,
            color=_colour(name),
            linewidth=2,
        )
    ax.set_xscale("log")
    ax.set_xlabel("ms after publish (log)")
    ax.set_ylabel("fraction of subscribers")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _commit(ax: Any, data: dict[str, Any]) -> None:
    title = "5. Commits/s (INSERT + wake-up) vs idle subscribers"
    if not data:
        return _empty(ax, title)
    for name, r in data.items():
        xs = [row["subscribers"] for row in r["levels"]]
        ax.plot(
            xs,
            [row["commits_per_s"] for row in r["levels"]],
            "o-",
            color=_colour(name),
            label=f"{name}, with publish",
        )
        ax.plot(
            xs,
            [row["plain_commits_per_s"] for row in r["levels"]],
            "o:",
            color=_colour(name),
            alpha=0.6,
            label=f"{name}, INSERT only",
        )
    ax.set_xlabel("idle subscribers")
    ax.set_ylabel("commits/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _bars(ax: Any, names: list[str], values: list[float], title: str, ylabel: str) -> None:
    if not names:
        return _empty(ax, title)
    bars = ax.bar(names, values, color=[_colour(n) for n in names], edgecolor="black")
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _sessions(ax: Any, data: dict[str, Any], poll: dict[str, Any] | None) -> None:
    names = list(data)
    values = [data[b]["pg_sessions"] for b in names]
    if poll:
        names.append("poll (Pulp)")
        values.append(poll["pg_sessions"])
    _bars(ax, names, values, "3. PostgreSQL sessions held by N idle subscribers", "sessions")


def _idle(cpu_ax: Any, db_ax: Any, data: dict[str, Any], poll: dict[str, Any] | None) -> None:
    rows = list(data.items())
    if poll:
        rows.append(("poll (Pulp)", poll["idle"]))
    names = [name for name, _ in rows]
    title = "4. CPU while N subscribers are idle (% of one core)"
    if not rows:
        _empty(cpu_ax, title)
    else:
        mine = [r["cpu_pct_of_core"] for _, r in rows]
        servers = [sum(r.get("server_cpu_pct", {}).values()) for _, r in rows]
        xs = range(len(rows))
        colours = [_colour(n) for n in names]
        a = cpu_ax.bar(
            [x - 0.2 for x in xs],
            mine,
            0.38,
            color=colours,
            edgecolor="black",
            label="the subscribers",
        )
        b = cpu_ax.bar(
            [x + 0.2 for x in xs],
            servers,
            0.38,
            color=colours,
            edgecolor="black",
            hatch="//",
            label="their servers",
        )
        for bars, values in ((a, mine), (b, servers)):
            cpu_ax.bar_label(bars, labels=[f"{v:.2g}" for v in values], fontsize=8)
        cpu_ax.set_xticks(list(xs), names)
        cpu_ax.set_ylabel("% of one core")
        cpu_ax.set_title(title)
        cpu_ax.legend(fontsize=8)
    xact = [r["pg_xact_per_s"] for _, r in rows]
    _bars(db_ax, names, xact, "4/6. Database transactions/s while idle", "transactions/s")
