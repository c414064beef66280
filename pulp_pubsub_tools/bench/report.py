"""What a person reads: the tables, the targets of the issue, and the same in Markdown."""

from __future__ import annotations

from typing import Any

from .stats import ratio

#: The issue's targets, as ratios from one run.
LATENCY_RATIO = 1.5
IDLE_CPU_PCT = 1.0
POLL_RATIO = 100.0


def _target(target: str, backend: str, measured: str, met: bool | None) -> dict:
    return {"target": target, "backend": backend, "measured": measured, "met": met}


#: The relay in pg_notify mode: commits/s at N subscribers within this factor of 0.
RELAY_NOTIFY_RATIO = 1.5
#: Redis commits with a wake-up per transaction, as a share of those without.
WAKEUP_COMMIT_SHARE = 0.9


def _direct_target(top: dict[str, Any], redis_top: dict[str, Any]) -> dict[str, Any]:
    """Direct publishing against Redis at the top level.

    Judged by each backend's commits/s with a wake-up as a share of its own without
    one (``share``), measured in turn seconds apart: the two backends run minutes
    apart, and the plain rates of the very same writers differ between those runs
    by as much as the two backends could. A result from before ``share`` existed
    is judged by the raw rates.
    """
    raw = f"{top['commits_per_s']:.0f}/s vs {redis_top['commits_per_s']:.0f}/s"
    mine, theirs = top.get("share"), redis_top.get("share")
    if mine is None or theirs is None:
        measured, met = raw, top["commits_per_s"] >= redis_top["commits_per_s"]
    else:
        measured, met = f"{mine:.1%} vs {theirs:.1%} of without a wake-up ({raw})", mine >= theirs
    return _target(
        f"relay (direct): commits/s at {top['subscribers']} subscribers >= the Redis backend's",
        "relay_direct",
        measured,
        met,
    )


