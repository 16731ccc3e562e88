"""The convergence report (``fedbus bench convergence``): one fixed, standard setting.

The setting is fixed so that no one can flatter an algorithm by choosing it: digits over
300 devices, Dirichlet(0.3) labels, 100 devices training at every moment, per-device
slowness lognormal(0, 1), per-job jitter lognormal(0, 0.25) plus an exponential network
delay (mean a tenth of the median job), 10% dropouts, softmax regression, one local epoch,
batch 16, one client learning rate (:data:`CLIENT_LR`) for every algorithm.

Protocol (all of it in this module, so a reader can check it):

- **Tuning.** Synchronous FedAvg (130% over-selection, first 100 close the round) and
  FedBuff (K = 10, server SGD without momentum) get the same grid of server learning rates
  (:data:`LR_GRID`); FedAsync (Polynomial(0.5) staleness) gets :data:`ALPHA_GRID`. Each is
  run on fp32 for every seed and reported at its best value by median plateau accuracy
  (mean over the last 20% of the budget; a single tick is too noisy to rank on). The
  codec runs reuse that value: tuning per codec would hide a codec's cost in the tuning.
- **Budget.** Every run gets the same simulated duration (:data:`DURATION_S`), chosen so
  that synchronous FedAvg plateaus; whether it did is measured and reported
  (``sync_plateaued``), not assumed.
- **Target.** Per seed, 0.99 x synchronous FedAvg's plateau, the plateau being its mean
  accuracy over the last 20% of the budget (a single tick is one test example = 0.28 point
  of noise). Per-seed targets keep the comparisons paired: the simulator's schedule stream
  depends only on the seed, so every algorithm and codec sees the same fleet behaviour.
- **Codecs.** fp32, int8 and top-k 5% with int8 values. Every device keeps one
  :class:`~fedbus.wire.codecs.ErrorFeedback` for every codec, fp32 and int8 included: the
  real client does so whatever the codec (the residual of fp32 is only float32 rounding,
  that of int8 its quantisation error, both tiny but real), so one code path serves all.
- **Statistics.** Medians over seeds, with min-max ranges; ratios are computed per seed
  (paired) and then their median taken.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from fedbus.aggregation import DenseDelta, FedAsync, FedBuff, Polynomial, ServerSGD, Update
from fedbus.sim import (
    FleetData,
    FleetTiming,
    SimResult,
    SoftmaxRegression,
    digits_fleet,
    run_async,
    run_sync_fedavg,
)
from fedbus.wire.codecs import CodecSpec, ErrorFeedback, decode_dense

DEVICES = 300
CONCURRENCY = 100
SIGMA = 1.0
DIRICHLET_ALPHA = 0.3
OVER_SELECTION = 1.3
BUFFER_K = 10
CLIENT_LR = 0.3
"""One client learning rate for all: each job is about one SGD step on ~5 examples, and
0.3 is stable for softmax regression on [0, 1] pixels while leaving the server lr to tune."""
LR_GRID = (1.0, 2.0, 4.0, 8.0, 16.0)
"""Server learning rates for sync FedAvg and FedBuff alike. FedBuff divides its buffer by K
and down-weights stale updates (about 1/sqrt(1 + 10) here), so it needs the top of it."""
ALPHA_GRID = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
"""FedAsync's mixing weight spans its whole range (0, 1]: a best value at the top of a
shorter grid would leave FedAsync under-tuned and flatter FedBuff's upload ratio."""
DURATION_S = 1500.0
"""Simulated seconds per run: ~500 synchronous rounds (a round lasts ~3 s, the 85th
percentile job), by which time FedAvg's accuracy moves well under half a point."""
EVAL_EVERY_S = 2.5
TARGET_FRACTION = 0.99
PLATEAU_TOLERANCE = 0.005

