"""The attacks report (``fedbus bench attacks``): poisoned devices against FedBuff's defences.

The fleet is the convergence report's standard setting (:mod:`fedbus.bench.convergence`:
digits over 300 devices, Dirichlet(0.3), concurrency 100, lognormal speeds, 10% dropouts,
softmax regression, client lr 0.3) and the server is FedBuff there: K = 10, Polynomial(0.5)
staleness, server SGD at the convergence report's tuned lr (:data:`SERVER_LR`). Runs are
:data:`DURATION_S` simulated seconds, not 1500: the whole matrix must fit a short run, and
by then FedBuff is within about a point of its 1500 s plateau.

Attackers are a random ``fraction`` of the devices (drawn per seed). They take part like any
other device (same speeds, same dropouts) and upload, instead of their honest delta ``u``:

- ``scaled``: ``SCALE * u`` where ``u`` was trained on flipped labels ``9 - y``: a poisoned
  update boosted to survive averaging (model replacement, the "scaling attack" of the
  robust-aggregation literature; a boosted *honest* update barely hurts this convex model:
  x100 at 20% costs about 2.5 points undefended);
- ``sign_flip``: ``-SIGN_FLIP * u`` (reversed and magnified, so that at 20% the mean step
  points away from the honest one: a plain ``-u`` only slows learning);
- ``gaussian``: ``N(0, NOISE_STD^2 I)``, pure noise of about a hundred honest norms;
- ``label_flip``: an honest update trained on labels ``9 - y``;
- ``sybil``: *one* producer posing as many clients, as on a Kafka broker without
  authentication. One attacker device, besides its own (sign-flipped) uploads, injects after
  each honest upload, with probability ``f / (1 - f)``, a sign-flipped update freshly trained
  from the current model on its own shard, under the id of a random other device, so that
  forged ids make a fraction ``f`` of the uploads (fresh, so unlike the other attackers'
  uploads they carry staleness 0 and full weight). Every forged message goes through the
  worker's real ingest (:class:`fedbus.ingest.Ingest`) as a Kafka record keyed by the forged
  id: with ``identity`` binding the transport reports the SASL principal, and ingest refuses
  the mismatch (``client_mismatch``); without it the forgery is accepted.

Defences are FedBuff's own options: ``clip`` (norm bound C per update), ``median`` and
``trimmed_mean`` (coordinate-wise over the buffer's K weighted deltas), plus ``identity`` for
the sybil attack. Each defence's server lr is part of its grid (``SERVER_LR * K / 10``
times a factor): clipping and robust statistics both shrink the step.

Protocol (all of it here, so a reader can check it):

- **Tuning.** Each defence has a small grid (:data:`GRID`). Every value is run on a tuning
  seed (:data:`TUNE_SEED`, not one of the reported seeds) clean and under each attack at
  20% but the sybil (identity binding answers it, not statistics), and scored by its
  *worst* plateau accuracy (mean over the last 20% of the run) over those runs: a defender
  does not know the attack, so one value per defence, no per-attack tuning. The whole grid
  is reported.
- **Report.** At the chosen values, every attack at 10% and 20% with each defence, and every
  defence on the clean fleet, on seeds ``0..n-1``. ``clean_accuracy`` is the undefended
  clean run on the same seed; seeds pair the runs (the simulator's schedule depends only on
  the seed, and the attackers are drawn from their own stream). Medians over seeds.
- **Goal.** Defended final accuracy within 2 points of the clean run at 20% sign-flip or
  scaling attackers, per defence: median over seeds of the paired difference.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from fedbus.aggregation import DenseDelta, FedBuff, Polynomial, ServerSGD, Update
from fedbus.bench.convergence import (
    BUFFER_K,
    CLIENT_LR,
    CONCURRENCY,
    DEVICES,
    DIRICHLET_ALPHA,
    EVAL_EVERY_S,
    SIGMA,
    STANDARD,
    world,
)
from fedbus.client.updates import UpdateEncoder
from fedbus.ingest import Accepted, Ingest, Source
from fedbus.sim import FlatModel, FleetData, run_async
from fedbus.transport import topics
from fedbus.wire import envelope as env

ATTACKS = ("scaled", "sign_flip", "gaussian", "label_flip", "sybil")
FRACTIONS = (0.1, 0.2)
DEFENCES = ("none", "clip", "median", "trimmed_mean")
GOAL_ATTACKS = ("sign_flip", "scaled")
GOAL_POINTS = 0.02

SERVER_LR = 2.0
"""The undefended baseline's server lr: FedBuff's best (K = 10, plain SGD, by plateau
accuracy) in the convergence report's first version; a constant, so this report does not
move when that one does."""
DURATION_S = 600.0
SCALE = 10.0
SIGN_FLIP = 4.0
NOISE_STD = 0.5
"""Per coordinate: a norm of about 13 over 650 parameters; honest updates have a median
norm of about 0.1 in this setting."""
TUNE_SEED = 1000
MODEL = "attacks"

RobustMode = Literal["median", "trimmed_mean"]


# -- defences ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Defence:
    """One FedBuff configuration: a defence name and its parameters."""

    name: str
    clip_norm: float | None = None
    robust: RobustMode | None = None
    trim_beta: float = 0.2
    buffer_k: int = BUFFER_K
    lr_scale: float = 1.0

    @property
    def identity(self) -> bool:
        return self.name == "identity"

    @property
    def server_lr(self) -> float:
        return SERVER_LR * self.buffer_k / BUFFER_K * self.lr_scale

    def label(self) -> str:
        parts = [self.name]
        if self.robust == "trimmed_mean":
            parts.append(f"beta={self.trim_beta:g}")
        if self.robust is not None or self.buffer_k != BUFFER_K:
            parts.append(f"K={self.buffer_k}")
        if self.clip_norm is not None:
            parts.append(f"C={self.clip_norm:g}")
        if self.lr_scale != 1.0:
            parts.append(f"lr={self.server_lr:g}")
        return " ".join(parts)

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"buffer_k": self.buffer_k, "server_lr": self.server_lr}
        if self.clip_norm is not None:
            p["clip_norm"] = self.clip_norm
        if self.robust == "trimmed_mean":
            p["trim_beta"] = self.trim_beta
        return p

    def policy(self, initial: np.ndarray) -> FedBuff:
        return FedBuff(
            initial,
            buffer_size=self.buffer_k,
            staleness=Polynomial(0.5),
            server_optimizer=ServerSGD(lr=self.server_lr, momentum=0.0),
            clip_norm=self.clip_norm,
            robust=self.robust,
            trim_beta=self.trim_beta,
        )


NONE = Defence("none")
IDENTITY = Defence("identity")
GRID: dict[str, tuple[Defence, ...]] = {
    "clip": tuple(
        Defence("clip", clip_norm=c, lr_scale=m)
        for c in (0.0125, 0.025, 0.05, 0.1)
        for m in (2.0, 4.0, 8.0, 16.0)
    ),
    "median": (
        *(Defence("median", robust="median", lr_scale=m) for m in (1.0, 2.0, 4.0)),
        Defence("median", robust="median", buffer_k=20),
    ),
    "trimmed_mean": (
        *(
            Defence("trimmed_mean", robust="trimmed_mean", trim_beta=b, lr_scale=m)
            for b in (0.2, 0.3, 0.4)
            for m in (1.0, 2.0)
        ),
        Defence("trimmed_mean", robust="trimmed_mean", trim_beta=0.1),
    ),
}
"""Honest updates have a median norm of about 0.1 here, so every clip norm binds most of
them and the server lr has to grow to keep the step (a first pass with the convergence
report's lr, and a second one up to lr 16 and down to C = 0.025, both found the best clip
at the smallest C and the largest lr tried, hence this range). A buffer's coordinate-wise
median or trimmed mean of label-skewed updates is not its mean (each device pulls toward
its own few classes) and may be smaller, hence their lr grid too; K = 20 makes it rarer
that attackers hold half a buffer."""


# -- the attacked server -------------------------------------------------------------------
def _client(device: int) -> str:
    return f"dev-{device:04d}"


class Sybil:
    """One producer posting forged updates under other devices' ids through real ingest."""

    def __init__(
        self,
        device: int,
        rate: float,
        fleet: FleetData,
        model: FlatModel,
        rng: np.random.Generator,
        *,
        identity: bool,
    ) -> None:
        self.device, self.rate, self.fleet, self.model, self.rng = device, rate, fleet, model, rng
        self.identity = identity
        self.layout = model.wire_layout()
        self.ingest = Ingest(MODEL, self.layout)
        self.topic = topics.kafka_updates(MODEL)
        self._ids = itertools.count()
        self.sent = 0
        self.refused: Counter[str] = Counter()

    def forge(self, version: int, params: np.ndarray) -> Accepted | None:
        """Maybe one forged message now; the accepted update, or None (none sent, or refused)."""
        if self.rng.random() >= self.rate:
            return None
        i = self.device
        new, num, _ = self.model.local_train(
            params, self.fleet.xs[i], self.fleet.ys[i], lr=CLIENT_LR, rng=self.rng
        )
        delta = -SIGN_FLIP * (new - params)
        victim = int(self.rng.integers(self.fleet.n_clients - 1))
        victim += victim >= i  # any device but the attacker itself
        forged = _client(victim)
        # the device SDK's envelope builder, as a real (if dishonest) producer would use it
        enc = UpdateEncoder(MODEL, forged, self.layout, "fp32", error_feedback=False)
        envelope = enc.build(version, np.zeros_like(delta), delta, num,
                             update_id=f"s{next(self._ids):09d}")  # fmt: skip
        source = Source(
            "kafka",
            self.topic,
            key=forged.encode(),  # the key is the producer's to choose
            principal=_client(i) if self.identity else None,
        )
        self.sent += 1
        checked = self.ingest.check(env.encode(envelope), source)
        if not isinstance(checked, Accepted):
            self.refused[checked.reason.value] += 1
            return None
        return checked


