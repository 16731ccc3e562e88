"""In-process fleet simulator: digits data, non-IID splits, NumPy models, simulated time.

Hundreds to thousands of simulated devices in one process, deterministic given seeds, with
no threads and no wall clock (see :mod:`fedbus.sim.engine`).
"""

from __future__ import annotations

from fedbus.sim.data import (
    Dataset,
    FleetData,
    digits_fleet,
    fleet_from_parts,
    load_digits_split,
    make_fleet,
    stratified_split,
    synthetic_dataset,
)
from fedbus.sim.engine import (
    FP32_BYTES,
    AsyncServer,
    Download,
    Encode,
    HistoryPoint,
    JobRecord,
    ServerStep,
    SimResult,
    run_async,
    run_sync_fedavg,
)
from fedbus.sim.models import MLP, FlatModel, SoftmaxRegression
from fedbus.sim.partition import dirichlet_partition, owned_labels_partition
from fedbus.sim.timing import FleetTiming

__all__ = [
    "FP32_BYTES",
    "MLP",
    "AsyncServer",
    "Dataset",
    "Download",
    "Encode",
    "FlatModel",
    "FleetData",
    "FleetTiming",
    "HistoryPoint",
    "JobRecord",
    "ServerStep",
    "SimResult",
    "SoftmaxRegression",
    "digits_fleet",
    "dirichlet_partition",
    "fleet_from_parts",
    "load_digits_split",
    "make_fleet",
    "owned_labels_partition",
    "run_async",
    "run_sync_fedavg",
    "stratified_split",
    "synthetic_dataset",
]
