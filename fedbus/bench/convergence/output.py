"""The report as JSON, Markdown tables and one PNG."""

from __future__ import annotations

import math
import os
from typing import Any

from fedbus.bench.convergence.report import Report
from fedbus.bench.convergence.setting import ALGORITHMS, OPTIMISERS, grid

COLOURS = "tab10"
"""The one colour map: an algorithm keeps its colour in every panel and every plot."""


def algorithm_colours() -> dict[str, Any]:
    """Each algorithm's colour, the same in this report and in ``fedbus demo``'s plot."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap(COLOURS)
    return {a: cmap(i) for i, a in enumerate(ALGORITHMS)}


def to_json(report: Report) -> list[dict[str, Any]]:
    """The ``--json`` list: the records, then the one summary record (JSON-safe values)."""
    return [*report.records, _safe(report.summary)]


def _safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_safe(v) for v in x]
    return x


def _n(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _t(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.0f}"


def _choice(r: dict[str, Any] | None, metric: str) -> str:
    if r is None:
        return "none qualifies"
    return (
        f"{r['value']:g}: {_t(r['time_to_target_s'])} ({_t(r['time_to_target_min_s'])}-"
        f"{_t(r['time_to_target_max_s'])})"
    )


def markdown(report: Report) -> str:
    """README-ready tables: the choices, time to target against the grid, codecs, rows."""
    s = report.summary
    recs = [
        r
        for r in report.records
        if r["setting"] == s["setting"] and r["codec"] == "fp32" and r["down_codec"] == "fp32"
    ]
    by = {(r["algorithm"], r["optimiser"], r["rule"]): r for r in recs}
    out = [
        "| algorithm | optimiser | seeds | tuned on time: value, time to target s (min-max) "
        "| tuned on uploads: value, uploads to target | tuned on final accuracy: value, time "
        "to target s | plateau accuracy (time-tuned) |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in ALGORITHMS:
        for o in OPTIMISERS:
            t, u, f = (by.get((a, o, rule)) for rule in ("time", "uploads", "final"))
            if t is None and f is None:
                continue
            c = by.get((a, o, "confirmed"))
            seeds = str((t or f or {"seeds": 0})["seeds"])
            cells = [
                _choice(t, "time") + (f"; all seeds: {_choice(c, 'time')}" if c else ""),
                "-" if u is None else f"{u['value']:g}: {_n(u['uploads_to_target'], '.0f')}",
                _choice(f, "time"),
                "-" if t is None else f"{t['plateau_accuracy']:.4f}",
            ]
            out.append(f"| {a} | {o} | {seeds} | " + " | ".join(cells) + " |")
    out += ["", lr_table_markdown(report), "", codec_markdown(report)]
    if "total_bytes_ratio" in s:
        out += ["", totals_markdown(s)]
    if "publication" in s:
        out += ["", publication_markdown(s["publication"])]
    edges = s["chosen_on_grid_edge"] + s.get("chosen_on_grid_edge_rows", [])
    edge_note = f" (on an edge or none: {', '.join(edges)})" if edges else ""
    compares = " vs ".join(s["fedbuff_speedup_compares"])
    rows = rows_markdown(report)
    if rows:
        out += ["", rows]
    out += [
        "",
        f"Target accuracy {s['target_accuracy']:.4f} ({s['target_fraction']} x the plateau of "
        f"{s['target_set_by']}; largest per-seed rise over the last 20%: "
        f"{100 * s['sync_plateau_change_max']:+.2f} points, plateaued: {s['sync_plateaued']}). "
        f"{s['seeds']} seeds, {s['duration_s']:g} simulated seconds per run, crossing = "
        f"{s['crossing_window']}-evaluation trailing mean. Optima inside the grid: "
        f"{s['optima_inside_grid']}{edge_note}. Medians of per-seed ratios, each algorithm "
        f"tuned on the metric: FedBuff speed-up vs synchronous FedAvg "
        f"{_n(s['fedbuff_speedup_vs_sync'], '.2f')}x (min seed "
        f"{_n(s['fedbuff_speedup_min_seed'], '.2f')}x; {compares}); "
        f"plain vs plain {_n(s['fedbuff_speedup_vs_sync_plain'], '.2f')}x; both tuned on final "
        f"accuracy instead {_n(s['fedbuff_speedup_vs_sync_final_tuned'], '.2f')}x. Uploads to "
        f"target: sync / FedBuff {_n(s['fedbuff_uploads_vs_sync'], '.2f')}x, FedAsync / FedBuff "
        f"{_n(s['fedbuff_uploads_vs_fedasync'], '.2f')}x.",
    ]
    return "\n".join(out)


def lr_table_markdown(report: Report) -> str:
    """Median time to target (s) against the grid value, one table per grid; '-' not run,
    'x' not reached (plateau below the target, or not plateaued) in most seeds."""
    tables = []
    titles = (
        "server lr (momentum: effective lr)",
        "FedAsync alpha (momentum: effective alpha)",
        "Adam lr",
    )
    for title in titles:
        cols = [c for c in report.lr_table if titles[_grid_kind(c)] == title]
        if not cols:
            continue
        out = [f"| {title} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        values = sorted({v for c in cols for v in report.lr_table[c]})
        for v in values:
            cells = []
            for c in cols:
                col = report.lr_table[c]
                x = col.get(v, "-")
                cells.append("x" if x is None else x if isinstance(x, str) else f"{x:.0f}")
            out.append(f"| {v:g} | " + " | ".join(cells) + " |")
        tables.append("\n".join(out))
    return "\n\n".join(tables)


def _grid_kind(column: str) -> int:
    algorithm, optimiser = column.split("/")
    if optimiser == "adam":
        return 2
    return 1 if algorithm == "fedasync" else 0


def codec_markdown(report: Report) -> str:
    out = [
        "| algorithm | rule | value | codec up / down | plateau accuracy | time to target, s "
        "| payload bytes per job, up + down | message bytes per job, up + down |",
        "|---|---|---|---|---|---|---|---|",
    ]
    s = report.summary
    for r in report.records:
        if r["setting"] != s["setting"] or r["optimiser"] != "plain" or r["rule"] == "grid":
            continue
        if r["rule"] in ("uploads", "publication"):
            continue
        jobs = max(1, r["jobs"])
        out.append(
            f"| {r['algorithm']} | {r['rule']} | {r['value']:g} | {r['codec']} / "
            f"{r['down_codec']} | {r['plateau_accuracy']:.4f} | {_t(r['time_to_target_s'])} | "
            f"{r['bytes_uploaded'] / jobs:.0f} + {r['downlink_bytes'] / jobs:.0f} | "
            f"{r['message_bytes_uploaded'] / jobs:.0f} + "
            f"{r['downlink_message_bytes'] / jobs:.0f} |"
        )
    return "\n".join(out)


def totals_markdown(s: dict[str, Any]) -> str:
    """Both ways per device job, and where a message's bytes go."""
    lines = [
        f"Both ways per device job (FedBuff at the time-chosen lr, payloads): fp32 up and down "
        f"{s['total_bytes_per_job_fp32']:.0f} bytes; {s['total_bytes_config']} "
        f"{s['total_bytes_per_job_compressed']:.0f}: total_bytes_ratio "
        f"{s['total_bytes_ratio']:.2f}x, whole messages {s['total_message_bytes_ratio']:.2f}x "
        f"({s['total_message_bytes_per_job_fp32']:.0f} against "
        f"{s['total_message_bytes_per_job_compressed']:.0f}), plateau drop "
        f"{100 * s['total_bytes_accuracy_drop']:.2f} point (accuracy-chosen lr: "
        f"{100 * s['total_bytes_accuracy_drop_accuracy_chosen']:.2f}); the int4 model alone "
        f"{100 * s['int4_download_accuracy_drop']:.2f} point. With an int8 model down instead: "
        f"{s['total_bytes_ratio_down_int8']:.2f}x payload, "
        f"{s['total_message_bytes_ratio_down_int8']:.2f}x messages, drop "
        f"{100 * s['total_bytes_accuracy_drop_down_int8']:.2f} point."
    ]
    split = s.get("envelope_overhead_split")
    if split:
        lines += [
            "",
            "| message | bytes | payload | overhead | field names | largest field values |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in split.items():
            top = ", ".join(f"{k} {v}" for k, v in list(m["value_overhead_bytes"].items())[:5])
            lines.append(
                f"| {name} | {m['message_bytes']} | {m['payload_bytes']} | "
                f"{m['overhead_bytes']} | {m['field_name_bytes']} | {top} |"
            )
    return "\n".join(lines)


def publication_markdown(p: dict[str, Any]) -> str:
    """Staleness and convergence against ``model_publish_interval_s``."""
    bins = " / ".join(next(iter(p["intervals"].values()))["staleness_histogram"])
    out = [
        f"Coalesced publication ({p['algorithm']} at {p['value']:g}, chosen on "
        f"{p['chosen_on']} with every version published, not re-tuned; medians "
        "over seeds, ratios paired against interval 0):",
        "",
        f"| interval s | staleness p50 / p90 / p99 / max (mean) | uploads at staleness {bins} "
        "| plateau (drop vs 0, points) | final "
        "| time to target s (min-max) | vs every version | publications per device job |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p["intervals"].values():
        h = r["staleness_histogram"]
        hist = " / ".join(f"{100 * v:.0f}%" for v in h.values())
        out.append(
            f"| {r['publish_interval_s']:g} | {r['staleness_p50']:.0f} / {r['staleness_p90']:.0f}"
            f" / {r['staleness_p99']:.0f} / {r['staleness_max']:.0f} "
            f"({r['staleness_mean']:.1f}) | {hist} | {r['plateau_accuracy']:.4f} "
            f"({100 * r['plateau_drop_vs_every_version']:.2f}) | {r['final_accuracy']:.4f} | "
            f"{_t(r['time_to_target_s'])} ({_t(r['time_to_target_min_s'])}-"
            f"{_t(r['time_to_target_max_s'])}) | "
            f"{_x(r['time_to_target_vs_every_version'])} | "
            f"{r['publications_per_device_job']:.1f} |"
        )
    other = p.get("default_interval_other_lrs", {})
    if other:
        cells = "; ".join(
            f"lr {r['value']:g}: {_t(r['time_to_target_s'])} s "
            f"({_x(r['time_to_target_vs_every_version'])} of every version at "
            f"{p['value']:g}), plateau {r['plateau_accuracy']:.4f}"
            for r in other.values()
        )
        out += ["", f"At the default interval with the lr's grid neighbours instead: {cells}."]
    return "\n".join(out)


def rows_markdown(report: Report) -> str:
    s = report.summary
    rows = [s[k] for k in s if k.endswith("_row")] + list(s.get("sensitivity", []))
    if not rows:
        return ""
    out = [
        "| row | time to target, s: sync / FedBuff / FedAsync | FedBuff speed-up vs sync "
        "(min seed) | uploads, sync / FedBuff | fastest |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["time_to_target_s"]
        times = " / ".join(_t(t[a]) if a in t else "not run" for a in ALGORITHMS)
        out.append(
            f"| {r['setting']} | {times} | {_n(r['fedbuff_speedup_vs_sync'], '.2f')}x "
            f"({_n(r['fedbuff_speedup_min_seed'], '.2f')}x) | "
            f"{_n(r['fedbuff_uploads_vs_sync'], '.2f')}x | {r['fastest']} |"
        )
        if "worst_class_accuracy" in r:
            w = r["worst_class_accuracy"]
            out.append(
                "| (worst-class accuracy) | "
                + " / ".join(_n(w.get(a), ".3f") for a in ALGORITHMS)
                + " | | | |"
            )
    return "\n".join(out)


def plot(report: Report, path: str | os.PathLike[str]) -> None:
    """PNG: time to target against the grid value, and the median accuracy curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = algorithm_colours()
    dashes = {"plain": "-", "momentum": "--", "adam": ":"}
    fig, (ax_lr, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, col in report.lr_table.items():
        algorithm, optimiser = name.split("/")
        pts = sorted((v, t) for v, t in col.items() if t is not None)
        if not pts or optimiser not in OPTIMISERS:
            continue
        g = grid(algorithm, optimiser)
        # Adam's grid is in other units: plot it against its index on its own grid
        xs = [v if optimiser != "adam" else 2.0 ** (g.index(v) - 1) for v, _ in pts]
        ax_lr.plot(
            xs,
            [t for _, t in pts],
            marker="o",
            ms=3,
            ls=dashes[optimiser],
            color=colour[algorithm],
            label=name,
        )
    ax_lr.set_xscale("log")
    ax_lr.set_yscale("log")
    ax_lr.set_xlabel("server lr / FedAsync alpha (Adam: grid position)")
    ax_lr.set_ylabel("median time to target (s)")
    ax_lr.grid(alpha=0.3)
    if ax_lr.get_legend_handles_labels()[0]:
        ax_lr.legend(fontsize=6, ncol=2)
    for key, c in report.curves.items():
        parts = key.split("/")
        algorithm, optimiser, rule = parts[0], parts[1], parts[2]
        if rule != "time":
            continue
        ls = ":" if len(parts) > 3 else dashes[optimiser]
        ax_t.plot(
            c["time_s"],
            c["accuracy"],
            ls=ls,
            lw=1.1,
            color=colour[algorithm],
            alpha=0.6 if len(parts) > 3 else 1.0,
            label=key,
        )
    target = report.summary["target_accuracy"]
    ax_t.axhline(target, color="grey", lw=0.8, ls="-.", label="target")
    ax_t.set_ylim(max(0.0, target - 0.15), 1.0)
    ax_t.set_xlabel("simulated time (s)")
    ax_t.set_ylabel("test accuracy (median over seeds)")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=6, ncol=2)
    s = report.summary
    fig.suptitle(
        f"digits, {s['devices']} devices, concurrency {s['concurrency']}, sigma {s['sigma']:g}, "
        f"Dirichlet {s['dirichlet_alpha']:g}, {s['seeds']} seeds; each chosen on time to target"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