class AttackedServer:
    """The engine's ``AsyncServer``: FedBuff, with the attackers' uploads rewritten.

    Refusals by the policy would mean the benchmark measures something else, so they raise,
    as in the convergence report's adapter; refusals by ingest (the sybil's forgeries under
    identity binding) are the point, and are counted.
    """

    def __init__(
        self,
        policy: FedBuff,
        attack: str,
        malicious: frozenset[int],
        rng: np.random.Generator,
        sybil: Sybil | None = None,
    ) -> None:
        self.policy, self.attack, self.malicious, self.rng = policy, attack, malicious, rng
        self.sybil = sybil
        self._ids = itertools.count()
        self.uploads = self.attacker_uploads = 0

    @property
    def version(self) -> int:
        return self.policy.version

    def model(self) -> np.ndarray:
        return self.policy.model

    def poison(self, device: int, delta: np.ndarray) -> np.ndarray:
        """What an attacker uploads instead of ``delta`` (label flips poison the data)."""
        if device not in self.malicious:
            return delta
        self.attacker_uploads += 1
        if self.attack == "scaled":
            return SCALE * delta
        if self.attack in ("sign_flip", "sybil"):
            return -SIGN_FLIP * delta
        if self.attack == "gaussian":
            return self.rng.normal(0.0, NOISE_STD, delta.shape)
        return delta

    def _submit(self, update: Update) -> bool:
        outcome = self.policy.submit(update)
        if not outcome.accepted:
            raise RuntimeError(f"update refused ({outcome.reason}): the benchmark is invalid")
        return outcome.new_version is not None

    def submit(self, client: int, base_version: int, delta: np.ndarray, num_examples: int) -> bool:
        self.uploads += 1
        update = Update(
            client_id=_client(client),
            update_id=f"u{next(self._ids):09d}",
            base_version=base_version,
            num_examples=num_examples,
            delta=DenseDelta(self.poison(client, delta)),
        )
        new = self._submit(update)
        if self.sybil is not None and client not in self.malicious:
            forged = self.sybil.forge(self.policy.version, np.array(self.policy.model))
            if forged is not None:
                self.uploads += 1
                self.attacker_uploads += 1
                new = self._submit(forged.update) or new
        return new


