"""The selection rule of the convergence report, as pure functions of per-seed curves.

Why each piece exists (issue 12 showed each one changing the headline):

- **Tuned on the metric reported.** A ratio of times to target compares each algorithm at
  its *fastest* value on that metric, not at its best final accuracy: two values whose
  plateaus differ by a seventh of a test example can differ twofold in time.
- **Only values that get there.** A value qualifies when, in a strict majority of seeds,
  its plateau reaches the target and the seed has plateaued; among those the smallest
  median time (or upload count) wins, ties to the smaller value.
- **Trailing-mean crossing.** One test example moves the accuracy by a fraction of a
  point, so a single evaluation above the target is luck; the crossing is the first
  evaluation at which the mean of the last ``window`` evaluations reaches it.
- **Plateau per seed.** The median curve of a rising seed and a falling seed looks flat; each
  seed is checked on its own.
- **Optima inside the grid.** A value chosen on a grid edge may be beaten just outside it, so
  the run is marked invalid rather than reported as tuned.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TAIL_FRACTION = 0.2
"""The plateau is the mean accuracy over the last fifth of the budget."""
PLATEAU_TOLERANCE = 0.005
"""A seed whose accuracy still rises by this much (half a point) over the last fifth fails."""
CROSSING_WINDOW = 5
"""Evaluations in the trailing mean of a crossing."""


def trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values ending at each index; NaN before a full window."""
    if window < 1:
        raise ValueError("window must be at least 1")
    v = np.asarray(values, dtype=np.float64)
    out = np.full(v.shape, np.nan)
    if v.size >= window:
        c = np.concatenate(([0.0], np.cumsum(v)))
        out[window - 1 :] = (c[window:] - c[:-window]) / window
    return out


def crossing(accuracy: np.ndarray, target: float, window: int = CROSSING_WINDOW) -> int | None:
    """Index of the first evaluation whose trailing mean reaches ``target``; None if never.

    The index is that of the last evaluation in the window: the moment a server watching
    the trailing mean could first say it is there.
    """
    tm = trailing_mean(accuracy, window)
    hit = np.flatnonzero(tm >= target)
    return int(hit[0]) if hit.size else None


def at_crossing(
    series: np.ndarray, accuracy: np.ndarray, target: float, window: int = CROSSING_WINDOW
) -> float:
    """``series`` (time, uploads, bytes...) at the crossing; inf when the target is never met."""
    i = crossing(accuracy, target, window)
    return math.inf if i is None else float(np.asarray(series)[i])


def plateau(time: np.ndarray, accuracy: np.ndarray, tail: float = TAIL_FRACTION) -> float:
    """Mean accuracy over the last ``tail`` of the budget."""
    t = np.asarray(time, dtype=np.float64)
    sel = t >= (1.0 - tail) * t[-1]
    return float(np.asarray(accuracy, dtype=np.float64)[sel].mean())


def plateau_change(time: np.ndarray, accuracy: np.ndarray, tail: float = TAIL_FRACTION) -> float:
    """How much one seed still moves over the last ``tail``: the mean over the final half
    of that tail minus the mean over the same span just before the tail begins (windows
    of a tenth of the run: wide enough that a flat seed's evaluation noise averages out)."""
    t = np.asarray(time, dtype=np.float64)
    a = np.asarray(accuracy, dtype=np.float64)
    end, q = t[-1], tail / 2.0
    eps = 1e-9 * end  # window edges that fall on an evaluation include it
    late = a[t >= (1.0 - q) * end - eps]
    early = a[(t >= (1.0 - tail - q) * end - eps) & (t <= (1.0 - tail) * end + eps)]
    if late.size == 0 or early.size == 0:
        raise ValueError("too few evaluations to measure a plateau")
    return float(late.mean() - early.mean())


def has_plateaued(
    time: np.ndarray, accuracy: np.ndarray, tolerance: float = PLATEAU_TOLERANCE
) -> bool:
    """False for a seed still rising by ``tolerance`` or more over the last fifth."""
    return plateau_change(time, accuracy) < tolerance


@dataclass(frozen=True)
class Candidate:
    """One grid value's per-seed outcome (seeds in the same order for every candidate)."""

    value: float
    metric: tuple[float, ...]
    """Per seed: time or uploads at the crossing (inf when never crossed)."""
    reaches: tuple[bool, ...]
    """Per seed: plateau reaches the target and the seed has plateaued."""

    @property
    def qualifies(self) -> bool:
        return 2 * sum(self.reaches) > len(self.reaches)

    @property
    def median(self) -> float:
        return float(statistics.median(self.metric))


@dataclass(frozen=True)
class Choice:
    """The value chosen on a grid, and whether it can be trusted as an optimum."""

    value: float | None
    """None when no value qualifies."""
    median: float
    inside_grid: bool
    """True only when the value is strictly inside the grid (never for None)."""


def inside(value: float | None, grid: Sequence[float]) -> bool:
    """Strictly between the grid's smallest and largest value."""
    return value is not None and min(grid) < value < max(grid)


def select_fastest(candidates: Sequence[Candidate], grid: Sequence[float]) -> Choice:
    """The qualifying value with the smallest median metric; ties go to the smaller value."""
    ok = [c for c in candidates if c.qualifies and math.isfinite(c.median)]
    if not ok:
        return Choice(None, math.inf, False)
    best = min(ok, key=lambda c: (c.median, c.value))
    return Choice(best.value, best.median, inside(best.value, grid))


def select_by_plateau(
    values: Sequence[float], plateaus: Sequence[float], grid: Sequence[float]
) -> Choice:
    """The value with the best median plateau accuracy (the final-accuracy rule, reported
    beside the fair one and labelled); ``plateaus`` are the medians over seeds."""
    if not values:
        return Choice(None, math.nan, False)
    best = max(zip(values, plateaus, strict=True), key=lambda vp: (vp[1], -vp[0]))
    return Choice(best[0], best[1], inside(best[0], grid))


def neighbours(grid: Sequence[float], value: float) -> list[float]:
    """The grid values on either side of ``value`` (for a local search on the grid)."""
    i = list(grid).index(value)
    return [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid)]


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-seed ``num / den`` (e.g. sync time over FedBuff time). A seed where neither
    crossed is left out; one where only the denominator crossed is inf."""
    out: list[float] = []
    for a, b in zip(num, den, strict=True):
        if math.isinf(a) and math.isinf(b):
            continue
        out.append(math.inf if math.isinf(a) or b == 0 else a / b)
    return out
