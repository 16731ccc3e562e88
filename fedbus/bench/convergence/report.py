"""The convergence report: tune every algorithm on the metric reported, then compare.

Protocol (all of it here and in :mod:`.selection`, so a reader can check it):

- **Setting.** :data:`~.setting.STANDARD`: digits over 300 devices, Dirichlet(0.3) labels,
  100 devices training at every moment, per-device slowness lognormal(0, 1), per-job jitter
  and network delay, 10% dropouts, softmax regression, one local epoch, batch 16, one
  client learning rate for all. Synchronous FedAvg over-selects 130% and closes each round
  at the first 100 uploads; FedBuff buffers K = 10 with Polynomial(0.5) staleness weights.
- **Grids.** One log grid of server learning rates (0.125 to 512) for synchronous FedAvg and
  FedBuff, FedAsync's mixing weight on 0.05 to 1 (capped at 1), Adam's on 1e-4 to 0.3. Each
  algorithm runs with each server optimiser (plain, momentum 0.9, Adam): plain on the full
  grid and every seed; momentum and Adam by local search on the first
  :data:`OPTIMISER_SEEDS` seeds, each algorithm's winner then on every seed.
- **Target.** Per seed, 0.99 x the plateau of plain synchronous FedAvg at its best value by
  plateau (the plateau: mean accuracy over the last 20% of the budget).
- **Rule.** See :mod:`.selection`: fastest median on the reported metric among values
  whose plateau reaches the target in most seeds (plateau checked per seed), trailing-mean
  crossing, a choice on a grid edge marks the run invalid. Final-accuracy-tuned figures
  are reported beside, labelled.
- **Codecs.** int8 and top-k 5% + int8 (error feedback on every device), run on FedBuff at
  the value chosen on time and at the value chosen on final accuracy; the drop is the paired
  difference of plateaus. Bytes are reported as payloads and as whole messages (a real
  envelope encoded, and split by field). The downlink is counted per job (a device fetches
  the model when a job starts), fp32, int8 and int4; the both-ways figures describe the
  fewest bytes (top-k up, int4 down).
- **Publication.** FedBuff at its time-chosen lr with the worker's publication coalesced to
  one per interval (:mod:`.publication`): staleness, plateau and time to target per interval.
- **Rows.** The MLP, more local work and a paper-like regime, each tuned by the same rule on
  fewer seeds; label ownership by slow devices and a sensitivity table at the standard
  setting's choices (labelled untuned).
- **Statistics.** Medians over seeds, min-max ranges; ratios paired per seed, then the median.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from fedbus.bench.convergence import overhead, publication
from fedbus.bench.convergence import selection as sel
from fedbus.bench.convergence.setting import (
    ADAM_GRID,
    ALGORITHMS,
    ALPHA_GRID,
    CODECS,
    DOWN_CODECS,
    LR_GRID,
    MOMENTUM,
    PUBLISH_INTERVALS,
    STANDARD,
    Setting,
    Task,
    Trace,
    cached_run,
    grid,
    hyperparameter,
    make_model,
    model_overhead,
    update_overhead,
    world,
)
from fedbus.bench.convergence.study import (
    Runner,
    Spec,
    Study,
    finite,
    mean_tail,
    median,
    paired,
    search,
    worst_class,
)

HEADLINE_SEEDS = 10
OPTIMISER_SEEDS = 5
"""Momentum and Adam are searched on the first 5 seeds (the 2-core budget); the optimiser
each algorithm does best with is then run on all the headline's seeds."""
ROW_SEEDS = 3
PLAIN: tuple[Spec, ...] = tuple((a, "plain") for a in ALGORITHMS)
FEDBUFF: Spec = ("fedbuff", "plain")
CODEC_RUNS = (("int8", "fp32"), ("topk", "fp32"), ("topk", "int8"), ("fp32", "int4"),
              ("topk", "int4"))  # fmt: skip
"""(update codec, model codec) pairs run on FedBuff at its time- and accuracy-chosen lrs."""
BEST_TOTAL = ("topk", "int4")
"""The configuration the both-ways figures (``total_*``) describe: the fewest bytes per job."""
ADAM_STARTS = {
    "sync_fedavg": (1e-2, 3e-2, 0.1),
    "fedbuff": (3e-3, 1e-2, 3e-2),
    "fedasync": (3e-4, 1e-3, 3e-3),
}
"""Where Adam's search starts: FedBuff makes ~20x, FedAsync ~200x more versions a second
than synchronous FedAvg, and Adam's step is per version. The search moves from there."""

