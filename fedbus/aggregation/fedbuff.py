"""FedBuff (Nguyen et al., AISTATS 2022): buffer K staleness-weighted deltas, then one step.

    on accept:  S += s(tau) * e(n) * clip * u ;  k += 1        (tau measured at acceptance)
    at k == K:  ubar = S / K  (fixed denominator; "weight_sum": S / sum w)
                (+ N(0, (z C / K)^2) with central DP)
                x = ServerOpt(x, ubar) ;  version += 1 ;  S = 0 ; k = 0

A client contributes at most once per buffer; a second update from it is accepted but
*deferred* into the next buffer (its staleness and weight fixed when it arrived). The sum is
linear, so partial buffers from several reducers merge exactly (:func:`merge`): FedBuff
scales out by splitting the stream, and a committer applies the merged buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedbus.aggregation import staleness as st
from fedbus.aggregation.delta import DenseDelta
from fedbus.aggregation.dp import DPConfig
from fedbus.aggregation.foldqueue import FoldQueue
from fedbus.aggregation.optimizers import ServerAdam, ServerOptimizer, ServerSGD
from fedbus.aggregation.robust import robust_mean
from fedbus.aggregation.update import (
    DedupWindow,
    Outcome,
    Update,
    check,
    clip_factor,
    read_only,
)


def example_weight(kind: str, n: int, avg: float) -> float:
    """FLSim's example weights, normalised by the weight of ``avg`` examples."""
    f = {
        "equal": lambda m: 1.0,
        "linear": float,
        "sqrt": math.sqrt,
        "log10": lambda m: math.log10(1 + m),
    }[kind]
    return f(n) / f(avg) if kind != "equal" else 1.0


@dataclass
class PartialBuffer:
    """What one reducer accumulated: enough to merge with others and apply once."""

    sum: np.ndarray
    count: int
    weight_sum: float
    clients: frozenset[str]


def merge(a: PartialBuffer, b: PartialBuffer) -> PartialBuffer:
    """The buffer that saw both sets of updates (the clients of a and b must differ)."""
    if a.clients & b.clients:
        raise ValueError("a client may contribute once per buffer: partials overlap")
    return PartialBuffer(
        a.sum + b.sum, a.count + b.count, a.weight_sum + b.weight_sum, a.clients | b.clients
    )


