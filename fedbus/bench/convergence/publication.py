"""Coalesced model publication: what ``model_publish_interval_s`` costs in convergence.

The worker publishes the newest committed weights at most once per interval, so a device
starts its job from a version that may already be behind the server's, and its update's
staleness counts from that version. This section runs FedBuff (plain, at the lr chosen on
time with every version published) at each interval of
:data:`~.setting.PUBLISH_INTERVALS`, on the same seeds and hence the same fleet schedule,
and reports staleness, plateau and time to target against interval 0 (paired per seed).
The lr is not re-tuned per interval: the question is what the default costs a fleet tuned
without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedbus.bench.convergence import selection as sel
from fedbus.bench.convergence.setting import (
    DEFAULT_PUBLISH_INTERVAL,
    PUBLISH_INTERVALS,
    Task,
    Trace,
    grid,
)
from fedbus.bench.convergence.study import Runner, Study, finite, mean_tail, median, paired

SPEC = ("fedbuff", "plain")
QUANTILES = (0.5, 0.9, 0.99)
BINS = (0, 1, 2, 5, 10, 20, 50, 100)
"""Lower edges of the staleness histogram's bins (the last bin is open)."""


def runs(
    study: Study, value: float, runner: Runner, intervals: Sequence[float] = PUBLISH_INTERVALS
) -> dict[float, list[Trace]]:
    """All seeds at each interval; interval 0 is the study's own run (the same task)."""
    study.ensure([(*SPEC, value)])
    later = [i for i in intervals if i != 0]
    tasks = [
        Task(*SPEC, value, "fp32", seed, study.setting, publish_interval=i)
        for i in later
        for seed in study.seeds
    ]
    out = runner(tasks)
    n = len(study.seeds)
    found = {i: out[k * n : (k + 1) * n] for k, i in enumerate(later)}
    return {i: study.traces[(*SPEC, value)] if i == 0 else found[i] for i in intervals}


def retune_runs(study: Study, value: float, runner: Runner) -> dict[float, list[Trace]]:
    """All seeds at the default interval with the lr's grid neighbours."""
    others = sel.neighbours(grid(*SPEC), value)
    tasks = [
        Task(*SPEC, v, "fp32", seed, study.setting, publish_interval=DEFAULT_PUBLISH_INTERVAL)
        for v in others
        for seed in study.seeds
    ]
    out = runner(tasks)
    n = len(study.seeds)
    return {v: out[k * n : (k + 1) * n] for k, v in enumerate(others)}


def quantile(hist: np.ndarray, q: float) -> int:
    """The ``q`` quantile of the staleness whose counts are ``hist`` (lower: an observed
    value)."""
    cum = np.cumsum(hist)
    return int(np.searchsorted(cum, q * cum[-1], side="left"))


def histogram(hists: Sequence[np.ndarray]) -> dict[str, float]:
    """Fraction of all uploads (seeds pooled) per staleness bin."""
    pooled = np.zeros(max(h.size for h in hists), dtype=np.int64)
    for h in hists:
        pooled[: h.size] += h
    total = pooled.sum()
    out = {}
    for lo, hi in zip(BINS, (*BINS[1:], None), strict=True):
        name = f"{lo}" if hi == lo + 1 else f"{lo}+" if hi is None else f"{lo}-{hi - 1}"
        out[name] = float(pooled[lo:hi].sum() / total)
    return out


def staleness_stats(traces: Sequence[Trace]) -> dict[str, Any]:
    """Per-seed quantiles, mean and max (medians over seeds) and the pooled histogram."""
    hs = [t.staleness for t in traces]
    out: dict[str, Any] = {
        f"staleness_p{round(100 * q)}": median(quantile(h, q) for h in hs) for q in QUANTILES
    }
    out["staleness_mean"] = median(float(np.arange(h.size) @ h / h.sum()) for h in hs)
    out["staleness_max"] = median(float(h.size - 1) for h in hs)
    out["staleness_histogram"] = histogram(hs)
    return out


def summary(
    study: Study,
    value: float,
    found: dict[float, list[Trace]],
    retuned: dict[float, list[Trace]] | None = None,
) -> dict[str, Any]:
    """The section's summary: one entry per interval, ratios paired against interval 0;
    with ``retuned``, the default interval at the lr's grid neighbours too."""
    tg = study.targets()
    base = found[0.0]
    devices = study.setting.devices

    def times(trs: list[Trace]) -> list[float]:
        return [study.metric(t, "time", tg[t.task.seed]) for t in trs]

    out: dict[str, Any] = {"algorithm": "fedbuff/plain", "value": value, "intervals": {}}
    for i, trs in found.items():
        ts = times(trs)
        slow, _ = paired(ts, times(base))
        out["intervals"][str(i)] = {
            "publish_interval_s": i,
            **staleness_stats(trs),
            "plateau_accuracy": median(mean_tail(t) for t in trs),
            "final_accuracy": median(t.final_accuracy for t in trs),
            "plateau_drop_vs_every_version": median(
                mean_tail(a) - mean_tail(b) for a, b in zip(base, trs, strict=True)
            ),
            "time_to_target_s": finite(median(ts)),
            "time_to_target_min_s": finite(min(ts)),
            "time_to_target_max_s": finite(max(ts)),
            "time_to_target_vs_every_version": slow,
            "seeds_reaching_target": sum(study.reaches(t, tg[t.task.seed]) for t in trs),
            "publications": median(float(t.publications) for t in trs),
            "publications_per_device_job": median(t.publications * devices / t.jobs for t in trs),
        }
    out["default_interval_other_lrs"] = {}
    for v, trs in (retuned or {}).items():
        ts = times(trs)
        out["default_interval_other_lrs"][str(v)] = {
            "value": v,
            "publish_interval_s": DEFAULT_PUBLISH_INTERVAL,
            "plateau_accuracy": median(mean_tail(t) for t in trs),
            "time_to_target_s": finite(median(ts)),
            "time_to_target_vs_every_version": paired(ts, times(base))[0],
            "seeds_reaching_target": sum(study.reaches(t, tg[t.task.seed]) for t in trs),
        }
    return out