# the extra rows: each changes one thing of the standard setting (or a few, named)
MLP_ROW = replace(STANDARD, name="mlp", model="mlp")
DRIFT_ROW = replace(
    STANDARD, name="drift_5_epochs_100_devices", devices=100, concurrency=33, epochs=5
)
"""More local work: 100 devices hold ~14 examples each and run 5 epochs (a third of the
fleet in flight, as in the standard setting)."""
PAPER_ROW = replace(
    STANDARD,
    name="paper_regime",
    devices=3000,
    concurrency=300,
    data="synthetic",
    examples_per_device=20,
    duration_s=300.0,
)
"""Towards the FedBuff paper's regime: 300 in flight over 3,000 devices, a larger problem
(synthetic, 100 features, 20 classes, 60,000 examples). The paper's own figure is at about
1,000 in flight; this is the low end of its range, sized for a 2-core machine."""
PAPER_SEEDS = 2
PAPER_1000_ROW = replace(PAPER_ROW, name="paper_regime_1000", devices=10_000, concurrency=1000)
"""The paper's own concurrency: 1,000 in flight over 10,000 devices (200,000 examples). Its
search starts where the 300-in-flight row's choices are."""
SLOW_LABELS_ROW = replace(STANDARD, name="slow_devices_own_labels_8_9", slow_labels=(8, 9))
SENSITIVITY: tuple[Setting, ...] = (
    replace(STANDARD, name="sigma_0.5", sigma=0.5),
    replace(STANDARD, name="sigma_2", sigma=2.0),
    replace(STANDARD, name="concurrency_30", concurrency=30),
    replace(STANDARD, name="concurrency_200", concurrency=200),
    replace(STANDARD, name="dirichlet_0.1", dirichlet_alpha=0.1),
    replace(STANDARD, name="dirichlet_10", dirichlet_alpha=10.0),
)