class FedBuff:
    def __init__(
        self,
        initial: np.ndarray,
        *,
        buffer_size: int = 10,
        staleness: st.Staleness | None = None,
        max_staleness: int | None = None,
        server_optimizer: ServerOptimizer | None = None,
        clip_norm: float | None = None,
        normalisation: Literal["k", "weight_sum"] = "k",
        example_weighting: Literal["equal", "linear", "sqrt", "log10"] = "equal",
        avg_num_examples: float = 1.0,
        robust: Literal["median", "trimmed_mean"] | None = None,
        trim_beta: float = 0.2,
        dp: DPConfig | None = None,
        dedup_window: int = 100_000,
        version: int = 0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        if dp is not None:
            if clip_norm is None or clip_norm > dp.clip_norm:
                clip_norm = dp.clip_norm
            if normalisation != "k" or example_weighting != "equal" or robust is not None:
                raise ValueError(
                    "central DP needs the fixed denominator K, equal weights, no robust mode"
                )
        self._x = np.array(initial, dtype=np.float64)
        self.k = buffer_size
        self.staleness = staleness or st.Polynomial(0.5)
        self.max_staleness = max_staleness
        self.optimizer: ServerOptimizer = server_optimizer or ServerSGD(1.0)
        self.clip_norm, self.normalisation = clip_norm, normalisation
        self.example_weighting, self.avg_num_examples = example_weighting, avg_num_examples
        self.robust, self.trim_beta, self.dp = robust, trim_beta, dp
        self.version = version
        self.seen = DedupWindow(dedup_window)
        self.rng = np.random.default_rng(dp.seed if dp else 0)
        self._acc = np.zeros_like(self._x)
        self._queue = FoldQueue()
        self._count = 0
        self._wsum = 0.0
        self._clients: set[str] = set()
        self._rows: list[np.ndarray] = []  # robust modes keep the weighted deltas
        self._deferred: list[tuple[str, float, np.ndarray]] = []

    # -- views ---------------------------------------------------------------------------
    @property
    def model(self) -> np.ndarray:
        return read_only(self._x)

    @property
    def pending(self) -> int:
        return self._count

    # -- feeding -------------------------------------------------------------------------
    def submit(self, update: Update) -> Outcome:
        refused, tau = check(update, self.version, self.max_staleness, self.seen)
        if refused is not None:
            return refused
        w = self.staleness(tau) * example_weight(
            self.example_weighting, update.num_examples, self.avg_num_examples
        )
        factor = w * clip_factor(update.delta, self.clip_norm)
        self.seen.add((update.client_id, update.update_id))
        if update.client_id in self._clients:
            self._deferred.append((update.client_id, w, factor * update.delta.to_dense()))
            return Outcome(True, staleness=tau, weight=factor, deferred=True)
        self._fold(update.client_id, w, update.delta, factor)
        before = self.version
        self._maybe_flush()
        return Outcome(
            True,
            staleness=tau,
            weight=factor,
            new_version=self.version if self.version != before else None,
        )

    def _fold(self, client: str, w: float, delta: Any, factor: float) -> None:
        if self.robust is not None:
            self._rows.append(factor * delta.to_dense())
        else:
            self._queue.push(self._acc, delta, factor)
        self._clients.add(client)
        self._count += 1
        self._wsum += w

    def _maybe_flush(self) -> None:
        while self._count >= self.k:
            self._flush()
            waiting, self._deferred = self._deferred, []
            for client, w, weighted in waiting:
                if client in self._clients or self._count >= self.k:
                    self._deferred.append((client, w, weighted))
                else:
                    self._fold(client, w, DenseDelta(weighted), 1.0)

    def drain(self) -> bool:
        """Apply a partial buffer now (shutdown), still dividing by K. True if applied."""
        if self._count == 0:
            return False
        self._flush()
        return True

    def _flush(self) -> None:
        self._queue.flush(self._acc)
        if self.robust is not None:
            ubar = robust_mean(np.stack(self._rows), self.robust, self.trim_beta)
        else:
            denom = self.k if self.normalisation == "k" else (self._wsum or 1.0)
            ubar = self._acc / denom
        if self.dp is not None:
            ubar = ubar + self.rng.normal(0.0, self.dp.noise_std(self.k), ubar.shape)
        self.optimizer.step(self._x, ubar)
        self.version += 1
        self._acc[:] = 0.0
        self._count, self._wsum = 0, 0.0
        self._clients.clear()
        self._rows = []

    # -- scale-out -----------------------------------------------------------------------
    def partial(self) -> PartialBuffer:
        self._queue.flush(self._acc)
        return PartialBuffer(self._acc.copy(), self._count, self._wsum, frozenset(self._clients))

    def apply_partial(self, p: PartialBuffer) -> None:
        """Fold a merged partial buffer in (a committer's job), flushing at K."""
        self._queue.flush(self._acc)
        if self._clients & p.clients:
            raise ValueError("a client may contribute once per buffer: partial overlaps")
        self._acc += p.sum
        self._count += p.count
        self._wsum += p.weight_sum
        self._clients |= p.clients
        self._maybe_flush()

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._queue.flush(self._acc)
        return {
            "algorithm": "fedbuff",
            "model": self._x,
            "version": self.version,
            "acc": self._acc,
            "count": self._count,
            "weight_sum": self._wsum,
            "clients": sorted(self._clients),
            "rows": self._rows,
            "deferred": [[c, w, d] for c, w, d in self._deferred],
            "dedup": self.seen.state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._x = np.array(d["model"], dtype=np.float64)
        self.version = int(d["version"])
        self._acc = np.array(d["acc"], dtype=np.float64)
        self._count, self._wsum = int(d["count"]), float(d["weight_sum"])
        self._clients = set(d["clients"])
        self._rows = [np.array(r, dtype=np.float64) for r in d["rows"]]
        self._deferred = [
            (str(c), float(w), np.array(x, dtype=np.float64)) for c, w, x in d["deferred"]
        ]
        self.seen.load(d["dedup"])
        opt = d["optimizer"]
        if opt["kind"] == "adam" and not isinstance(self.optimizer, ServerAdam):
            self.optimizer = ServerAdam()
        self.optimizer.load_state_dict(opt)
        self.rng.bit_generator.state = d["rng"]