def _cpu_added(row: dict[str, Any]) -> float | None:
    """CPU per commit a wake-up adds: writers and every throwaway server, with less without."""
    yes, no = row.get("cpu_us_per_commit"), row.get("plain_cpu_us_per_commit")
    if not yes or not no or set(yes) != set(no):
        return None
    return sum(yes.values()) - sum(no.values())


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for backend, r in result.get("latency", {}).items():
        if r.get("ratio_p50") is not None:
            out.append(
                _target(
                    f"layer round trip <= {LATENCY_RATIO}x raw client (p50)",
                    backend,
                    f"{r['layer']['p50']:.3f} ms vs {r['raw']['p50']:.3f} ms "
                    f"= {r['ratio_p50']:.2f}x",
                    r["ratio_p50"] <= LATENCY_RATIO,
                )
            )
    for backend, r in result.get("connections", {}).items():
        # A relay holds one session of its own, however many subscribers it serves.
        base = backend.partition("+")[0]  # a variant (redis+listener-reads) holds as its backend
        want = {"postgres": r["subscribers"], "relay": 1, "relay_direct": 1}.get(base, 0)
        out.append(
            _target(
                f"PostgreSQL sessions held for wake-ups by N idle subscribers = {want}",
                backend,
                f"{r['pg_sessions']} sessions for {r['subscribers']} subscribers",
                r["pg_sessions"] == want,
            )
        )
    for backend, r in result.get("idle", {}).items():
        out.append(
            _target(
                f"N idle subscribers use < {IDLE_CPU_PCT}% of one core in total",
                backend,
                f"{r['cpu_pct_of_core']:.3f}% ({r['cpu_s']:.3f} CPU s in {r['window_s']:.0f} s, "
                f"{r['subscribers']} subscribers)",
                r["cpu_pct_of_core"] < IDLE_CPU_PCT,
            )
        )
        out.append(
            _target(
                "N idle subscribers add no database transactions",
                backend,
                f"{r['pg_xact_per_s']:.2f} transactions/s "
                f"({r['pg_xacts']} in {r['window_s']:.0f} s)",
                r["pg_xacts"] == 0,
            )
        )
    commits = result.get("commit", {})
    if "redis" in commits and "postgres" in commits:
        redis_top, pg_top = commits["redis"]["levels"][-1], commits["postgres"]["levels"][-1]
        factor = ratio(redis_top["commits_per_s"], pg_top["commits_per_s"])
        out.append(
            _target(
                f"with {pg_top['subscribers']} idle subscribers, Redis backend commits faster "
                "than PostgreSQL backend",
                "redis/postgres",
                f"{redis_top['commits_per_s']:.0f}/s vs {pg_top['commits_per_s']:.0f}/s "
                f"= {factor:.2f}x"
                if factor
                else "-",
                bool(factor and factor > 1),
            )
        )
    if "redis" in commits:
        # Publishing after commit must cost commits little (issue: at least 90% of without).
        levels = commits["redis"]["levels"]
        shares = [ratio(r["commits_per_s"], r["plain_commits_per_s"]) or 0.0 for r in levels]
        together = ratio(
            sum(r["commits_per_s"] for r in levels), sum(r["plain_commits_per_s"] for r in levels)
        )
        out.append(
            _target(
                f"Redis: commits/s with a wake-up >= {WAKEUP_COMMIT_SHARE:.0%} of without "
                "(all subscriber levels together)",
                "redis",
                f"{together:.0%} ({min(shares):.0%} to {max(shares):.0%} by level)"
                if together
                else "-",
                bool(together and together >= WAKEUP_COMMIT_SHARE),
            )
        )
    for mode, goal in (("relay", "pg_notify"), ("relay_direct", "direct")):
        if mode not in commits:
            continue
        levels = commits[mode]["levels"]
        top, bottom = levels[-1], levels[0]
        if goal == "pg_notify":
            # NOTIFY's lock costs per listening session: one relay instead of N.
            factor = ratio(bottom["commits_per_s"], top["commits_per_s"])
            out.append(
                _target(
                    f"relay (pg_notify): commits/s at {top['subscribers']} subscribers within "
                    f"{RELAY_NOTIFY_RATIO:g}x of 0",
                    mode,
                    f"{top['commits_per_s']:.0f}/s vs {bottom['commits_per_s']:.0f}/s"
                    + (f" = {factor:.2f}x" if factor else ""),
                    bool(factor and factor <= RELAY_NOTIFY_RATIO),
                )
            )
        elif "redis" in commits:
            out.append(_direct_target(top, commits["redis"]["levels"][-1]))
    poll = result.get("poll")
    if poll:
        base = poll["per_worker"].get("p50")
        for backend, r in result.get("fanout", {}).items():
            mine = r["per_subscriber"].get("p50")
            factor = ratio(base, mine)
            out.append(
                _target(
                    f"wake-up latency at N={r['subscribers']} beats the poll baseline by >= "
                    f"{POLL_RATIO:g}x (p50 per subscriber)",
                    backend,
                    f"{mine:.2f} ms vs {base:.1f} ms = {factor:.0f}x" if factor else "-",
                    bool(factor and factor >= POLL_RATIO),
                )
            )
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # Milliseconds want three decimals below one, rates none in the thousands.
        size = abs(value)
        return f"{value:,.{3 if size < 1 else digits if size < 1000 else 0}f}"
    return str(value)


def table(headers: list[str], rows: list[list[Any]], markdown: bool = False) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    out = [line, "  ".join("-" * w for w in widths)]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]
    out += [
        "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(row, widths, numeric, strict=True)
        ).rstrip()
        for row in cells
    ]
    return "\n".join(out)