def flip_labels(fleet: FleetData, devices: frozenset[int]) -> FleetData:
    """The fleet with ``y -> n_classes - 1 - y`` on ``devices``' shards."""
    c = fleet.n_classes - 1
    ys = tuple(c - y if i in devices else y for i, y in enumerate(fleet.ys))
    return dataclasses.replace(fleet, ys=ys)


def attackers(seed: int, fraction: float) -> list[int]:
    """The malicious devices: their own stream, so the fleet schedule is unchanged."""
    order = np.random.default_rng([seed, 11]).permutation(DEVICES)
    return sorted(int(d) for d in order[: round(fraction * DEVICES)])


# -- one run -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    attack: str  # "none" for a clean run
    fraction: float
    defence: Defence
    seed: int
    duration_s: float = DURATION_S


@dataclass(frozen=True)
class Run:
    task: Task
    final_accuracy: float
    plateau_accuracy: float
    uploads: int
    attacker_share: float
    forged_refused: int


def run_one(task: Task) -> Run:
    """One simulated run, deterministic in ``task``."""
    fleet, model, timing, init = world(STANDARD, task.seed)
    rng = np.random.default_rng([task.seed, 12])
    sybil: Sybil | None = None
    if task.attack == "none":
        bad: frozenset[int] = frozenset()
    elif task.attack == "sybil":
        bad = frozenset(attackers(task.seed, 1.0 / DEVICES))
        rate = task.fraction / (1.0 - task.fraction)
        (one,) = bad
        sybil = Sybil(one, rate, fleet, model, rng, identity=task.defence.identity)
    else:
        bad = frozenset(attackers(task.seed, task.fraction))
    if task.attack in ("label_flip", "scaled"):
        fleet = flip_labels(fleet, bad)
    policy = (NONE if task.defence.identity else task.defence).policy(init)
    server = AttackedServer(policy, task.attack, bad, rng, sybil)
    result = run_async(
        server, fleet, model, timing, concurrency=CONCURRENCY, duration=task.duration_s,
        client_lr=CLIENT_LR, batch_size=16, epochs=1, eval_every=EVAL_EVERY_S, seed=task.seed,
    )  # fmt: skip
    acc = result.accuracies()
    times = np.array([h.time for h in result.history])
    tail = times >= 0.8 * times[-1]
    return Run(
        task,
        final_accuracy=float(acc[-1]),
        plateau_accuracy=float(acc[tail].mean()),
        uploads=server.uploads,
        attacker_share=server.attacker_uploads / max(1, server.uploads),
        forged_refused=0 if sybil is None else sum(sybil.refused.values()),
    )


