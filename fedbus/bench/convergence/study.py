"""Runs grown on demand: the fp32 grid of one setting, tuned by local search on the grid.

A :class:`Study` holds every fp32 run of one setting over its seeds and answers the
selection rule's questions (targets, candidates, choices). :func:`search` grows it: from a
start value, it adds a grid neighbour whenever a rule's choice sits at the edge of what has
been run, until every choice is interior to the values run or on the grid's own edge (which
the report then flags). On a time-to-target curve with one minimum, this finds the grid
optimum while running a few values instead of the whole grid.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedbus.bench.convergence import selection as sel
from fedbus.bench.convergence.setting import TARGET_FRACTION, Setting, Task, Trace, grid

Runner = Callable[[list[Task]], list[Trace]]
Spec = tuple[str, str]
"""(algorithm, optimiser)."""
METRICS = ("time", "uploads")


@dataclass
class Study:
    setting: Setting
    seeds: tuple[int, ...]
    runner: Runner
    crossing_window: int = sel.CROSSING_WINDOW

    def __post_init__(self) -> None:
        self.traces: dict[tuple[str, str, float], list[Trace]] = {}

    # -- running -----------------------------------------------------------------------
    def ensure(self, keys: Iterable[tuple[str, str, float]]) -> None:
        """Run (all seeds of) the keys not run yet, in one batch."""
        todo = [k for k in dict.fromkeys(keys) if k not in self.traces]
        tasks = [Task(a, o, v, "fp32", s, self.setting) for a, o, v in todo for s in self.seeds]
        if not tasks:
            return
        out = self.runner(tasks)
        for i, k in enumerate(todo):
            n = len(self.seeds)
            self.traces[k] = out[i * n : (i + 1) * n]

    def values(self, spec: Spec) -> list[float]:
        a, o = spec
        return sorted(v for (a2, o2, v) in self.traces if (a2, o2) == (a, o))

    # -- the rule ----------------------------------------------------------------------
    def targets(self) -> dict[int, float]:
        """Per seed: 0.99 x the plateau of plain synchronous FedAvg at its best value by
        median plateau (the usual definition of a target: what sync FedAvg converges to)."""
        ref = self.reference()
        return {t.task.seed: TARGET_FRACTION * sel.plateau(t.time, t.accuracy) for t in ref}

    def reference(self) -> list[Trace]:
        c = self.final_choice(("sync_fedavg", "plain"))
        if c.value is None:
            raise RuntimeError("no synchronous FedAvg run to set the target")
        return self.traces[("sync_fedavg", "plain", c.value)]

    def reaches(self, t: Trace, target: float) -> bool:
        return sel.plateau(t.time, t.accuracy) >= target and sel.has_plateaued(t.time, t.accuracy)

    def metric(self, t: Trace, metric: str, target: float) -> float:
        series = t.time if metric == "time" else t.uploads
        return sel.at_crossing(series, t.accuracy, target, self.crossing_window)

    def candidates(self, spec: Spec, metric: str) -> list[sel.Candidate]:
        tg = self.targets()
        out = []
        for v in self.values(spec):
            trs = self.traces[(*spec, v)]
            out.append(
                sel.Candidate(
                    v,
                    tuple(self.metric(t, metric, tg[t.task.seed]) for t in trs),
                    tuple(self.reaches(t, tg[t.task.seed]) for t in trs),
                )
            )
        return out

    def choice(self, spec: Spec, metric: str) -> sel.Choice:
        return sel.select_fastest(self.candidates(spec, metric), grid(*spec))

    def final_choice(self, spec: Spec) -> sel.Choice:
        vs = self.values(spec)
        medians = [
            statistics.median(sel.plateau(t.time, t.accuracy) for t in self.traces[(*spec, v)])
            for v in vs
        ]
        return sel.select_by_plateau(vs, medians, grid(*spec))

    def per_seed(self, spec: Spec, value: float, metric: str) -> list[float]:
        tg = self.targets()
        return [self.metric(t, metric, tg[t.task.seed]) for t in self.traces[(*spec, value)]]


def _widen(g: Sequence[float], run: list[float], chosen: float | None) -> set[float]:
    """Grid values to add so that ``chosen`` is interior to ``run`` (or on the grid edge)."""
    lo, hi = g.index(run[0]), g.index(run[-1])
    if chosen is None:  # nothing qualifies yet: look on both sides
        return {g[i] for i in (lo - 1, hi + 1) if 0 <= i < len(g)}
    i = g.index(chosen)
    if i == lo and i > 0:
        return {g[i - 1]}
    if i == hi and i < len(g) - 1:
        return {g[i + 1]}
    return set()


def search(
    study: Study,
    starts: Mapping[Spec, Sequence[float]],
    log: Callable[[str], None] = print,
    max_rounds: int = 12,
) -> None:
    """Grow ``study`` until, for every spec, the choices on time, on uploads and on final
    accuracy are each interior to the values run (or on the grid edge)."""
    want: dict[Spec, set[float]] = {s: set(v) for s, v in starts.items()}
    for r in range(max_rounds):
        keys = [(*s, v) for s, vs in want.items() for v in sorted(vs)]
        new = [k for k in keys if k not in study.traces]
        if not new:
            return
        log(
            f"convergence: {study.setting.name} round {r + 1}: {len(new)} values x "
            f"{len(study.seeds)} seeds"
        )
        study.ensure(keys)
        for spec in want:
            g = grid(*spec)
            run = study.values(spec)
            add: set[float] = set()
            for m in METRICS:
                add |= _widen(g, run, study.choice(spec, m).value)
            add |= _widen(g, run, study.final_choice(spec).value)
            want[spec] |= add
    log(f"convergence: {study.setting.name}: search stopped after {max_rounds} rounds")


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, float | None]:
    """(median, min) over seeds of ``a / b`` per seed; None when undefined."""
    r = sel.paired_ratios(a, b)
    if not r:
        return None, None
    med, lo = float(statistics.median(r)), float(min(r))
    return (med if math.isfinite(med) else None), (lo if math.isfinite(lo) else None)


def finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def mean_tail(t: Trace) -> float:
    return sel.plateau(t.time, t.accuracy)


def worst_class(t: Trace) -> float:
    return float(np.min(t.class_accuracy))
