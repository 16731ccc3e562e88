"""Aggregation policies: pure computation on float64 arrays, no I/O.

One object owns the policy (as in Flower's Strategy): configured once, fed update by update
with :meth:`submit`, answering with an :class:`Outcome` that says whether a new global
version was produced; its whole state round-trips through ``state_dict`` for checkpoints.

Names load on first use: a device that only needs :mod:`.clipping` does not import every
policy (nor, through them, Numba's kernels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedbus._lazy import lazy_names

_NAMES = {
    "clip": ".clipping", "clip_factor": ".clipping",
    "Delta": ".delta", "DenseDelta": ".delta",
    "Accountant": ".dp", "DPConfig": ".dp", "epsilon": ".dp",
    "FedAsync": ".fedasync",
    "FedBuff": ".fedbuff", "PartialBuffer": ".fedbuff", "example_weight": ".fedbuff",
    "merge": ".fedbuff",
    "ServerAdam": ".optimizers", "ServerOptimizer": ".optimizers", "ServerSGD": ".optimizers",
    "optimizer_from_state": ".optimizers",
    "robust_mean": ".robust",
    "Constant": ".staleness", "FLSimNormalised": ".staleness", "Hinge": ".staleness",
    "Polynomial": ".staleness", "Staleness": ".staleness", "Threshold": ".staleness",
    "DedupWindow": ".update", "Outcome": ".update", "Update": ".update",
}  # fmt: skip

__all__ = [
    "Accountant", "Constant", "DPConfig", "DedupWindow", "Delta", "DenseDelta", "FLSimNormalised",
    "FedAsync", "FedBuff", "Hinge", "Outcome", "PartialBuffer", "Polynomial", "ServerAdam",
    "ServerOptimizer", "ServerSGD", "Staleness", "Threshold", "Update", "clip", "clip_factor",
    "epsilon", "example_weight", "merge", "optimizer_from_state", "robust_mean",
]  # fmt: skip

if TYPE_CHECKING:
    from fedbus.aggregation.clipping import clip, clip_factor
    from fedbus.aggregation.delta import Delta, DenseDelta
    from fedbus.aggregation.dp import Accountant, DPConfig, epsilon
    from fedbus.aggregation.fedasync import FedAsync
    from fedbus.aggregation.fedbuff import FedBuff, PartialBuffer, example_weight, merge
    from fedbus.aggregation.optimizers import (
        ServerAdam,
        ServerOptimizer,
        ServerSGD,
        optimizer_from_state,
    )
    from fedbus.aggregation.robust import robust_mean
    from fedbus.aggregation.staleness import (
        Constant,
        FLSimNormalised,
        Hinge,
        Polynomial,
        Staleness,
        Threshold,
    )
    from fedbus.aggregation.update import DedupWindow, Outcome, Update


__getattr__, __dir__ = lazy_names(__name__, _NAMES, __all__, globals())
