"""The settings the convergence report runs, and one simulated run of one of them.

Everything that decides a number in the report is a field of :class:`Setting` or
:class:`Task`, both frozen: a task is its own cache key, and a run is deterministic in it
(the simulator's schedule stream depends only on the seed, so every algorithm, optimiser
and codec sees the same fleet behaviour: comparisons are paired by seed).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedbus.aggregation import (
    DenseDelta,
    FedAsync,
    FedBuff,
    Polynomial,
    ServerAdam,
    ServerSGD,
    Update,
)
from fedbus.aggregation.optimizers import ServerOptimizer
from fedbus.client.updates import UpdateEncoder
from fedbus.sim import (
    MLP,
    FlatModel,
    FleetData,
    FleetTiming,
    SimResult,
    SoftmaxRegression,
    digits_fleet,
    dirichlet_partition,
    fleet_from_parts,
    load_digits_split,
    owned_labels_partition,
    run_async,
    run_sync_fedavg,
    synthetic_dataset,
)
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, ErrorFeedback, decode_dense, encode
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import encode_model_message

# -- the standard setting (kept as module constants: other benchmarks import them) ---------
DEVICES = 300
CONCURRENCY = 100
SIGMA = 1.0
DIRICHLET_ALPHA = 0.3
OVER_SELECTION = 1.3
BUFFER_K = 10
CLIENT_LR = 0.3
"""One client learning rate for all: each job is about one SGD step on ~5 examples, and
0.3 is stable for softmax regression on [0, 1] pixels while leaving the server lr to tune."""
DURATION_S = 600.0
"""Simulated seconds per run: ~200 synchronous rounds. Whether synchronous FedAvg's
plateau (which sets the target) is flat by then is checked per seed and reported."""
EVAL_EVERY_S = 2.5
TARGET_FRACTION = 0.99
MOMENTUM = 0.9

LR_GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
"""Server learning rates for synchronous FedAvg and FedBuff, plain and with momentum. With
momentum the grid value is the effective step ``lr / (1 - momentum)``, so the same value
means the same long-run step for both optimisers. It reaches 512 because synchronous
FedAvg's fastest value on time sat on the edge of shorter grids (64, then 128), and down to
0.125 because FedBuff's sat on 0.5 at 1,000 in flight: an optimum on the edge is not an
optimum, so the grid grew for it (the search only runs the values it needs)."""
ALPHA_GRID = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
"""FedAsync's mixing weight. Capped at 1: above it the server would overshoot the client's
own model, and FedAsync is defined on (0, 1]. A choice at 1 is an edge choice and marks
the run invalid like any other."""
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
"""Server Adam's learning rate, for every algorithm: Adam's step is in parameter units
(about ``lr`` per coordinate per version), so it cannot share the SGD grid."""

ALGORITHMS = ("sync_fedavg", "fedbuff", "fedasync")
OPTIMISERS = ("plain", "momentum", "adam")
"""Server optimisers: plain SGD (FedAvg, FedBuff, FedAsync), SGD with momentum (FedAvgM)
and Adam (FedAdam). FedAsync with an optimiser is FedBuff with K = 1, which is FedAsync's
update rule (one staleness-weighted delta per version) handed to that optimiser."""
CODECS: dict[str, CodecSpec] = {
    "fp32": CodecSpec("fp32"),
    "int8": CodecSpec("int8"),
    "topk": CodecSpec("topk", fraction=0.05, values="int8"),
}
DOWN_CODECS: dict[str, CodecSpec] = {
    "fp32": CodecSpec("fp32"),
    "int8": CodecSpec("int8", rounding="nearest"),
    "int4": CodecSpec("int4", rounding="nearest"),
}
"""The model as devices download it: weights, not deltas, so nearest rounding. int4
(blocks of 64, one float32 scale each: 0.57 byte a parameter) is what takes the total per
job past 10x; the worker publishes it with ``model_codec = "int4"``."""
PUBLISH_INTERVALS = (0.0, 0.2, 1.0, 5.0, 20.0)
"""``model_publish_interval_s`` values of the publication section: every version, a shorter
one, the worker's default, and two longer ones."""
DEFAULT_PUBLISH_INTERVAL = 1.0
"""The worker's default ``model_publish_interval_s``: the section also re-runs the lr's grid
neighbours there, to tell a cost of coalescing from a cost of not re-tuning for it."""