def _run_all(tasks: list[Task], workers: int) -> list[Run]:
    """Order-preserving, so the report does not depend on the number of workers."""
    if workers <= 1 or len(tasks) <= 1:
        return [run_one(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_one, tasks, chunksize=1))


# -- the report ----------------------------------------------------------------------------
@dataclass
class Report:
    records: list[dict[str, Any]]
    grid: list[dict[str, Any]]
    summary: dict[str, Any]


def _tune(
    runs: dict[tuple[str, float, Defence, int], Run],
    grid: dict[str, tuple[Defence, ...]],
    attacks: Sequence[str],
    seed: int,
) -> tuple[dict[str, Defence], list[dict[str, Any]]]:
    chosen: dict[str, Defence] = {}
    rows: list[dict[str, Any]] = []
    for name, values in grid.items():
        scores = []
        for d in values:
            accs = {"none": runs[("none", 0.0, d, seed)].plateau_accuracy}
            accs |= {a: runs[(a, 0.2, d, seed)].plateau_accuracy for a in attacks}
            worst = min(accs.values())
            scores.append(worst)
            rows.append({"defence": name, **d.params(), "label": d.label(), "seed": seed,
                         "plateau_accuracy": accs, "worst": worst})  # fmt: skip
        chosen[name] = values[scores.index(max(scores))]  # ties: the first listed
    return chosen, rows


PARAMS = ("clip_norm", "trim_beta", "buffer_k", "server_lr")


def grid_edges(rows: list[dict[str, Any]], chosen: dict[str, dict[str, Any]]) -> list[str]:
    """Each chosen parameter that sits at the smallest or largest value its grid tried
    (the optimum may then lie outside the grid), as ``defence.param=value (end)``."""
    edges = []
    for name, params in chosen.items():
        for p in PARAMS:
            tried = sorted({r[p] for r in rows if r["defence"] == name and p in r})
            if len(tried) < 2 or p not in params:
                continue
            v = params[p]
            if v in (tried[0], tried[-1]):
                edges.append(f"{name}.{p}={v:g} ({'smallest' if v == tried[0] else 'largest'})")
    return edges