def sections(result: dict[str, Any], markdown: bool = False) -> list[tuple[str, str]]:
    """(title, table) for each scenario that ran."""
    out = []
    poll = result.get("poll")
    if result.get("latency"):
        rows = [
            [
                b,
                r["layer"].get("p50"),
                r["layer"].get("p99"),
                r.get("raw", {}).get("p50"),
                r.get("raw", {}).get("p99"),
                r.get("ratio_p50"),
                r["layer"]["lost"] + r.get("raw", {}).get("lost", 0),
                r.get("raw_client"),
            ]
            for b, r in result["latency"].items()
        ]
        headers = [
            "backend",
            "layer p50",
            "layer p99",
            "raw p50",
            "raw p99",
            "layer/raw p50",
            "lost",
            "raw client",
        ]
        out.append(("1. Round trip between two processes (ms)", table(headers, rows, markdown)))
    if result.get("fanout") or poll:
        rows = [
            [
                b,
                r["subscribers"],
                r["last"].get("p50"),
                r["last"].get("p99"),
                r["per_subscriber"].get("p50"),
                r["per_subscriber"].get("p99"),
                r["first"].get("p50"),
                r["lost"],
                r.get("wakeups_per_message"),
            ]
            for b, r in result.get("fanout", {}).items()
        ]
        rows += [
            [
                f"{b}: raw ({r.get('raw_client')})",
                r["subscribers"],
                r["raw"]["last"].get("p50"),
                r["raw"]["last"].get("p99"),
                r["raw"]["per_subscriber"].get("p50"),
                r["raw"]["per_subscriber"].get("p99"),
                None,
                r["raw"]["lost"],
                r["raw"].get("wakeups_per_message"),
            ]
            for b, r in result.get("fanout", {}).items()
            if r.get("raw")
        ]
        if poll:
            rows.append(
                [
                    "poll (Pulp)",
                    poll["workers"],
                    poll["last"].get("p50"),
                    poll["last"].get("p99"),
                    poll["per_worker"].get("p50"),
                    poll["per_worker"].get("p99"),
                    poll["first"].get("p50"),
                    poll["lost"],
                    None,
                ]
            )
        headers = [
            "backend",
            "N",
            "last p50",
            "last p99",
            "each p50",
            "each p99",
            "first p50",
            "lost",
            "wake-ups/msg",
        ]
        out.append(
            (
                "2. One publish reaching N subscribers (ms after publish; wake-ups: a "
                "subscriber process's voluntary context switches per message, median)",
                table(headers, rows, markdown),
            )
        )
    if result.get("targeted"):
        rows = [
            [
                f"{b} {mode}"
                + (" (fallback)" if mode == "targeted" and r["delivery"] != mode else ""),
                r["subscribers"],
                r[mode]["deliveries_per_message"],
                r[mode]["messages_handled_per_subscriber"],
                r[mode]["most_handled_by_one"],
                r[mode]["first"].get("p50"),
                r[mode]["first"].get("p99"),
                r[mode]["lost"],
            ]
            for b, r in result["targeted"].items()
            for mode in ("targeted", "broadcast")
        ]
        headers = [
            "backend",
            "N",
            "receivers/msg",
            "handled/subscriber",
            "most by one",
            "first p50",
            "first p99",
            "lost",
        ]
        rounds = next(iter(result["targeted"].values()))["rounds"]
        out.append(
            (
                f"2b. Targeted (work-queue) against broadcast, {rounds} messages "
                "(ms after publish)",
                table(headers, rows, markdown),
            )
        )
    if result.get("connections") or poll:
        rows = [
            [b, r["subscribers"], r["pg_sessions"], r.get("redis_clients", r.get("etcd_watchers"))]
            for b, r in result.get("connections", {}).items()
        ]
        if poll:
            rows.append(["poll (Pulp)", poll["workers"], poll["pg_sessions"], None])
        headers = ["backend", "N", "PostgreSQL sessions", "Redis clients / etcd watchers"]
        out.append(("3. Connections held by N idle subscribers", table(headers, rows, markdown)))
    if result.get("idle") or poll:
        idle = list(result.get("idle", {}).items())
        if poll:
            idle.append(("poll (Pulp)", {**poll["idle"], "subscribers": poll["idle"]["agents"]}))
        rows = [
            [
                b,
                r["subscribers"],
                r["window_s"],
                r["cpu_s"],
                r["cpu_pct_of_core"],
                r["pg_xact_per_s"],
                r.get("server_cpu_pct", {}).get("postgres"),
                _own_server_cpu(r),
            ]
            for b, r in idle
        ]
        headers = [
            "backend",
            "N",
            "window s",
            "CPU s",
            "% of one core",
            "DB transactions/s",
            "PostgreSQL CPU %",
            "own server CPU %",
        ]
        out.append(("4. N idle subscribers", table(headers, rows, markdown)))
    if result.get("commit"):
        levels = next(iter(result["commit"].values()))["levels"]
        headers = ["backend", "publish"] + [f"{row['subscribers']} idle" for row in levels]
        rows = []
        for b, r in result["commit"].items():
            rows.append([b, "yes", *(row["commits_per_s"] for row in r["levels"])])
            rows.append([b, "no", *(row["plain_commits_per_s"] for row in r["levels"])])
            if any(row.get("share") is not None for row in r["levels"]):
                shares = (row.get("share") for row in r["levels"])
                rows.append([b, "yes ÷ no", *("-" if x is None else f"{x:.1%}" for x in shares)])
            added = [_cpu_added(row) for row in r["levels"]]
            if any(x is not None for x in added):
                cells = ("-" if x is None else f"{x:+.0f}" for x in added)
                rows.append([b, "CPU µs/commit, yes - no", *cells])
        first = next(iter(result["commit"].values()))
        title = (
            f"5. Commits/s of {first['writers']} writers (INSERT + wake-up per transaction), "
            "by idle subscribers"
        )
        out.append((title, table(headers, rows, markdown)))
    if result.get("targets"):
        rows = [
            [
                t["target"],
                t["backend"],
                t["measured"],
                "met" if t["met"] else "MISSED",
            ]
            for t in result["targets"]
        ]
        out.append(("Targets", table(["target", "backend", "measured", ""], rows, markdown)))
    return out