@dataclass
class Report:
    """The records, the one summary, and median curves for the plot."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    lr_table: dict[str, dict[float, float | None]] = field(default_factory=dict)


# -- running -------------------------------------------------------------------------------
def _runner(pool: ProcessPoolExecutor | None, cache: str | None) -> Runner:
    def run(tasks: list[Task]) -> list[Trace]:
        """Order-preserving, so the report does not depend on the number of workers."""
        fn = partial(cached_run, cache=cache)
        if pool is None or len(tasks) <= 1:
            return [fn(t) for t in tasks]
        return list(pool.map(fn, tasks, chunksize=1))

    return run


# -- records -------------------------------------------------------------------------------
def _neighbourhood(g: Sequence[float], v: float | None) -> tuple[float, ...]:
    if v is None:
        return (g[len(g) // 2],)
    i = g.index(v)
    return tuple(g[max(0, i - 1) : i + 2])


def _record(
    study: Study, spec: Spec, value: float, traces: list[Trace], rule: str, codec: str, down: str
) -> dict[str, Any]:
    s = study.setting
    tg = study.targets()
    times = [study.metric(t, "time", tg[t.task.seed]) for t in traces]
    ups = [study.metric(t, "uploads", tg[t.task.seed]) for t in traces]
    model = make_model(s.model, *_shape(s))
    n = model.n_params
    up_ovh = update_overhead(CODECS[codec], n)
    down_ovh = model_overhead(DOWN_CODECS[down], s.model, *_shape(s))
    payload_up = median(float(t.bytes[-1]) for t in traces)
    msg_up = median(float(t.bytes[-1] + t.uploads[-1] * up_ovh) for t in traces)
    payload_down = median(float(t.down_bytes[-1]) for t in traces)
    msg_down = median(float(t.down_bytes[-1] + t.jobs * down_ovh) for t in traces)
    jobs = median(float(t.jobs) for t in traces)
    plateaus = [mean_tail(t) for t in traces]
    return {
        "setting": s.name,
        "algorithm": spec[0],
        "optimiser": spec[1],
        "rule": rule,
        "hyperparameter": hyperparameter(*spec),
        "value": value,
        "codec": codec,
        "down_codec": down,
        "final_accuracy": median(t.final_accuracy for t in traces),
        "final_accuracy_min": min(t.final_accuracy for t in traces),
        "final_accuracy_max": max(t.final_accuracy for t in traces),
        "plateau_accuracy": median(plateaus),
        "plateau_accuracy_min": min(plateaus),
        "worst_class_accuracy": median(worst_class(t) for t in traces),
        "time_to_target_s": finite(median(times)),
        "time_to_target_min_s": finite(min(times)),
        "time_to_target_max_s": finite(max(times)),
        "uploads_to_target": finite(median(ups)),
        "seeds": len(traces),
        "seeds_reaching_target": sum(study.reaches(t, tg[t.task.seed]) for t in traces),
        "seeds_plateaued": sum(sel.has_plateaued(t.time, t.accuracy) for t in traces),
        "uploads": int(median(float(t.uploads[-1]) for t in traces)),
        "jobs": int(jobs),
        "bytes_uploaded": int(payload_up),
        "message_bytes_uploaded": int(msg_up),
        "downlink_bytes": int(payload_down),
        "downlink_message_bytes": int(msg_down),
        "total_bytes": int(median(float(t.bytes[-1] + t.down_bytes[-1]) for t in traces)),
        "total_message_bytes": int(
            median(
                float(t.bytes[-1] + t.uploads[-1] * up_ovh + t.down_bytes[-1] + t.jobs * down_ovh)
                for t in traces
            )
        ),
        "update_envelope_overhead_bytes": up_ovh,
        "model_envelope_overhead_bytes": down_ovh,
    }


def _shape(s: Setting) -> tuple[int, int]:
    fleet = world(s, 0)[0]
    return fleet.n_features, fleet.n_classes


def _median_curve(traces: list[Trace]) -> dict[str, list[float]]:
    g = traces[0].time
    acc = np.median([np.interp(g, t.time, t.accuracy) for t in traces], axis=0)
    return {"time_s": g.tolist(), "accuracy": acc.tolist()}


# -- the pieces of the summary -------------------------------------------------------------
def _best(
    study: Study, algorithm: str, optimisers: Sequence[str], metric: str
) -> tuple[Spec, sel.Choice] | None:
    """The fastest optimiser of ``algorithm`` (each at its choice on ``metric``)."""
    options = [((algorithm, o), study.choice((algorithm, o), metric)) for o in optimisers]
    options = [(s, c) for s, c in options if c.value is not None]
    return min(options, key=lambda sc: sc[1].median) if options else None


def _ratio(
    study: Study, num: tuple[Spec, float], den: tuple[Spec, float], metric: str
) -> tuple[float | None, float | None]:
    return paired(study.per_seed(*num, metric), study.per_seed(*den, metric))


def _speedup(
    study: Study,
    optimisers: Sequence[str],
    metric: str = "time",
    num_alg: str = "sync_fedavg",
    den_alg: str = "fedbuff",
) -> tuple[float | None, float | None, list[Spec]]:
    """Best ``num_alg`` over best ``den_alg`` on ``metric`` (paired), and the specs used."""
    a = _best(study, num_alg, optimisers, metric)
    b = _best(study, den_alg, optimisers, metric)
    if a is None or b is None:
        return None, None, []
    assert a[1].value is not None and b[1].value is not None
    med, lo = _ratio(study, (a[0], a[1].value), (b[0], b[1].value), metric)
    return med, lo, [a[0], b[0]]


def _choices_inside(study: Study, specs: Sequence[Spec]) -> list[str]:
    """Names of the choices that sit on a grid edge (or do not exist)."""
    bad = []
    for spec in specs:
        for m in ("time", "uploads"):
            c = study.choice(spec, m)
            if not c.inside_grid:
                bad.append(f"{study.setting.name}/{spec[0]}/{spec[1]}/{m}={c.value}")
        f = study.final_choice(spec)
        if not f.inside_grid:
            bad.append(f"{study.setting.name}/{spec[0]}/{spec[1]}/final={f.value}")
    return bad


CodecRuns = dict[tuple[Spec, float, str, str], list[Trace]]


def _codec_runs(
    study: Study, values: dict[Spec, set[float]], runner: Runner, extra: Sequence[tuple[str, str]]
) -> CodecRuns:
    """Runs of ``extra`` (codec, down codec) pairs at each spec's ``values``."""
    keys = [(spec, v, c, d) for spec, vs in values.items() for v in sorted(vs) for c, d in extra]
    tasks = [
        Task(s[0], s[1], v, c, seed, study.setting, d)
        for s, v, c, d in keys
        for seed in study.seeds
    ]
    out = runner(tasks)
    n = len(study.seeds)
    return {k: out[i * n : (i + 1) * n] for i, k in enumerate(keys)}