ALGORITHMS = ("sync_fedavg", "fedbuff", "fedasync")
CODECS: dict[str, CodecSpec] = {
    "fp32": CodecSpec("fp32"),
    "int8": CodecSpec("int8"),
    "topk": CodecSpec("topk", fraction=0.05, values="int8"),
}


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
    never uploads costs nothing) and live as long as the hook, i.e. one run.
    """
    feedback: dict[int, ErrorFeedback] = {}

    def encode(device: int, delta: np.ndarray) -> tuple[np.ndarray, int]:
        ef = feedback.get(device)
        if ef is None:
            ef = feedback[device] = ErrorFeedback(n_params, spec)
        payload = ef.encode(delta, rng)
        return decode_dense(payload, spec, n_params), len(payload)

    if n_devices < 1:
        raise ValueError("need at least one device")
    return encode


# -- one run -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Everything that sizes a report; :func:`run` picks the default or the quick one."""

    seeds: tuple[int, ...]
    duration_s: float = DURATION_S
    eval_every_s: float = EVAL_EVERY_S
    lr_grid: tuple[float, ...] = LR_GRID
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    client_lr: float = CLIENT_LR


@dataclass(frozen=True)
class Task:
    algorithm: str
    hyper: float
    codec: str
    seed: int
    duration_s: float
    eval_every_s: float
    client_lr: float


@dataclass
class Trace:
    """A run's history as plain arrays (cheap to send back from a worker process)."""

    task: Task
    time: np.ndarray
    accuracy: np.ndarray
    uploads: np.ndarray
    bytes: np.ndarray

    @property
    def final_accuracy(self) -> float:
        return float(self.accuracy[-1])


@lru_cache(maxsize=8)
def _setting(seed: int) -> tuple[FleetData, SoftmaxRegression, FleetTiming, np.ndarray]:
    fleet = digits_fleet(DEVICES, DIRICHLET_ALPHA, seed=seed)
    model = SoftmaxRegression(fleet.n_features, fleet.n_classes)
    timing = FleetTiming(DEVICES, sigma=SIGMA, job_sigma=0.25, net_delay_fraction=0.1,
                         dropout=0.1, seed=seed)  # fmt: skip
    return fleet, model, timing, model.init_params(seed)


def run_one(task: Task) -> Trace:
    """One simulated run. Deterministic in ``task``: codec randomness (stochastic rounding)
    has its own stream, so it never perturbs the fleet schedule or the minibatches."""
    fleet, model, timing, init = _setting(task.seed)
    codec_index = list(CODECS).index(task.codec)
    rng = np.random.default_rng([task.seed, codec_index, 7])
    hook = codec_hook(CODECS[task.codec], DEVICES, model.n_params, rng)
    common: dict[str, Any] = {
        "duration": task.duration_s,
        "client_lr": task.client_lr,
        "batch_size": 16,
        "epochs": 1,
        "eval_every": task.eval_every_s,
        "encode": hook,
        "seed": task.seed,
    }
    result: SimResult
    if task.algorithm == "sync_fedavg":
        result = run_sync_fedavg(
            init, fleet, model, timing, cohort=CONCURRENCY, over_selection=OVER_SELECTION,
            server_lr=task.hyper, **common,
        )  # fmt: skip
    else:
        policy: FedBuff | FedAsync
        if task.algorithm == "fedbuff":
            policy = FedBuff(
                init, buffer_size=BUFFER_K, staleness=Polynomial(0.5),
                server_optimizer=ServerSGD(lr=task.hyper, momentum=0.0),
            )  # fmt: skip
        elif task.algorithm == "fedasync":
            policy = FedAsync(init, alpha=task.hyper, staleness=Polynomial(0.5))
        else:
            raise ValueError(f"unknown algorithm {task.algorithm!r}")
        result = run_async(
            PolicyServer(policy), fleet, model, timing, concurrency=CONCURRENCY, **common
        )
    h = result.history
    return Trace(
        task,
        np.array([p.time for p in h]),
        np.array([p.accuracy for p in h]),
        np.array([p.uploads for p in h], dtype=np.int64),
        np.array([p.bytes for p in h], dtype=np.int64),
    )


def _run_all(tasks: list[Task], workers: int) -> list[Trace]:
    """Order-preserving, so the report does not depend on the number of workers."""
    if workers <= 1 or len(tasks) <= 1:
        return [run_one(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_one, tasks, chunksize=1))


# -- statistics ----------------------------------------------------------------------------
def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _median(values: Sequence[float]) -> float:
    """Median that tolerates inf (an unreached target): inf when the middle is unreached."""
    return float(statistics.median(values)) if values else math.nan