def render_text(result: dict[str, Any]) -> str:
    return as_text(sections(result), result["meta"])


def as_text(titled: list[tuple[str, str]], meta: dict[str, Any]) -> str:
    """Titled tables, then the machine and its load: the figures mean little without it."""
    parts = [f"{title}\n{body}" for title, body in titled]
    m = meta["machine"]
    parts.append(
        f"{m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), load {m['load_before']} before, "
        f"{meta.get('load_after')} after; {meta.get('duration_s')} s in all."
    )
    return "\n\n".join(parts)


def render_markdown(result: dict[str, Any], plot: str | None = None) -> str:
    meta, m = result["meta"], result["meta"]["machine"]
    head = [
        "```",
        meta["command"],
        "```",
        "",
        f"- machine: {m.get('cpus')} CPUs ({m.get('cpu_model', '?')}), "
        f"{m.get('memory_gb', '?')} GB, {m.get('platform')}",
        f"- software: Python {m.get('python')}, Django {m.get('django')}, "
        f"psycopg {m.get('psycopg', '-')}, redis-py {m.get('redis', '-')}, "
        f"PostgreSQL {meta.get('postgres_version', '-')}, Redis {meta.get('redis_version', '-')}",
        f"- run: {meta['started']}, {meta.get('duration_s')} s, load average "
        f"{m['load_before']} before and {meta.get('load_after')} after",
        "- parameters: " + ", ".join(f"{k}={v}" for k, v in meta["params"].items()),
    ]
    return as_markdown(head, sections(result, markdown=True), plot, "pubsub_bench results")


def as_markdown(head: list[str], titled: list[tuple[str, str]], plot: str | None, alt: str) -> str:
    """The run's head lines, each titled table in bold, then the plot."""
    parts = ["\n".join(head)]
    parts += [f"**{title}**\n\n{body}" for title, body in titled]
    if plot:
        parts.append(f"![{alt}]({plot})")
    return "\n\n".join(parts) + "\n"


START = "<!-- pubsub_bench results: start (regenerated by pubsub_bench --markdown) -->"
END = "<!-- pubsub_bench results: end -->"


def write_markdown(path: str, text: str, start: str = START, end: str = END) -> None:
    """Write ``text`` to ``path``; in a file that has the markers, only between them.

    So the results section of a hand-written page is regenerated by a run and
    the prose around it stays.
    """
    try:
        with open(path) as f:
            current = f.read()
    except FileNotFoundError:
        current = ""
    if start in current and end in current:
        head, _, rest = current.partition(start)
        _, _, tail = rest.partition(end)
        text = f"{head}{start}\n\n{text}\n{end}{tail}"
    with open(path, "w") as f:
        f.write(text)


def _own_server_cpu(row: dict[str, Any]) -> float | None:
    """CPU of the backend's own throwaway server (Redis, etcd), beside PostgreSQL's."""
    others = [v for k, v in row.get("server_cpu_pct", {}).items() if k != "postgres"]
    return others[0] if others else None