def _drop(base: list[Trace], other: list[Trace]) -> float:
    """Median over seeds of the paired plateau difference (a fraction: 0.001 = 0.1 point)."""
    return median(mean_tail(a) - mean_tail(b) for a, b in zip(base, other, strict=True))


def _bytes_ratio(base: list[Trace], other: list[Trace], f: Callable[[Trace], float]) -> float:
    return median(f(a) / f(b) for a, b in zip(base, other, strict=True))


# -- the report ----------------------------------------------------------------------------
def run(
    seeds: int = HEADLINE_SEEDS,
    quick: bool = False,
    log: Callable[[str], None] = print,
    workers: int = 0,
    cache: str | None = None,
    rows: bool = True,
    row_seeds: int = ROW_SEEDS,
    only: Collection[str] | None = None,
) -> Report:
    """Tune, compare, run the codecs and the extra rows; summarise.

    ``quick`` keeps the world and shortens the rest (2 seeds, 60 simulated seconds, plain
    optimisers at one grid value each, no extra rows) for tests and CI: its figures are not the
    report's. ``workers`` = 0 uses up to 2 processes; results do not depend on it.
    ``cache``: a directory where each run's trace is kept and reused (a run is a pure
    function of its task). ``only``: run just these extra rows (by key).
    """
    if seeds < 1:
        raise ValueError("need at least one seed")
    if workers <= 0:
        workers = min(2, os.cpu_count() or 1)
    started = time.perf_counter()
    setting = replace(STANDARD, duration_s=60.0) if quick else STANDARD
    n_seeds = min(seeds, 2) if quick else seeds
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        runner = _runner(pool, cache)
        return _report(
            setting,
            tuple(range(n_seeds)),
            quick,
            rows and not quick,
            tuple(range(min(row_seeds, n_seeds))),
            runner,
            log,
            started,
            only,
        )
    finally:
        if pool is not None:
            pool.shutdown()