def grid(algorithm: str, optimiser: str) -> tuple[float, ...]:
    if optimiser == "adam":
        return ADAM_GRID
    return ALPHA_GRID if algorithm == "fedasync" else LR_GRID


def hyperparameter(algorithm: str, optimiser: str) -> str:
    if optimiser == "adam":
        return "adam_lr"
    if algorithm == "fedasync":
        return "alpha" if optimiser == "plain" else "effective_alpha"
    return "server_lr" if optimiser == "plain" else "effective_server_lr"


@dataclass(frozen=True)
class Setting:
    """One simulated world. ``slow_labels``: those labels live only on the slowest fifth of
    the devices (and those devices hold nothing else)."""

    name: str = "standard"
    devices: int = DEVICES
    concurrency: int = CONCURRENCY
    sigma: float = SIGMA
    dirichlet_alpha: float = DIRICHLET_ALPHA
    model: str = "softmax"
    epochs: int = 1
    data: str = "digits"
    examples_per_device: int = 0
    """Synthetic data only: training examples per device (digits has a fixed 1437)."""
    slow_labels: tuple[int, ...] = ()
    duration_s: float = DURATION_S
    eval_every_s: float = EVAL_EVERY_S
    over_selection: float = OVER_SELECTION
    buffer_k: int = BUFFER_K
    client_lr: float = CLIENT_LR
    batch_size: int = 16
    dropout: float = 0.1


STANDARD = Setting()


@dataclass(frozen=True)
class Task:
    """One run: an algorithm with one optimiser at one grid value, codecs, seed, setting."""

    algorithm: str
    optimiser: str
    hyper: float
    codec: str
    seed: int
    setting: Setting = STANDARD
    down: str = "fp32"
    publish_interval: float = 0.0
    """The worker's ``model_publish_interval_s`` (asynchronous algorithms): 0 publishes
    every version."""

    def key(self) -> str:
        """A stable name for the cache (hash of every field; fields added later count only
        when they differ from their default, so older caches stay valid)."""
        fields = asdict(self)
        for name in _LATER_FIELDS:
            if fields[name] == getattr(Task, name):
                del fields[name]
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


_LATER_FIELDS = ("publish_interval",)


@dataclass
class Trace:
    """A run's history as plain arrays (cheap to send back from a worker process)."""

    task: Task
    time: np.ndarray
    accuracy: np.ndarray
    uploads: np.ndarray
    bytes: np.ndarray
    down_bytes: np.ndarray
    jobs: int
    """Jobs started (each downloaded the model once)."""
    class_accuracy: np.ndarray
    """Per-class accuracy of the final model (the worst class shows a biased fleet)."""
    staleness: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """Uploads by staleness (``staleness[s]``: uploads ``s`` versions behind at arrival,
    counted from the version the job downloaded); empty for synchronous runs."""
    publications: int = 0
    """Model versions published (asynchronous runs)."""

    @property
    def final_accuracy(self) -> float:
        return float(self.accuracy[-1])


# -- adapters ------------------------------------------------------------------------------
class PolicyServer:
    """Adapts a :class:`FedBuff` or :class:`FedAsync` to the engine's ``AsyncServer``.

    The engine speaks in device indices and raw arrays; the policies speak the wire's
    language (client id strings, update ids for dedup, ``Delta`` objects), so the adapter
    names device 7 ``dev-0007`` and numbers updates from a counter (never repeating, so
    dedup never fires). A refused update would mean the benchmark measures something other
    than it claims, hence it raises instead of counting.
    """

    def __init__(self, policy: FedBuff | FedAsync) -> None:
        self.policy = policy
        self._ids = itertools.count()

    @property
    def version(self) -> int:
        return self.policy.version

    def model(self) -> np.ndarray:
        return self.policy.model

    def submit(self, client: int, base_version: int, delta: np.ndarray, num_examples: int) -> bool:
        update = Update(
            client_id=f"dev-{client:04d}",
            update_id=f"u{next(self._ids):09d}",
            base_version=base_version,
            num_examples=num_examples,
            delta=DenseDelta(delta),
        )
        outcome = self.policy.submit(update)
        if not outcome.accepted:
            raise RuntimeError(f"update refused ({outcome.reason}): the benchmark is invalid")
        return outcome.new_version is not None