def plateau(trace: Trace) -> float:
    """Mean accuracy over the last 20% of the budget."""
    tail = trace.time >= 0.8 * trace.time[-1]
    return float(trace.accuracy[tail].mean())


def first_reach(trace: Trace, target: float) -> tuple[float, float]:
    """(simulated time, uploads) at the first tick with accuracy >= target; inf if never."""
    hit = np.flatnonzero(trace.accuracy >= target)
    if hit.size == 0:
        return math.inf, math.inf
    i = int(hit[0])
    return float(trace.time[i]), float(trace.uploads[i])


def _median_curve(traces: list[Trace]) -> dict[str, list[float]]:
    grid = traces[0].time
    acc = np.median([np.interp(grid, t.time, t.accuracy) for t in traces], axis=0)
    mb = np.median([np.interp(grid, t.time, t.bytes) for t in traces], axis=0) / 1e6
    return {"time_s": grid.tolist(), "accuracy": acc.tolist(), "mb": mb.tolist()}


@dataclass
class Report:
    """One record per (algorithm, codec), the summary, and median curves for the plot."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def _record(
    algorithm: str, codec: str, hyper: float, traces: list[Trace], targets: dict[int, float]
) -> dict[str, Any]:
    finals = [t.final_accuracy for t in traces]
    reach = [first_reach(t, targets[t.task.seed]) for t in traces]
    times = [r[0] for r in reach]
    return {
        "algorithm": algorithm,
        "codec": codec,
        "hyperparameter": "alpha" if algorithm == "fedasync" else "server_lr",
        "value": hyper,
        "final_accuracy": statistics.median(finals),
        "final_accuracy_min": min(finals),
        "final_accuracy_max": max(finals),
        "time_to_target_s": _finite(_median(times)),
        "time_to_target_min_s": _finite(min(times)),
        "time_to_target_max_s": _finite(max(times)),
        "uploads_to_target": _finite(_median([r[1] for r in reach])),
        "seeds_reaching_target": sum(math.isfinite(x) for x in times),
        "bytes_uploaded": int(statistics.median([int(t.bytes[-1]) for t in traces])),
        "uploads": int(statistics.median([int(t.uploads[-1]) for t in traces])),
    }


def _paired(a: list[Trace], b: list[Trace], f: Callable[[Trace, Trace], float]) -> float | None:
    """Median over seeds of a per-seed comparison; seeds where it is undefined are left out."""
    values = [f(x, y) for x, y in zip(a, b, strict=True)]
    return _finite(_median([v for v in values if not math.isnan(v)]))


def _ratio(num: float, den: float) -> float:
    if math.isinf(num) and math.isinf(den):
        return math.nan  # neither reached the target: no ratio for this seed
    if den == 0 or math.isinf(num):
        return math.inf
    return num / den


def run(
    seeds: int = 5, quick: bool = False, log: Callable[[str], None] = print, workers: int = 0
) -> Report:
    """Tune on fp32, run the codecs at each algorithm's best value, summarise.

    ``quick`` keeps the setting (devices, concurrency, timing) and shortens everything else
    (2 seeds unless given fewer, 60 simulated seconds, two grid values) for tests and CI.
    ``workers`` = 0 uses up to 2 processes; results do not depend on it.
    """
    if quick:
        cfg = Config(tuple(range(min(seeds, 2))), duration_s=60.0, eval_every_s=2.5,
                     lr_grid=(4.0, 8.0), alpha_grid=(0.2, 0.6))  # fmt: skip
    else:
        cfg = Config(tuple(range(seeds)))
    if not cfg.seeds:
        raise ValueError("need at least one seed")
    if workers <= 0:
        workers = min(2, os.cpu_count() or 1)
    started = time.perf_counter()

    def task(algorithm: str, hyper: float, codec: str, seed: int) -> Task:
        return Task(algorithm, hyper, codec, seed, cfg.duration_s, cfg.eval_every_s, cfg.client_lr)

    grids = {"sync_fedavg": cfg.lr_grid, "fedbuff": cfg.lr_grid, "fedasync": cfg.alpha_grid}
    grid_tasks = [task(a, h, "fp32", s) for a in ALGORITHMS for h in grids[a] for s in cfg.seeds]
    log(f"convergence: {len(grid_tasks)} fp32 grid runs on {workers} worker(s)")
    by_key: dict[tuple[str, float, str], list[Trace]] = {}
    for tr in _run_all(grid_tasks, workers):
        by_key.setdefault((tr.task.algorithm, tr.task.hyper, "fp32"), []).append(tr)
    best: dict[str, float] = {}
    grid_scores: dict[str, dict[str, float]] = {}
    for a in ALGORITHMS:
        # score: median over seeds of the mean accuracy over the last 20% of the budget (one
        # tick's accuracy moves by a test example, 0.28 point; the tail mean is steadier).
        # Ties go to the smaller value (listed first), the more conservative setting.
        scores = [statistics.median(plateau(x) for x in by_key[(a, h, "fp32")]) for h in grids[a]]
        grid_scores[a] = {f"{h:g}": sc for h, sc in zip(grids[a], scores, strict=True)}
        best[a] = grids[a][scores.index(max(scores))]
        log(f"convergence: {a} best {best[a]:g} of {grid_scores[a]}")
    codec_tasks = [task(a, best[a], c, s) for a in ALGORITHMS for c in CODECS if c != "fp32"
                   for s in cfg.seeds]  # fmt: skip
    log(f"convergence: {len(codec_tasks)} codec runs")
    for tr in _run_all(codec_tasks, workers):
        by_key.setdefault((tr.task.algorithm, tr.task.hyper, tr.task.codec), []).append(tr)
    runs = {(a, c): by_key[(a, best[a], c)] for a in ALGORITHMS for c in CODECS}

    sync = runs[("sync_fedavg", "fp32")]
    targets = {t.task.seed: TARGET_FRACTION * plateau(t) for t in sync}
    records = [_record(a, c, best[a], runs[(a, c)], targets) for a in ALGORITHMS for c in CODECS]
    curves = {f"{a}/{c}": _median_curve(runs[(a, c)]) for a in ALGORITHMS for c in CODECS}

    # plateau check on the median curve: the last 5% against the 5% that ends at 80%
    sc = np.array(curves["sync_fedavg/fp32"]["accuracy"])
    st = np.array(curves["sync_fedavg/fp32"]["time_s"])
    end = st[-1]
    change = float(sc[st >= 0.95 * end].mean() - sc[(st >= 0.75 * end) & (st <= 0.8 * end)].mean())

    def ttt(t: Trace) -> float:
        return first_reach(t, targets[t.task.seed])[0]

    def utt(t: Trace) -> float:
        return first_reach(t, targets[t.task.seed])[1]

    fb = runs[("fedbuff", "fp32")]
    summary: dict[str, Any] = {
        "summary": True,
        "devices": DEVICES,
        "concurrency": CONCURRENCY,
        "sigma": SIGMA,
        "dirichlet_alpha": DIRICHLET_ALPHA,
        "over_selection": OVER_SELECTION,
        "buffer_k": BUFFER_K,
        "seeds": len(cfg.seeds),
        "quick": quick,
        "model": "softmax_regression",
        "client_lr": cfg.client_lr,
        "local_epochs": 1,
        "batch_size": 16,
        "dropout": 0.1,
        "duration_s": cfg.duration_s,
        "eval_every_s": cfg.eval_every_s,
        "lr_grid": list(cfg.lr_grid),
        "alpha_grid": list(cfg.alpha_grid),
        "best": best,
        "grid_scores": grid_scores,
        "best_at_grid_edge": [a for a in ALGORITHMS if best[a] in (grids[a][0], grids[a][-1])],
        "target_accuracy": statistics.median(targets.values()),
        "sync_plateau_change": change,
        "sync_plateaued": abs(change) < PLATEAU_TOLERANCE,
        "fedbuff_speedup_vs_sync": _paired(sync, fb, lambda s, f: _ratio(ttt(s), ttt(f))),
        "fedbuff_uploads_vs_fedasync": _paired(
            runs[("fedasync", "fp32")], fb, lambda a, f: _ratio(utt(a), utt(f))
        ),
        "int8_accuracy_drop": _paired(
            fb, runs[("fedbuff", "int8")], lambda f, q: f.final_accuracy - q.final_accuracy
        ),
        "topk_accuracy_drop": _paired(
            fb, runs[("fedbuff", "topk")], lambda f, q: f.final_accuracy - q.final_accuracy
        ),
        "topk_bytes_ratio": _paired(
            fb,
            runs[("fedbuff", "topk")],
            lambda f, q: _ratio(float(f.bytes[-1]), float(q.bytes[-1])),
        ),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    log(f"convergence: done in {summary['wall_s']} s")
    return Report(records, summary, curves)


# -- output --------------------------------------------------------------------------------
def to_json(report: Report) -> list[dict[str, Any]]:
    """The ``--json`` list: the records, then the one summary record (JSON-safe values)."""
    return [*report.records, report.summary]


def _fmt_t(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.0f}"


def markdown(report: Report) -> str:
    """A README-ready table plus the summary ratios."""
    s = report.summary
    lines = [
        "| algorithm | codec | tuned | final accuracy, median (min-max) | time to target, s "
        "(min-max) | uploads to target | MB uploaded |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report.records:
        lo, hi = r["time_to_target_min_s"], r["time_to_target_max_s"]
        uploads = r["uploads_to_target"]
        lines.append(
            f"| {r['algorithm']} | {r['codec']} | {r['hyperparameter']} {r['value']:g} "
            f"| {r['final_accuracy']:.3f} ({r['final_accuracy_min']:.3f}-"
            f"{r['final_accuracy_max']:.3f}) | {_fmt_t(r['time_to_target_s'])} "
            f"({_fmt_t(lo)}-{_fmt_t(hi)}) | {'-' if uploads is None else f'{uploads:.0f}'} "
            f"| {r['bytes_uploaded'] / 1e6:.1f} |"
        )

    def num(key: str, fmt: str) -> str:
        v = s[key]
        return "n/a" if v is None else format(v, fmt)

    lines += [
        "",
        f"Target accuracy {s['target_accuracy']:.3f} (0.99 x synchronous FedAvg's plateau; "
        f"plateau change over the last 20%: {100 * s['sync_plateau_change']:+.2f} points, "
        f"plateaued: {s['sync_plateaued']}). {s['seeds']} seeds, {s['duration_s']:g} simulated "
        f"seconds per run. Medians of per-seed ratios: FedBuff speed-up vs sync "
        f"{num('fedbuff_speedup_vs_sync', '.2f')}x; FedAsync uploads / FedBuff uploads to "
        f"target {num('fedbuff_uploads_vs_fedasync', '.2f')}x; FedBuff accuracy drop int8 "
        f"{num('int8_accuracy_drop', '+.4f')}, top-k {num('topk_accuracy_drop', '+.4f')}; "
        f"fp32/top-k bytes {num('topk_bytes_ratio', '.1f')}x.",
    ]
    return "\n".join(lines)


def plot(report: Report, path: str | os.PathLike[str]) -> None:
    """PNG: median accuracy against simulated time and against MB uploaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"fp32": "-", "int8": "--", "topk": ":"}
    colours = {"sync_fedavg": "tab:blue", "fedbuff": "tab:orange", "fedasync": "tab:green"}
    for key, c in report.curves.items():
        algorithm, codec = key.split("/")
        kw = {"ls": styles[codec], "color": colours[algorithm], "label": key, "lw": 1.2}
        ax_t.plot(c["time_s"], c["accuracy"], **kw)
        ax_b.plot(c["mb"], c["accuracy"], **kw)
    target = report.summary["target_accuracy"]
    lo = max(0.0, target - 0.15)
    for ax, xlabel in ((ax_t, "simulated time (s)"), (ax_b, "MB uploaded")):
        ax.axhline(target, color="grey", lw=0.8, ls="-.", label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (median over seeds)")
        ax.set_ylim(lo, 1.0)
        ax.grid(alpha=0.3)
    ax_b.set_xscale("log")
    ax_t.legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"digits, {DEVICES} devices, concurrency {CONCURRENCY}, sigma {SIGMA:g}, "
        f"Dirichlet {DIRICHLET_ALPHA:g}, {report.summary['seeds']} seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