def _report(
    setting: Setting,
    seeds: tuple[int, ...],
    quick: bool,
    rows: bool,
    row_seeds: tuple[int, ...],
    runner: Runner,
    log: Callable[[str], None],
    started: float,
    only: Collection[str] | None,
) -> Report:
    std = Study(setting, seeds, runner)
    optimisers: tuple[str, ...] = ("plain",) if quick else ("plain", "momentum", "adam")
    opt = Study(setting, seeds[:OPTIMISER_SEEDS], runner)
    if quick:
        starts = {
            ("sync_fedavg", "plain"): (16.0,),
            ("fedbuff", "plain"): (8.0,),
            ("fedasync", "plain"): (0.6,),
        }
        std.ensure((*s, v) for s, vs in starts.items() for v in vs)
    else:
        log(f"convergence: standard setting, plain optimisers, full grids, {len(seeds)} seeds")
        search(std, {s: grid(*s) for s in PLAIN}, log)
    specs = [(a, o) for a in ALGORITHMS for o in optimisers]

    # codecs (FedBuff, plain) at the time- and final-chosen values; the downlink; publication
    t_fb, f_fb = std.choice(FEDBUFF, "time").value, std.final_choice(FEDBUFF).value
    extra = sections(std, t_fb, f_fb, runner, log)

    if not quick:
        # momentum and Adam: searched on the first seeds, the winners then run on all
        for k, trs in std.traces.items():
            opt.traces[k] = trs[: len(opt.seeds)]
        later: dict[Spec, tuple[float, ...]] = {}
        for a in ALGORITHMS:
            later[(a, "momentum")] = _neighbourhood(
                grid(a, "momentum"), _chosen(std, (a, "plain"))[0]
            )
            later[(a, "adam")] = ADAM_STARTS[a]
        log(f"convergence: momentum and Adam on {len(opt.seeds)} seeds")
        search(opt, later, log)
        confirm = set()
        for a in ALGORITHMS:
            for m in ("time", "uploads"):
                best = _best(opt, a, optimisers, m)
                if best is not None and best[0][1] != "plain" and best[1].value is not None:
                    confirm.add((*best[0], best[1].value))
        log(f"convergence: the best optimisers on all {len(seeds)} seeds: {sorted(confirm)}")
        std.ensure(sorted(confirm))

    records: list[dict[str, Any]] = []
    lr_table: dict[str, dict[float, float | None]] = {}
    for spec in specs:
        study = std if spec[1] == "plain" else opt
        col: dict[float, float | None] = {}
        for v in study.values(spec):
            trs = study.traces[(*spec, v)]
            r = _record(study, spec, v, trs, "grid", "fp32", "fp32")
            records.append(r)
            col[v] = r["time_to_target_s"] if 2 * r["seeds_reaching_target"] > len(trs) else None
        lr_table[f"{spec[0]}/{spec[1]}"] = col
    curves: dict[str, dict[str, list[float]]] = {}
    for spec in specs:
        study = std if spec[1] == "plain" else opt
        choices = (
            ("time", study.choice(spec, "time")),
            ("uploads", study.choice(spec, "uploads")),
            ("final", study.final_choice(spec)),
        )
        for rule, c in choices:
            if c.value is None:
                continue
            trs = study.traces[(*spec, c.value)]
            records.append(_record(study, spec, c.value, trs, rule, "fp32", "fp32"))
        if spec[1] != "plain":
            for v in std.values(spec):  # the winners, confirmed on every seed
                trs = std.traces[(*spec, v)]
                records.append(_record(std, spec, v, trs, "confirmed", "fp32", "fp32"))
        for v in std.values(spec):
            c = std.choice(spec, "time")
            if c.value == v:
                curves[f"{spec[0]}/{spec[1]}/time"] = _median_curve(std.traces[(*spec, v)])
    records += extra.records
    for (_, v, up, down), trs in extra.codec.items():
        if v == t_fb:
            curves[f"fedbuff/plain/time/{up}+down_{down}"] = _median_curve(trs)

    summary = _summary(std, opt, seeds, quick, specs, optimisers)
    summary.update(extra.summary)
    if rows:
        summary.update(_rows(std, row_seeds, runner, log, records, only))
    summary["optima_inside_grid_standard"] = not summary["chosen_on_grid_edge"]
    # FedAsync's alpha cannot exceed 1 (its definition): a choice there is at a cap, not at a
    # grid artefact. It still makes optima_inside_grid false; this key says whether that is
    # the only reason.
    edges = summary["chosen_on_grid_edge"] + summary.get("chosen_on_grid_edge_rows", [])
    at_cap = [e for e in edges if "/fedasync/" in e and e.endswith("=1.0")]
    summary["chosen_at_fedasync_cap"] = at_cap
    summary["optima_inside_grid_except_fedasync_cap"] = len(at_cap) == len(edges)
    summary["optima_inside_grid"] = not (
        summary["chosen_on_grid_edge"] or summary.get("chosen_on_grid_edge_rows")
    )
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    log(f"convergence: done in {summary['wall_s']} s")
    return Report(records, summary, curves, lr_table)


