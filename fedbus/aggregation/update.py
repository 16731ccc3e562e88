"""Updates as the aggregators see them, what they answer, and the bounded dedup window."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbus.aggregation.delta import Delta
from fedbus.wire.errors import Reason


@dataclass(frozen=True)
class Update:
    client_id: str
    update_id: str
    base_version: int
    num_examples: int
    delta: Delta


@dataclass(frozen=True)
class Outcome:
    """``new_version`` is set when this update produced a new global model version."""

    accepted: bool
    reason: Reason | None = None
    staleness: int | None = None
    weight: float | None = None
    new_version: int | None = None
    deferred: bool = False


class DedupWindow:
    """The last ``capacity`` (client, update id) pairs folded in, oldest evicted first.

    Size it to cover every message a broker may still redeliver: updates since the last
    checkpoint plus those in flight (thousands, not millions).
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._seen

    def add(self, key: tuple[str, str]) -> None:
        self._seen[key] = None
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def state(self) -> list[list[str]]:
        return [list(k) for k in self._seen]

    def load(self, items: list[Any]) -> None:
        self._seen = OrderedDict(((str(c), str(u)), None) for c, u in items)


def check(
    update: Update, version: int, max_staleness: int | None, seen: DedupWindow
) -> tuple[Outcome | None, int]:
    """The checks every policy makes, in order: duplicate, future, stale, non-finite."""
    if (update.client_id, update.update_id) in seen:
        return Outcome(False, Reason.DUPLICATE), 0
    tau = version - update.base_version
    if tau < 0:
        return Outcome(False, Reason.FUTURE_VERSION, staleness=tau), tau
    if max_staleness is not None and tau > max_staleness:
        return Outcome(False, Reason.STALE, staleness=tau), tau
    if not math.isfinite(update.delta.sq_norm()):
        return Outcome(False, Reason.NON_FINITE, staleness=tau), tau
    return None, tau


def read_only(x: np.ndarray) -> np.ndarray:
    """The model as callers see it: a view they cannot write through by accident."""
    view = x.view()
    view.flags.writeable = False
    return view


def clip_factor(delta: Delta, clip_norm: float | None) -> float:
    """min(1, C / (||u|| + 1e-10)), computed from the codes, never the dense vector."""
    if clip_norm is None:
        return 1.0
    return min(1.0, clip_norm / (math.sqrt(delta.sq_norm()) + 1e-10))