def codec_hook(
    spec: CodecSpec, n_devices: int, n_params: int, rng: np.random.Generator
) -> Callable[[int, np.ndarray], tuple[np.ndarray, int]]:
    """The engine's ``encode`` hook: per-device error feedback, then what the server decodes.

    Returns ``(decoded delta, payload bytes)``. Residuals are created lazily (a device that
    never uploads costs nothing) and live as long as the hook, i.e. one run. Every codec,
    fp32 included, keeps a residual, as the real client does whatever the codec.
    """
    feedback: dict[int, ErrorFeedback] = {}

    def encode_one(device: int, delta: np.ndarray) -> tuple[np.ndarray, int]:
        ef = feedback.get(device)
        if ef is None:
            ef = feedback[device] = ErrorFeedback(n_params, spec)
        payload = ef.encode(delta, rng)
        return decode_dense(payload, spec, n_params), len(payload)

    if n_devices < 1:
        raise ValueError("need at least one device")
    return encode_one


def download_hook(spec: CodecSpec, n_params: int) -> Callable[[np.ndarray], tuple[np.ndarray, int]]:
    """The engine's ``download`` hook: the model as published in ``spec`` and decoded."""

    def download(params: np.ndarray) -> tuple[np.ndarray, int]:
        payload = encode(params, spec)
        return decode_dense(payload, spec, n_params), len(payload)

    return download


def server_optimizer(optimiser: str, hyper: float) -> ServerOptimizer:
    """The optimiser a grid value names (momentum: the value is the effective step)."""
    if optimiser == "plain":
        return ServerSGD(lr=hyper, momentum=0.0)
    if optimiser == "momentum":
        return ServerSGD(lr=hyper * (1.0 - MOMENTUM), momentum=MOMENTUM)
    if optimiser == "adam":
        return ServerAdam(lr=hyper)
    raise ValueError(f"unknown optimiser {optimiser!r}")


# -- envelope overhead: encode real messages ------------------------------------------------
@lru_cache(maxsize=32)
def update_overhead(spec: CodecSpec, n_params: int) -> int:
    """Bytes a whole update message adds to its payload: built by the device SDK's own
    encoder (ids, sequence number, codec map, layout fingerprint, loss metric, timestamp;
    unsigned), so the figure follows the wire as it changes."""
    layout = Layout.from_wire([["w", [n_params], "float64"]])
    enc = UpdateEncoder("digits-softmax", "sim-0042", layout, spec, seed=0)
    start = np.zeros(n_params)
    end = np.random.default_rng(0).normal(0, 0.01, n_params)
    msg = enc.build(123_456, start, end, 5, {"loss": 0.4567891})
    return len(env.encode(msg)) - len(msg.payload)


@lru_cache(maxsize=32)
def model_overhead(spec: CodecSpec, model_name: str, n_features: int, n_classes: int) -> int:
    """Bytes a whole model message adds to its payload (the worker's own encoder)."""
    model = make_model(model_name, n_features, n_classes)
    weights = model.init_params(0)
    msg = encode_model_message(
        "digits-softmax", 123_456, model.wire_layout(), weights, spec, updates_folded=1_234_560
    )
    return len(msg) - len(encode(weights.astype(np.float32), spec))


# -- one run -------------------------------------------------------------------------------
def make_model(name: str, n_features: int, n_classes: int) -> FlatModel:
    if name == "softmax":
        return SoftmaxRegression(n_features, n_classes)
    if name == "mlp":
        return MLP(n_features, 32, n_classes)
    raise ValueError(f"unknown model {name!r}")


