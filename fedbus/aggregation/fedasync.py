"""FedAsync (Xie et al.): every accepted update moves the model at once: one update, one version."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Literal

import numpy as np

from fedbus.aggregation import staleness as st
from fedbus.aggregation.clipping import check_clip_norm, clip_factor
from fedbus.aggregation.state import array, expect, snapshot
from fedbus.aggregation.update import DedupWindow, Outcome, Update, check, read_only
from fedbus.kernels import optim
from fedbus.wire.errors import Reason


class FedAsync:
    """alpha_t = alpha s(tau), recomputed per update from the fixed base ``alpha`` (never
    decayed cumulatively, which is Plato's bug).

    ``direction="delta"`` (default, FLSim's): x <- x + alpha_t clip u. No history needed.
    ``direction="paper"``: x <- (1 - alpha_t) x + alpha_t (x_{v_b} + clip u), mixing toward
    the client's model as the paper does. Clients send deltas, so the server rebuilds
    x_{v_b} from a ring of the last ``ring_depth`` models (ring_depth model copies of
    memory); an update whose base left the ring is refused (TOO_OLD_FOR_RING). Set
    ``ring_depth = max_staleness + 1`` so that only STALE ever refuses an in-bound update.
    The two directions differ by alpha_t (x_{v_b} - x): a pull back toward the stale base.
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
        if direction not in ("delta", "paper"):
            raise ValueError("direction must be 'delta' or 'paper'")
        if ring_depth < 1:
            raise ValueError("ring_depth must be at least 1")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError("max_staleness must be >= 0 (or None for unbounded)")
        check_clip_norm(clip_norm)
        self._x = np.array(initial, dtype=np.float64)
        if self._x.ndim != 1:
            raise ValueError("the model is one flat float vector")
        self.alpha, self.max_staleness = alpha, max_staleness
        self.staleness: st.Staleness = staleness if staleness is not None else st.Polynomial(0.5)
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
        """Always 0: nothing waits, every accepted update is a new version."""
        return 0

    def submit(self, update: Update) -> Outcome:
        refused, tau, sq = check(
            update, self.version, self.max_staleness, self.seen, self._x.shape[0]
        )
        if refused is not None:
            return refused
        if self.direction == "paper" and update.base_version not in self.ring:
            return Outcome(False, Reason.TOO_OLD_FOR_RING, staleness=tau)
        a = self.alpha * self.staleness(tau)
        c = clip_factor(sq, self.clip_norm)
        if self.direction == "delta":
            update.delta.fold_into(self._x, a * c)
        else:
            target = self.ring[update.base_version].copy()
            update.delta.fold_into(target, c)
            optim.mix_step(self._x, target, a)
        self.seen.add((update.client_id, update.update_id), update.digest, update.seq)
        self.version += 1
        if self.direction == "paper":
            self.ring[self.version] = self._x.copy()
            while len(self.ring) > self.ring_depth:
                self.ring.popitem(last=False)
        return Outcome(True, staleness=tau, weight=a * c, new_version=self.version)

    def drain(self) -> bool:
        """Nothing is ever buffered (same interface as FedBuff.drain)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = snapshot(
            {
                "algorithm": "fedasync",
                "model": self._x,
                "version": self.version,
                "dedup": self.seen.state(),
                "ring": [[v, x] for v, x in self.ring.items()],
            }
        )
        return state

    def load_state_dict(self, d: dict[str, Any]) -> None:
        expect(d, "fedasync")
        self._x = array(d["model"])
        self.version = int(d["version"])
        self.seen.load(d["dedup"])
        self.ring = OrderedDict((int(v), array(x)) for v, x in d["ring"])