def _summary(
    std: Study,
    opt: Study,
    seeds: tuple[int, ...],
    quick: bool,
    specs: list[Spec],
    optimisers: Sequence[str],
) -> dict[str, Any]:
    s = std.setting
    tg = std.targets()
    ref = std.reference()
    changes = [sel.plateau_change(t.time, t.accuracy) for t in ref]
    speed, speed_min, used = _speedup(std, optimisers)
    plain_speed, plain_min, _ = _speedup(std, ("plain",))
    # the old rule: each at its best final accuracy (plain optimisers), same crossing
    fs, ff = std.final_choice(("sync_fedavg", "plain")), std.final_choice(("fedbuff", "plain"))
    final_tuned = None
    if fs.value is not None and ff.value is not None:
        final_tuned = _ratio(
            std, (("sync_fedavg", "plain"), fs.value), (("fedbuff", "plain"), ff.value), "time"
        )[0]
    up_async, _, _ = _speedup(std, optimisers, "uploads", "fedasync", "fedbuff")
    up_sync, _, _ = _speedup(std, optimisers, "uploads", "sync_fedavg", "fedbuff")
    up_sync_plain, _, _ = _speedup(std, ("plain",), "uploads", "sync_fedavg", "fedbuff")

    out: dict[str, Any] = {
        "summary": True,
        "setting": s.name,
        "devices": s.devices,
        "concurrency": s.concurrency,
        "sigma": s.sigma,
        "dirichlet_alpha": s.dirichlet_alpha,
        "over_selection": s.over_selection,
        "buffer_k": s.buffer_k,
        "seeds": len(seeds),
        "quick": quick,
        "model": "softmax_regression",
        "client_lr": s.client_lr,
        "local_epochs": s.epochs,
        "batch_size": s.batch_size,
        "dropout": s.dropout,
        "duration_s": s.duration_s,
        "eval_every_s": s.eval_every_s,
        "lr_grid": list(LR_GRID),
        "alpha_grid": list(ALPHA_GRID),
        "alpha_cap": 1.0,
        "adam_grid": list(ADAM_GRID),
        "momentum": MOMENTUM,
        "crossing_window": std.crossing_window,
        "target_fraction": 0.99,
        "target_accuracy": median(tg.values()),
        "target_set_by": f"sync_fedavg/plain at {std.final_choice(('sync_fedavg', 'plain')).value}",
        "sync_plateau_change_max": max(changes),
        "sync_plateaued": all(c < sel.PLATEAU_TOLERANCE for c in changes),
        "chosen": {
            f"{a}/{o}": {
                "time": (std if o == "plain" else opt).choice((a, o), "time").value,
                "uploads": (std if o == "plain" else opt).choice((a, o), "uploads").value,
                "final": (std if o == "plain" else opt).final_choice((a, o)).value,
            }
            for a, o in specs
        },
        "optimiser_seeds": len(opt.seeds),
        "chosen_on_grid_edge": _choices_inside(std, [x for x in specs if x[1] == "plain"])
        + _choices_inside(opt, [x for x in specs if x[1] != "plain"]),
        "fedbuff_speedup_vs_sync": speed,
        "fedbuff_speedup_min_seed": speed_min,
        "fedbuff_speedup_compares": [f"{a}/{o}" for a, o in used],
        "fedbuff_speedup_vs_sync_plain": plain_speed,
        "fedbuff_speedup_min_seed_plain": plain_min,
        "fedbuff_speedup_vs_sync_final_tuned": final_tuned,
        "fedbuff_uploads_vs_fedasync": up_async,
        "fedbuff_uploads_vs_sync": up_sync,
        "fedbuff_uploads_vs_sync_plain": up_sync_plain,
    }
    return out