@lru_cache(maxsize=4)
def world(s: Setting, seed: int) -> tuple[FleetData, FlatModel, FleetTiming, np.ndarray]:
    """Data, model, timing and initial parameters of ``s`` for one seed."""
    timing = FleetTiming(
        s.devices,
        sigma=s.sigma,
        job_sigma=0.25,
        net_delay_fraction=0.1,
        dropout=s.dropout,
        seed=seed,
    )
    if s.data == "digits":
        data = load_digits_split(0.2, seed)
    elif s.data == "synthetic":
        data = synthetic_dataset(s.devices * s.examples_per_device, 4000, seed=seed)
    else:
        raise ValueError(f"unknown data {s.data!r}")
    if s.slow_labels:
        slowest = np.argsort(timing.slowness)[-max(1, s.devices // 5) :]
        parts = owned_labels_partition(
            data.y_train, s.devices, slowest, s.slow_labels, s.dirichlet_alpha, seed
        )
        fleet = fleet_from_parts(data, parts)
    elif s.data == "digits" and s.devices == DEVICES:
        fleet = digits_fleet(s.devices, s.dirichlet_alpha, seed=seed)
    else:
        parts = dirichlet_partition(data.y_train, s.devices, s.dirichlet_alpha, seed)
        fleet = fleet_from_parts(data, parts)
    model = make_model(s.model, fleet.n_features, fleet.n_classes)
    return fleet, model, timing, model.init_params(seed)


def run_one(task: Task) -> Trace:
    """One simulated run. Deterministic in ``task``: codec randomness (stochastic rounding)
    has its own stream, so it never perturbs the fleet schedule or the minibatches."""
    s = task.setting
    fleet, model, timing, init = world(s, task.seed)
    codec_index = list(CODECS).index(task.codec)
    rng = np.random.default_rng([task.seed, codec_index, 7])
    common: dict[str, Any] = {
        "duration": s.duration_s,
        "client_lr": s.client_lr,
        "batch_size": s.batch_size,
        "epochs": s.epochs,
        "eval_every": s.eval_every_s,
        "encode": codec_hook(CODECS[task.codec], s.devices, model.n_params, rng),
        "download": download_hook(DOWN_CODECS[task.down], model.n_params),
        "seed": task.seed,
    }
    opt = server_optimizer(task.optimiser, task.hyper)
    result: SimResult
    if task.algorithm == "sync_fedavg":
        result = run_sync_fedavg(
            init,
            fleet,
            model,
            timing,
            cohort=s.concurrency,
            over_selection=s.over_selection,
            server_optimizer=opt,
            **common,
        )
    else:
        policy: FedBuff | FedAsync
        if task.algorithm == "fedbuff":
            policy = FedBuff(
                init, buffer_size=s.buffer_k, staleness=Polynomial(0.5), server_optimizer=opt
            )
        elif task.algorithm == "fedasync" and task.optimiser == "plain":
            policy = FedAsync(init, alpha=task.hyper, staleness=Polynomial(0.5))
        elif task.algorithm == "fedasync":
            policy = FedBuff(init, buffer_size=1, staleness=Polynomial(0.5), server_optimizer=opt)
        else:
            raise ValueError(f"unknown algorithm {task.algorithm!r}")
        result = run_async(
            PolicyServer(policy),
            fleet,
            model,
            timing,
            concurrency=s.concurrency,
            publish_interval=task.publish_interval,
            **common,
        )
    h = result.history
    pred = model.predict(result.params, fleet.x_test)
    per_class = np.array([np.mean(pred[fleet.y_test == c] == c) for c in range(fleet.n_classes)])
    return Trace(
        task,
        np.array([p.time for p in h]),
        np.array([p.accuracy for p in h]),
        np.array([p.uploads for p in h], dtype=np.int64),
        np.array([p.bytes for p in h], dtype=np.int64),
        np.array([p.down_bytes for p in h], dtype=np.int64),
        jobs=int(result.down_bytes // max(1, _down_size(task, model.n_params))),
        class_accuracy=per_class,
        staleness=np.bincount(result.staleness)
        if task.algorithm != "sync_fedavg"
        else np.zeros(0, dtype=np.int64),
        publications=result.publications,
    )


def _down_size(task: Task, n_params: int) -> int:
    return DOWN_CODECS[task.down].raw_size(n_params)


# -- cache ---------------------------------------------------------------------------------
def cached_run(task: Task, cache: str | None) -> Trace:
    """:func:`run_one`, reusing a stored trace of the same task (the key hashes every field,
    so a changed setting never reuses a stale run). ``cache`` None: always run."""
    if cache is None:
        return run_one(task)
    path = Path(cache) / f"{task.key()}.npz"
    if path.exists():
        z = np.load(path)
        return Trace(
            task,
            z["time"],
            z["accuracy"],
            z["uploads"],
            z["bytes"],
            z["down_bytes"],
            int(z["jobs"]),
            z["class_accuracy"],
            z["staleness"] if "staleness" in z else np.zeros(0, dtype=np.int64),
            int(z["publications"]) if "publications" in z else 0,
        )
    tr = run_one(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        time=tr.time,
        accuracy=tr.accuracy,
        uploads=tr.uploads,
        bytes=tr.bytes,
        down_bytes=tr.down_bytes,
        jobs=tr.jobs,
        class_accuracy=tr.class_accuracy,
        staleness=tr.staleness,
        publications=tr.publications,
    )
    os.replace(tmp, path)
    return tr


def quick(s: Setting) -> Setting:
    """The same world, shortened for tests and CI."""
    return replace(s, duration_s=60.0)
