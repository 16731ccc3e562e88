"""In-process fleet simulator: digits data, non-IID splits, NumPy models, simulated time.

Hundreds to thousands of simulated devices in one process, deterministic given seeds, with
no threads and no wall clock (see :mod:`fedbus.sim.engine`).
"""

from __future__ import annotations

from fedbus.sim.data import (
    Dataset,
    FleetData,
    digits_fleet,
    load_digits_split,
    make_fleet,
    stratified_split,
)
from fedbus.sim.engine import (
    FP32_BYTES,
    AsyncServer,
    Encode,
    HistoryPoint,
    JobRecord,
    SimResult,
    run_async,
    run_sync_fedavg,
)
from fedbus.sim.models import MLP, FlatModel, SoftmaxRegression
from fedbus.sim.partition import dirichlet_partition
from fedbus.sim.timing import FleetTiming

__all__ = [
    "FP32_BYTES",
    "MLP",
    "AsyncServer",
    "Dataset",
    "Encode",
    "FlatModel",
    "FleetData",
    "FleetTiming",
    "HistoryPoint",
    "JobRecord",
    "SimResult",
    "SoftmaxRegression",
    "digits_fleet",
    "dirichlet_partition",
    "load_digits_split",
    "make_fleet",
    "run_async",
    "run_sync_fedavg",
    "stratified_split",
]