@dataclass
class Sections:
    """The codec, downlink and publication sections: their records, summary keys, runs."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    codec: CodecRuns


def sections(
    std: Study,
    time_value: float | None,
    final_value: float | None,
    runner: Runner,
    log: Callable[[str], None],
) -> Sections:
    """FedBuff (plain) with each of :data:`CODEC_RUNS` at the lrs chosen on time and on
    final accuracy, and at the time-chosen lr with each publication interval. Needs only
    those lrs' fp32 runs and the target's runs in ``std``, so stored results can gain these
    sections without the search (:mod:`.merge`)."""
    log("convergence: codec and downlink runs")
    values = {FEDBUFF: {v for v in (time_value, final_value) if v is not None}}
    codec = _codec_runs(std, values, runner, CODEC_RUNS)
    records = [
        _record(std, spec, v, trs, "time" if v == time_value else "final", up, down)
        for (spec, v, up, down), trs in codec.items()
    ]
    summary = codec_summary(std, codec, time_value, final_value)
    value, chosen_on = (time_value, "time") if time_value is not None else (final_value, "final")
    if value is not None:
        log(f"convergence: publication intervals {PUBLISH_INTERVALS}")
        found = publication.runs(std, value, runner)
        for i, trs in found.items():
            r = _record(std, FEDBUFF, value, trs, "publication", "fp32", "fp32")
            r["publish_interval_s"] = i
            r.update(publication.staleness_stats(trs))
            records.append(r)
        retuned = publication.retune_runs(std, value, runner)
        summary["publication"] = publication.summary(std, value, found, retuned)
        summary["publication"]["chosen_on"] = chosen_on
    return Sections(records, summary, codec)


def codec_summary(
    std: Study, codec: CodecRuns, time_value: float | None, final_value: float | None
) -> dict[str, Any]:
    """Codec drops and bytes for FedBuff (plain) at the lrs chosen on time and on final
    accuracy; the both-ways figures (``total_*``) for :data:`BEST_TOTAL`, those of an int8
    model download beside them (suffix ``_down_int8``)."""
    s = std.setting
    fb = FEDBUFF
    n = world(s, 0)[1].n_params
    ovh = {k: update_overhead(CODECS[k], n) for k in CODECS}
    dovh = {k: model_overhead(DOWN_CODECS[k], s.model, *_shape(s)) for k in DOWN_CODECS}
    out: dict[str, Any] = {"total_bytes_config": f"{BEST_TOTAL[0]} up, {BEST_TOTAL[1]} model down"}

    def total(t: Trace) -> float:  # payload bytes, both ways, per job
        return float(t.bytes[-1] + t.down_bytes[-1]) / t.jobs

    def total_msg(t: Trace) -> float:
        up = t.bytes[-1] + t.uploads[-1] * ovh[t.task.codec]
        down = t.down_bytes[-1] + t.jobs * dovh[t.task.down]
        return float(up + down) / t.jobs

    def msg_up(t: Trace) -> float:
        return float(t.bytes[-1] + t.uploads[-1] * ovh[t.task.codec])

    for rule, v in (("", time_value), ("_accuracy_chosen", final_value)):
        if v is None:
            continue
        base = std.traces[(*fb, v)]
        i8 = codec[(fb, v, "int8", "fp32")]
        tk = codec[(fb, v, "topk", "fp32")]
        both = codec[(fb, v, *BEST_TOTAL)]
        both8 = codec[(fb, v, "topk", "int8")]
        out[f"int8_accuracy_drop{rule}"] = _drop(base, i8)
        out[f"topk_accuracy_drop{rule}"] = _drop(base, tk)
        out[f"int4_download_accuracy_drop{rule}"] = _drop(base, codec[(fb, v, "fp32", "int4")])
        out[f"total_bytes_accuracy_drop{rule}"] = _drop(base, both)
        out[f"total_bytes_accuracy_drop_down_int8{rule}"] = _drop(base, both8)
        if rule:
            continue
        out["topk_bytes_ratio"] = _bytes_ratio(base, tk, lambda t: float(t.bytes[-1]))
        out["topk_message_bytes_ratio"] = _bytes_ratio(base, tk, msg_up)
        out["total_bytes_per_job_fp32"] = median(total(t) for t in base)
        out["total_message_bytes_per_job_fp32"] = median(total_msg(t) for t in base)
        for suffix, runs in (("", both), ("_down_int8", both8)):
            out[f"total_bytes_ratio{suffix}"] = _bytes_ratio(base, runs, total)
            out[f"total_message_bytes_ratio{suffix}"] = _bytes_ratio(base, runs, total_msg)
            out[f"total_bytes_per_job_compressed{suffix}"] = median(total(t) for t in runs)
            out[f"total_message_bytes_per_job_compressed{suffix}"] = median(
                total_msg(t) for t in runs
            )
        out["update_envelope_overhead_bytes"] = ovh
        out["model_envelope_overhead_bytes"] = dovh
        out["envelope_overhead_split"] = _overhead_split(s, n)
    return out


def _overhead_split(s: Setting, n: int) -> dict[str, Any]:
    """Field by field, the messages of the compressed configuration (see :mod:`.overhead`)."""
    model = make_model(s.model, *_shape(s))
    up, down = CODECS[BEST_TOTAL[0]], DOWN_CODECS[BEST_TOTAL[1]]
    return {
        "update": overhead.summarise(overhead.update_split(up, n), up.raw_size(n)),
        "model": overhead.summarise(
            overhead.model_split(down, model.wire_layout(), model.init_params(0)),
            down.raw_size(n),
        ),
    }


def _chosen(std: Study, spec: Spec) -> tuple[float, ...]:
    """The value the standard setting chose on time (the grid's middle when none)."""
    v = std.choice(spec, "time").value
    g = grid(*spec)
    return (g[len(g) // 2],) if v is None else (v,)


def _rows(
    std: Study,
    seeds: tuple[int, ...],
    runner: Runner,
    log: Callable[[str], None],
    records: list[dict[str, Any]],
    only: Collection[str] | None,
) -> dict[str, Any]:
    """The rows beyond the headline. The MLP, drift and paper-regime rows are tuned by the
    same rule on fewer seeds; the label-ownership and sensitivity rows run each algorithm
    at the value the standard setting chose on time (labelled ``tuned: false``): they ask
    how the ranking moves when the world does, at a fraction of the cost."""
    start = {spec: _neighbourhood(grid(*spec), std.choice(spec, "time").value) for spec in PLAIN}
    low = (0.5, 1.0, 2.0)  # the MLP and the synthetic problem diverge at the standard's rates
    out: dict[str, Any] = {"row_seeds": len(seeds), "paper_regime_seeds": PAPER_SEEDS}
    edges: list[str] = []
    sens: list[dict[str, Any]] = []
    paper: dict[Spec, tuple[float, ...]] = {
        ("sync_fedavg", "plain"): low,
        ("sync_fedavg", "momentum"): low,
        ("fedbuff", "plain"): low,
    }
    mlp: dict[Spec, tuple[float, ...]] = {("sync_fedavg", "plain"): low, ("fedbuff", "plain"): low}
    drift = {spec: start[spec] for spec in (("sync_fedavg", "plain"), ("fedbuff", "plain"))}
    fixed = {spec: _chosen(std, spec) for spec in PLAIN}
    rows: list[tuple[str, Setting, dict[Spec, tuple[float, ...]], tuple[int, ...], bool]] = [
        ("high_concurrency", PAPER_ROW, paper, seeds[:PAPER_SEEDS], True),
        ("high_concurrency_1000", PAPER_1000_ROW, paper, seeds[:PAPER_SEEDS], True),
        ("mlp", MLP_ROW, mlp, seeds, True),
        ("drift", DRIFT_ROW, drift, seeds, True),
        ("slow_labels", SLOW_LABELS_ROW, fixed, seeds, False),
    ] + [(f"sensitivity_{x.name}", x, fixed, seeds, False) for x in SENSITIVITY]
    done: dict[str, Study] = {}
    for key, setting, starts, row_seeds, tuned in rows:
        if only is not None and key not in only:
            continue
        st = Study(setting, row_seeds, runner)
        if key == "high_concurrency_1000" and "high_concurrency" in done:
            prev = done["high_concurrency"]
            starts = {spec: _neighbourhood(grid(*spec), prev.choice(spec, "time").value)
                      for spec in starts}  # fmt: skip
        done[key] = st
        if tuned:
            search(st, starts, log)
        else:
            log(f"convergence: {setting.name} at the standard setting's choices")
            st.ensure((*spec, v) for spec, vs in starts.items() for v in vs)
        specs = list(starts)
        for spec in specs:
            for rule, c in (("time", st.choice(spec, "time")), ("final", st.final_choice(spec))):
                if c.value is not None:
                    trs = st.traces[(*spec, c.value)]
                    records.append(_record(st, spec, c.value, trs, rule, "fp32", "fp32"))
        if tuned:
            edges += _choices_inside(st, specs)
        opts = ("plain", "momentum") if key.startswith("high_concurrency") else ("plain",)
        sp, sp_min, used = _speedup(st, opts)
        ups, _, _ = _speedup(st, opts, "uploads")
        asy, _, _ = _speedup(st, ("plain",), "time", "fedasync", "fedbuff")
        times: dict[str, sel.Choice] = {}
        fastest_spec: dict[str, Spec] = {}
        for a in ALGORITHMS:  # each algorithm at its fastest optimiser run in this row
            best = _best(st, a, [o for a2, o in specs if a2 == a], "time")
            times[a] = best[1] if best is not None else sel.Choice(None, math.inf, False)
            if best is not None:
                fastest_spec[a] = best[0]
        winner = (
            min((c.median, a) for a, c in times.items())[1]
            if any(c.value is not None for c in times.values())
            else None
        )
        row = {
            "row": key,
            "setting": setting.name,
            "tuned": tuned,
            "seeds": len(row_seeds),
            "fedbuff_speedup_vs_sync": sp,
            "fedbuff_speedup_min_seed": sp_min,
            "fedbuff_uploads_vs_sync": ups,
            "fedasync_time_over_fedbuff": asy,
            "compares": [f"{a}/{o}" for a, o in used],
            "fastest": winner,
            "time_to_target_s": {
                a: finite(c.median) for a, c in times.items() if any(x[0] == a for x in specs)
            },
            "target_accuracy": median(st.targets().values()),
        }
        if key == "slow_labels":
            row["worst_class_accuracy"] = {
                a: median(worst_class(t) for t in st.traces[(*fastest_spec[a], c.value)])
                for a, c in times.items()
                if c.value is not None
            }
        if key.startswith("sensitivity_"):
            sens.append(row)
        else:
            out[f"{key}_fedbuff_speedup_vs_sync"] = sp
            out[f"{key}_row"] = row
    out["sensitivity"] = sens
    out["chosen_on_grid_edge_rows"] = edges
    return out