def run(
    seeds: int = 3,
    quick: bool = False,
    log: Callable[[str], None] = print,
    workers: int = 0,
    attacks: Sequence[str] = ATTACKS,
) -> Report:
    """Tune each defence on the tuning seed, then run the matrix on ``seeds`` seeds.

    ``quick`` keeps the setting and shortens the runs (60 simulated seconds, one seed, the
    grid cut to its first value per defence) for tests and CI. ``attacks`` narrows the
    matrix, and then the tuning too (the worst case is over the attacks run).
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"attacks must be among {', '.join(ATTACKS)}, got {list(attacks)}")
    duration = 60.0 if quick else DURATION_S
    seed_list = tuple(range(min(seeds, 1) if quick else seeds))
    if not seed_list:
        raise ValueError("need at least one seed")
    grid = {k: v[:1] for k, v in GRID.items()} if quick else GRID
    if workers <= 0:
        workers = min(2, os.cpu_count() or 1)
    started = time.perf_counter()

    # the sybil is answered by identity binding, not by statistics: no tuning against it
    tuned_on = [a for a in attacks if a != "sybil"]
    tune_tasks = [Task("none", 0.0, d, TUNE_SEED, duration) for v in grid.values() for d in v]
    tune_tasks += [Task(a, 0.2, d, TUNE_SEED, duration)
                   for v in grid.values() for d in v for a in tuned_on]  # fmt: skip
    log(f"attacks: {len(tune_tasks)} tuning runs on {workers} worker(s)")
    runs = {(r.task.attack, r.task.fraction, r.task.defence, r.task.seed): r
            for r in _run_all(tune_tasks, workers)}  # fmt: skip
    chosen, grid_rows = _tune(runs, grid, tuned_on, TUNE_SEED)
    log("attacks: chosen " + ", ".join(d.label() for d in chosen.values()))

    defences = [NONE, *chosen.values()]
    tasks = [Task("none", 0.0, d, s, duration) for d in defences for s in seed_list]
    tasks += [Task(a, f, d, s, duration) for a in attacks for f in FRACTIONS
              for d in defences for s in seed_list]  # fmt: skip
    if "sybil" in attacks:
        tasks += [Task("sybil", f, IDENTITY, s, duration) for f in FRACTIONS for s in seed_list]
    log(f"attacks: {len(tasks)} report runs")
    for r in _run_all(tasks, workers):
        runs[(r.task.attack, r.task.fraction, r.task.defence, r.task.seed)] = r

    clean = {s: runs[("none", 0.0, NONE, s)] for s in seed_list}
    records = []
    for t in tasks:
        if t.seed != seed_list[0]:
            continue
        group = [runs[(t.attack, t.fraction, t.defence, s)] for s in seed_list]
        records.append(_record(group, [clean[s] for s in seed_list]))
    goal = {
        d.name: {
            a: statistics.median(
                clean[s].final_accuracy - runs[(a, 0.2, d, s)].final_accuracy for s in seed_list
            )
            for a in GOAL_ATTACKS
            if a in attacks
        }
        for d in defences
    }
    summary: dict[str, Any] = {
        "summary": True,
        "devices": DEVICES,
        "concurrency": CONCURRENCY,
        "sigma": SIGMA,
        "dirichlet_alpha": DIRICHLET_ALPHA,
        "buffer_k": BUFFER_K,
        "server_lr": SERVER_LR,
        "client_lr": CLIENT_LR,
        "duration_s": duration,
        "seeds": list(seed_list),
        "attacks": list(attacks),
        "tuned_on": ["none", *tuned_on],
        "tune_seed": TUNE_SEED,
        "quick": quick,
        "scale": SCALE,
        "sign_flip": SIGN_FLIP,
        "noise_std": NOISE_STD,
        "chosen": {k: d.params() for k, d in chosen.items()},
        "chosen_at_grid_edge": grid_edges(grid_rows, {k: d.params() for k, d in chosen.items()}),
        "goal_drop_at_20pct": goal,
        "goal_met": {
            name: all(v <= GOAL_POINTS for v in drops.values())
            for name, drops in goal.items()
            if name != "none"
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    log(f"attacks: done in {summary['wall_s']} s")
    return Report(records, grid_rows, summary)


def _record(group: list[Run], clean: list[Run]) -> dict[str, Any]:
    t = group[0].task
    finals = [r.final_accuracy for r in group]
    drops = [c.final_accuracy - r.final_accuracy for c, r in zip(clean, group, strict=True)]
    return {
        "attack": t.attack,
        "fraction": t.fraction,
        "defence": t.defence.name,
        "defence_params": t.defence.params(),
        "final_accuracy": statistics.median(finals),
        "final_accuracy_min": min(finals),
        "final_accuracy_max": max(finals),
        "plateau_accuracy": statistics.median(r.plateau_accuracy for r in group),
        "clean_accuracy": statistics.median(c.final_accuracy for c in clean),
        "drop": statistics.median(drops),
        "attacker_share": statistics.median(r.attacker_share for r in group),
        "forged_refused": statistics.median(r.forged_refused for r in group),
        "uploads": int(statistics.median(r.uploads for r in group)),
        "seeds": [r.task.seed for r in group],
        "final_accuracies": finals,
    }


# -- output --------------------------------------------------------------------------------
def to_json(report: Report) -> list[dict[str, Any]]:
    """The ``--json`` list: the records, the tuning grid rows, then the summary."""
    return [*report.records, *({"grid": True, **g} for g in report.grid), report.summary]


def from_json(items: list[dict[str, Any]]) -> Report:
    """The report back from its ``--json`` list (to render it again without rerunning)."""
    records = [r for r in items if not r.get("grid") and not r.get("summary")]
    grid = [{k: v for k, v in r.items() if k != "grid"} for r in items if r.get("grid")]
    (summary,) = [r for r in items if r.get("summary")]
    return Report(records, grid, summary)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: Report) -> str:
    """The matrix (final accuracy, %, median over seeds), the grid and the goal."""
    s = report.summary
    recs = report.records
    names = [n for n in ("none", *DEFENCES[1:], "identity")
             if any(r["defence"] == n for r in recs)]  # fmt: skip
    clean = next(r for r in recs if r["attack"] == "none" and r["defence"] == "none")
    lines = [
        "| attack | fraction | "
        + " | ".join("no defence" if n == "none" else n for n in names)
        + " |",
        "|---|---|" + "---|" * len(names),
    ]
    keys = sorted({(r["attack"], r["fraction"]) for r in recs},
                  key=lambda k: (k[0] != "none", ATTACKS.index(k[0]) if k[0] in ATTACKS else -1,
                                 k[1]))  # fmt: skip
    for attack, fraction in keys:
        cells = []
        for n in names:
            r = next((r for r in recs if (r["attack"], r["fraction"], r["defence"])
                      == (attack, fraction, n)), None)  # fmt: skip
            cells.append("-" if r is None else _pct(r["final_accuracy"]))
        frac = "-" if attack == "none" else f"{100 * fraction:.0f}%"
        name = "clean" if attack == "none" else attack
        lines.append(f"| {name} | {frac} | " + " | ".join(cells) + " |")
    chosen = ", ".join(
        f"{k} ({', '.join(f'{p}={v:g}' for p, v in d.items())})" for k, d in s["chosen"].items()
    )
    goal = "; ".join(
        f"{d}: " + ", ".join(f"{a} {100 * v:+.1f}" for a, v in drops.items())
        for d, drops in s["goal_drop_at_20pct"].items()
    )
    lines += [
        "",
        f"Final test accuracy, %, median over seeds {s['seeds']}; clean undefended "
        f"{_pct(clean['final_accuracy'])}. {s['duration_s']:g} simulated seconds per run. "
        f"Chosen on tuning seed {s['tune_seed']}: {chosen}; at an edge of the grid: "
        f"{', '.join(s['chosen_at_grid_edge']) or 'none'}. Drop from the clean run at 20% "
        f"(points, median of per-seed differences; goal <= {100 * GOAL_POINTS:g}): {goal}.",
        "",
        "Tuning grid (plateau accuracy, %, on the tuning seed; attacks at 20%):",
        "",
        "| defence | clean | " + " | ".join(s["tuned_on"][1:]) + " | worst |",
        "|---|" + "---|" * (len(s["tuned_on"]) + 1),
    ]
    for g in report.grid:
        acc = g["plateau_accuracy"]
        lines.append(f"| {g['label']} | "
                     + " | ".join(_pct(acc[a]) for a in s["tuned_on"])
                     + f" | {_pct(g['worst'])} |")  # fmt: skip
    return "\n".join(lines)
