"""Aggregation policies: pure computation on float64 arrays, no I/O.

One object owns the policy (as in Flower's Strategy): configured once, fed update by update
with :meth:`submit`, answering with an :class:`Outcome` that says whether a new global
version was produced; its whole state round-trips through ``state_dict`` for checkpoints.
"""

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

__all__ = [
    "Accountant", "Constant", "DPConfig", "DedupWindow", "Delta", "DenseDelta", "FLSimNormalised",
    "FedAsync", "FedBuff", "Hinge", "Outcome", "PartialBuffer", "Polynomial", "ServerAdam",
    "ServerOptimizer", "ServerSGD", "Staleness", "Threshold", "Update", "clip", "clip_factor",
    "epsilon", "example_weight", "merge", "optimizer_from_state", "robust_mean",
]  # fmt: skip
