"""Aggregation policies: pure computation on float64 arrays, no I/O.

One object owns the policy (as in Flower's Strategy): configured once, fed update by update
with :meth:`submit`, answering with an :class:`Outcome` that says whether a new global
version was produced; its whole state round-trips through ``state_dict`` for checkpoints.
"""

from fedbus.aggregation.delta import Delta, DenseDelta
from fedbus.aggregation.dp import DPConfig, epsilon
from fedbus.aggregation.fedasync import FedAsync
from fedbus.aggregation.fedbuff import FedBuff, PartialBuffer, merge
from fedbus.aggregation.optimizers import ServerAdam, ServerSGD
from fedbus.aggregation.robust import robust_mean
from fedbus.aggregation.staleness import Constant, Hinge, Polynomial, Threshold
from fedbus.aggregation.update import DedupWindow, Outcome, Update

__all__ = [
    "Constant", "DPConfig", "DedupWindow", "Delta", "DenseDelta", "FedAsync", "FedBuff", "Hinge",
    "Outcome", "PartialBuffer", "Polynomial", "ServerAdam", "ServerSGD", "Threshold", "Update",
    "epsilon", "merge", "robust_mean",
]  # fmt: skip
