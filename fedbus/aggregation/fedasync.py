"""FedAsync (Xie et al.): every accepted update moves the model at once: one update, one version."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import numpy as np

from fedbus.aggregation import staleness as st
from fedbus.aggregation.update import (
    DedupWindow,
    Outcome,
    Update,
    check,
    clip_factor,
    read_only,
)
from fedbus.kernels import optim
from fedbus.wire.errors import Reason


class FedAsync:
    """x <- x + alpha s(tau) clip u ("delta" direction, no history needed), or the paper's
    x <- (1 - a) x + a (x_{v_b} + u) ("paper" direction, a ring of recent models).

    ``alpha`` is a fixed base: the weight is recomputed for each update from it, never
    decayed cumulatively (Plato's bug).
    """

    def __init__(
        self,
        initial: np.ndarray,
        *,
        alpha: float = 0.6,
        staleness: st.Staleness | None = None,
        max_staleness: int | None = None,
        direction: Literal["delta", "paper"] = "delta",
        ring_depth: int = 8,
        clip_norm: float | None = None,
        dedup_window: int = 100_000,
        version: int = 0,
    ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self._x = np.array(initial, dtype=np.float64)
        self.alpha, self.max_staleness = alpha, max_staleness
        self.staleness = staleness or st.Polynomial(0.5)
        self.direction, self.ring_depth, self.clip_norm = direction, ring_depth, clip_norm
        self.version = version
        self.seen = DedupWindow(dedup_window)
        self.ring: OrderedDict[int, np.ndarray] = OrderedDict()
        if direction == "paper":
            self.ring[version] = self._x.copy()

    @property
    def model(self) -> np.ndarray:
        return read_only(self._x)

    @property
    def pending(self) -> int:
        return 0

    def submit(self, update: Update) -> Outcome:
        refused, tau = check(update, self.version, self.max_staleness, self.seen)
        if refused is not None:
            return refused
        if self.direction == "paper" and update.base_version not in self.ring:
            return Outcome(False, Reason.TOO_OLD_FOR_RING, staleness=tau)
        a = self.alpha * self.staleness(tau)
        c = clip_factor(update.delta, self.clip_norm)
        if self.direction == "delta":
            update.delta.fold_into(self._x, a * c)
        else:
            target = self.ring[update.base_version].copy()
            update.delta.fold_into(target, c)
            optim.mix_step(self._x, target, a)
        self.seen.add((update.client_id, update.update_id))
        self.version += 1
        if self.direction == "paper":
            self.ring[self.version] = self._x.copy()
            while len(self.ring) > self.ring_depth:
                self.ring.popitem(last=False)
        return Outcome(True, staleness=tau, weight=a * c, new_version=self.version)

    def state_dict(self) -> dict[str, Any]:
        return {
            "algorithm": "fedasync",
            "model": self._x,
            "version": self.version,
            "dedup": self.seen.state(),
            "ring": [[v, x] for v, x in self.ring.items()],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._x = np.array(d["model"], dtype=np.float64)
        self.version = int(d["version"])
        self.seen.load(d["dedup"])
        self.ring = OrderedDict((int(v), np.array(x, dtype=np.float64)) for v, x in d["ring"])
