"""Add the codec, downlink and publication sections to stored results without the search.

The full report takes about an hour; these sections need only FedBuff's fp32 runs at the
two chosen lrs and the target's synchronous runs, all pure functions of their tasks. So
:func:`extend` reads the choices from the stored summary, reruns just those runs (checking
that they reproduce the stored figures: otherwise the stored results come from other code
and only a full run is honest), runs the sections with the same code the full report uses
(:func:`.report.sections`), and replaces their records and summary keys. The Markdown is
rebuilt from the JSON alone, as the full report writes it; the plot is left as stored (its
curves are not in the JSON).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedbus.bench.convergence.report import FEDBUFF, Report, _record, _runner, sections
from fedbus.bench.convergence.setting import STANDARD
from fedbus.bench.convergence.study import Study, median

SECTION_RULES = ("time", "final", "publication")
"""Record rules a section may write (FedBuff plain): codec rows and publication rows."""


def load(path: str | os.PathLike[str]) -> Report:
    """A report from its ``--json`` list (records, then the summary); the grid table is
    rebuilt from the grid records as :func:`.report.run` builds it."""
    items = json.loads(Path(path).read_text())
    if not isinstance(items, list) or not items or not isinstance(items[-1], dict):
        raise ValueError("not a list of records ending with the summary")
    records, summary = items[:-1], items[-1]
    if not summary.get("summary"):
        raise ValueError("the last item is not the report's summary")
    lr_table: dict[str, dict[float, float | None]] = {}
    for r in records:
        if r["rule"] == "grid" and r["setting"] == summary["setting"]:
            ok = 2 * r["seeds_reaching_target"] > r["seeds"]
            col = lr_table.setdefault(f"{r['algorithm']}/{r['optimiser']}", {})
            col[r["value"]] = r["time_to_target_s"] if ok else None
    return Report(records, summary, {}, lr_table)


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def _check(stored: Report, std: Study, value: float, rule: str) -> None:
    """The rerun fp32 record must equal the stored one on the figures that set the rest."""
    old = next(
        r
        for r in stored.records
        if (r["setting"], r["algorithm"], r["optimiser"], r["rule"], r["value"])
        == (stored.summary["setting"], *FEDBUFF, rule, value)
        and (r["codec"], r["down_codec"]) == ("fp32", "fp32")
    )
    new = _record(std, FEDBUFF, value, std.traces[(*FEDBUFF, value)], rule, "fp32", "fp32")
    keys = ("plateau_accuracy", "final_accuracy", "time_to_target_s", "jobs", "uploads")
    diff = [k for k in keys if not _same(old[k], new[k])]
    if diff:
        raise RuntimeError(
            f"stored results are not reproduced by this code ({', '.join(diff)} of FedBuff at "
            f"{value:g}); rerun the full report"
        )


def extend(
    stored: Report, runner: Callable[..., Any], log: Callable[[str], None] = print
) -> Report:
    s = stored.summary
    if s.get("quick"):
        raise ValueError("stored results are a --quick run: extend the full report")
    setting = replace(STANDARD, duration_s=float(s["duration_s"]))
    std = Study(setting, tuple(range(int(s["seeds"]))), runner)
    chosen = s["chosen"]
    sync = chosen["sync_fedavg/plain"]["final"]
    t_fb, f_fb = chosen["fedbuff/plain"]["time"], chosen["fedbuff/plain"]["final"]
    log(f"convergence: rerunning the target (sync at {sync:g}) and FedBuff at {t_fb:g}, {f_fb:g}")
    std.ensure([("sync_fedavg", "plain", sync), (*FEDBUFF, t_fb), (*FEDBUFF, f_fb)])
    if not math.isclose(s["target_accuracy"], median(std.targets().values())):
        raise RuntimeError("stored target accuracy is not reproduced; rerun the full report")
    _check(stored, std, t_fb, "time")
    _check(stored, std, f_fb, "final")
    extra = sections(std, t_fb, f_fb, runner, log)

    def is_section(r: dict[str, Any]) -> bool:
        return (
            r["setting"] == s["setting"]
            and (r["algorithm"], r["optimiser"]) == FEDBUFF
            and r["rule"] in SECTION_RULES
            and (r["codec"], r["down_codec"]) != ("fp32", "fp32")
        ) or r["rule"] == "publication"

    records = [r for r in stored.records if not is_section(r)] + extra.records
    summary = {k: v for k, v in s.items() if k != "wall_s"}
    summary.update(extra.summary)
    summary["wall_s"] = s.get("wall_s")
    return Report(records, summary, {}, stored.lr_table)


def extend_with_pool(
    stored: Report, cache: str | None, workers: int = 0, log: Callable[[str], None] = print
) -> Report:
    """:func:`extend` with the full report's runner (``workers`` 0: up to 2 processes)."""
    if workers <= 0:
        workers = min(2, os.cpu_count() or 1)
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        return extend(stored, _runner(pool, cache), log)
    finally:
        if pool is not None:
            pool.shutdown()
