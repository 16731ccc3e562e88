"""The secure-aggregation benchmark (``fedbus bench secure``): what the privacy costs.

Setting: the convergence report's standard one (:mod:`fedbus.bench.convergence`: digits over
300 devices, Dirichlet(0.3), concurrency 100, lognormal speeds, 10% dropouts, softmax
regression, client lr 0.3) with FedBuff K = 10, Polynomial(0.5) staleness and server SGD
at the attacks report's lr (:data:`SERVER_LR`).

- ``plain``: devices send int8 deltas with error feedback (the SDK's default codec), FedBuff
  folds them.
- ``secure``: every upload goes through the real protocol objects of :mod:`fedbus.secure`,
  wire encoding included: the device clips to :data:`CLIP_NORM`, quantises, splits, seals
  both shares (HPKE) and builds one message; the leader and the helper each decode it and
  open their share; the helper's receipt, the leader's manifest and the helper's sum are
  signed, encoded and decoded; the leader unmasks the buffer and FedBuff applies it.
  Only the broker is left out.

Records (one per mode and seed, medians in the summary): ``final_accuracy`` at the end of
the run; ``time_to_target_s``, the first simulated time the accuracy reaches
``TARGET_FRACTION`` of the plain run's plateau on the same seed (mean of its last 20%);
``bytes_per_job``, the mean size of the whole message a job publishes (envelope included);
``device_cpu_s_per_update``, the process CPU time a device spends encoding one update (int8
with error feedback, or quantise + split + seal), measured on the run's own deltas;
``updates_per_s``, the aggregator side's updates per CPU second in this process
(decoding, checks, folding, and for secure both aggregators' share opening, receipts,
manifests, sums and the unmasking), against plain FedBuff's ingest of the same updates.
Two aggregators each do their half; the figure is for both together on one core.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedbus.aggregation import FedBuff, Polynomial, ServerSGD
from fedbus.aggregation.fedbuff import PartialBuffer
from fedbus.bench.convergence import (
    CLIENT_LR,
    CODECS,
    CONCURRENCY,
    EVAL_EVERY_S,
    STANDARD,
    TARGET_FRACTION,
    world,
)
from fedbus.client.updates import UpdateEncoder
from fedbus.ingest import Ingest, Refusal, Source, judge
from fedbus.secure import (
    DeviceKeys,
    Helper,
    Keyring,
    Leader,
    SecureConfig,
    SecureUpdateEncoder,
    ShareOpener,
    refusal_row,
)
from fedbus.secure.sealing import generate_keypair
from fedbus.sim import run_async
from fedbus.transport import topics
from fedbus.wire import envelope as env
from fedbus.wire.errors import WireError
from fedbus.wire.layout import Layout
from fedbus.wire.signing import generate_keypair as identity_keypair

MODEL = "bench"
BUFFER_K = 10
SERVER_LR = 2.0
CLIP_NORM = 10.0
"""Secure mode needs a bound on every update (the overflow budget, and without it one device
could move the sum anywhere). 10 is far above the standard setting's update norms, so the
bound costs no accuracy, and leaves f = 14 fractional bits (resolution 6e-5)."""
MAX_STALENESS = 200
"""Finite, as secure mode requires; the standard setting's staleness stays far below it."""
DURATION_S = 600.0
QUICK_DURATION_S = 100.0
THROUGHPUT_UPDATES = 400


@dataclass(frozen=True)
class Record:
    mode: str
    seed: int
    final_accuracy: float
    time_to_target_s: float | None
    bytes_per_job: float
    device_cpu_s_per_update: float
    updates_per_s: float
    uploads: int
    refused: dict[str, int]


def _policy(init: np.ndarray) -> FedBuff:
    return FedBuff(
        init, buffer_size=BUFFER_K, staleness=Polynomial(0.5), server_optimizer=ServerSGD(SERVER_LR)
    )


def secure_config() -> SecureConfig:
    return SecureConfig(
        clip_norm=CLIP_NORM, staleness=Polynomial(0.5), max_staleness=MAX_STALENESS,
        buffer_size=BUFFER_K,
    )  # fmt: skip


class _Timed:
    """Process CPU time spent in ``with`` blocks, and how many."""

    def __init__(self) -> None:
        self.seconds, self.count = 0.0, 0

    def __enter__(self) -> None:
        self._t0 = time.process_time()

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.process_time() - self._t0
        self.count += 1

    @property
    def per(self) -> float:
        return self.seconds / max(1, self.count)


class PlainServer:
    """Int8 uploads with error feedback through the worker's own ingest into FedBuff."""

    def __init__(self, init: np.ndarray, layout: Layout) -> None:
        self.policy = _policy(init)
        self.layout = layout
        self.ingest = Ingest(MODEL, layout)
        self.encoders: dict[int, UpdateEncoder] = {}
        self.device, self.server = _Timed(), _Timed()
        self.bytes = 0
        self.uploads = 0
        self.refused: Counter[str] = Counter()

    @property
    def version(self) -> int:
        return self.policy.version

    def model(self) -> np.ndarray:
        return self.policy.model

    def submit(self, client: int, base_version: int, delta: np.ndarray, num_examples: int) -> bool:
        enc = self.encoders.get(client)
        if enc is None:
            enc = self.encoders[client] = UpdateEncoder(
                MODEL, f"dev-{client:04d}", self.layout, CODECS["int8"], seed=client
            )
        with self.device:
            raw = env.encode(enc.build(base_version, np.zeros_like(delta), delta, num_examples))
        self.bytes += len(raw)
        self.uploads += 1
        before = self.policy.version
        with self.server:
            verdict = judge(self.ingest, self.policy, raw, _source(client))
        if isinstance(verdict, Refusal):
            self.refused[verdict.reason.value] += 1
        return self.policy.version != before


def _source(client: int) -> Source:
    return Source("mqtt", topics.mqtt_update(MODEL, f"dev-{client:04d}"))


def _wire(message: Any) -> Any:
    return env.decode(env.encode(message))


class SecureServer:
    """The two aggregators of :mod:`fedbus.secure`, in one process, feeding FedBuff."""

    def __init__(self, init: np.ndarray, layout: Layout) -> None:
        self.policy = _policy(init)
        self.layout = layout
        self.config = cfg = secure_config()
        n = layout.n_params
        lid, lid_pub = identity_keypair()
        hid, hid_pub = identity_keypair()
        leader_ring = Keyring("leader", {0: generate_keypair()[0]})
        helper_ring = Keyring("helper", {0: generate_keypair()[0]})
        self.keys = DeviceKeys.from_messages(
            _wire(leader_ring.key_message(MODEL, cfg.quant, lid, time.time())),
            _wire(helper_ring.key_message(MODEL, cfg.quant, hid, time.time())),
            leader_identity=lid_pub,
            helper_identity=hid_pub,
        )
        self.leader = Leader(MODEL, cfg, n, version=0, identity_key=lid, helper_identity=hid_pub)
        self.helper = Helper(MODEL, cfg, n, version=0, identity_key=hid, leader_identity=lid_pub)
        fp = layout.fingerprint
        self.open_leader = ShareOpener(MODEL, leader_ring, fp, n, cfg.quant)
        self.open_helper = ShareOpener(MODEL, helper_ring, fp, n, cfg.quant)
        self.device, self.server = _Timed(), _Timed()
        self.bytes = 0
        self.uploads = 0
        self.refused: Counter[str] = Counter()
        self.totals: list[np.ndarray] = []

    @property
    def version(self) -> int:
        return self.policy.version

    def model(self) -> np.ndarray:
        return self.policy.model

    def submit(self, client: int, base_version: int, delta: np.ndarray, num_examples: int) -> bool:
        encoder = SecureUpdateEncoder(f"dev-{client:04d}", self.layout, self.keys)
        with self.device:
            raw = env.encode(encoder.encode(delta, base_version, num_examples))
        self.bytes += len(raw)
        self.uploads += 1
        before = self.policy.version
        with self.server:
            self.receive(raw)
        return self.policy.version != before

    def receive(self, raw: bytes) -> None:
        """Both aggregators' whole path for one message (each decodes its own copy)."""
        manifests = []
        mine = env.decode_secure_update(raw)
        try:
            manifests += self.leader.receive(self.open_leader.open(mine)).manifests
        except WireError as exc:
            self.refused[exc.reason.value] += 1
        theirs = env.decode_secure_update(raw)
        try:
            row = self.helper.receive(self.open_helper.open(theirs))
        except WireError as exc:
            row = refusal_row(theirs.client, theirs.update_id, theirs.base_version, exc)
        manifests += self.leader.on_receipt(_wire(self.helper.receipt([row]))).manifests
        for manifest in manifests:
            combined = self.leader.combine(_wire(self.helper.apply(_wire(manifest))))
            self.totals.append(combined.total)
            clients = frozenset(str(c) for c, _, _ in combined.entries)
            self.policy.apply_partial(
                PartialBuffer(
                    combined.delta_sum, len(combined.entries), combined.weight_sum, clients,
                    self.policy.version,
                )
            )  # fmt: skip


def _time_to(times: np.ndarray, acc: np.ndarray, target: float) -> float | None:
    hit = np.nonzero(acc >= target)[0]
    return float(times[hit[0]]) if hit.size else None


def run_seed(seed: int, duration_s: float) -> list[Record]:
    """Plain and secure on one seed (same fleet, same schedule)."""
    fleet, model, timing, init = world(STANDARD, seed)
    layout = Layout.from_arrays({"w": np.zeros(init.size, np.float32)})
    out: list[Record] = []
    servers: dict[str, PlainServer | SecureServer] = {
        "plain": PlainServer(init, layout), "secure": SecureServer(init, layout),
    }  # fmt: skip
    traces = {}
    for mode, server in servers.items():
        result = run_async(
            server, fleet, model, timing, concurrency=CONCURRENCY, duration=duration_s,
            client_lr=CLIENT_LR, batch_size=16, epochs=1, eval_every=EVAL_EVERY_S, seed=seed,
        )  # fmt: skip
        traces[mode] = (np.array([h.time for h in result.history]), result.accuracies())
    times, plain_acc = traces["plain"]
    target = TARGET_FRACTION * float(plain_acc[times >= 0.8 * times[-1]].mean())
    throughput = _throughput(init, layout, seed)
    for mode, server in servers.items():
        t, acc = traces[mode]
        out.append(
            Record(
                mode=mode, seed=seed, final_accuracy=float(acc[-1]),
                time_to_target_s=_time_to(t, acc, target),
                bytes_per_job=server.bytes / max(1, server.uploads),
                device_cpu_s_per_update=server.device.per,
                updates_per_s=throughput[mode], uploads=server.uploads,
                refused=dict(server.refused),
            )
        )  # fmt: skip
    return out


def _throughput(init: np.ndarray, layout: Layout, seed: int) -> dict[str, float]:
    """Aggregator updates per CPU second on the same pre-encoded stream of updates."""
    rng = np.random.default_rng([seed, 21])
    deltas = [rng.normal(0, 0.05, init.size) for _ in range(THROUGHPUT_UPDATES)]
    out = {}
    for mode in ("plain", "secure"):
        server: PlainServer | SecureServer = (
            PlainServer(init, layout) if mode == "plain" else SecureServer(init, layout)
        )
        raws = []
        for i, d in enumerate(deltas):  # 40 clients, each once per buffer
            client = i % 40
            if isinstance(server, SecureServer):
                enc = SecureUpdateEncoder(f"dev-{client:04d}", layout, server.keys)
                raws.append((client, env.encode(enc.encode(d, 0, 5))))
            else:
                enc8 = UpdateEncoder(MODEL, f"dev-{client:04d}", layout, CODECS["int8"])
                raws.append((client, env.encode(enc8.build(0, np.zeros_like(d), d, 5))))
        t0 = time.process_time()
        for client, raw in raws:
            if isinstance(server, SecureServer):
                server.receive(raw)
            else:
                judge(server.ingest, server.policy, raw, _source(client))
        out[mode] = len(raws) / (time.process_time() - t0)
    return out


def summary(records: list[Record]) -> dict[str, Any]:
    def med(mode: str, f: Callable[[Record], float | None]) -> float | None:
        vals = [v for r in records if r.mode == mode and (v := f(r)) is not None]
        return float(statistics.median(vals)) if vals else None

    plain_acc, secure_acc = (
        med("plain", lambda r: r.final_accuracy),
        med("secure", lambda r: r.final_accuracy),
    )
    plain_tp, secure_tp = (
        med("plain", lambda r: r.updates_per_s),
        med("secure", lambda r: r.updates_per_s),
    )
    assert plain_acc is not None and secure_acc is not None
    assert plain_tp is not None and secure_tp is not None
    pairs = {}
    for seed in sorted({r.seed for r in records}):
        by = {r.mode: r for r in records if r.seed == seed}
        pairs[seed] = by["plain"].final_accuracy - by["secure"].final_accuracy
    return {
        "summary": True,
        "seeds": len(pairs),
        "secure_accuracy_drop": float(statistics.median(pairs.values())),
        "secure_accuracy_drop_by_seed": {str(k): v for k, v in pairs.items()},
        "goal_accuracy_drop": 0.005,
        "goal_met": float(statistics.median(pairs.values())) <= 0.005,
        "secure_vs_plain_throughput": secure_tp / plain_tp,
        "secure_vs_plain_bytes": (med("secure", lambda r: r.bytes_per_job) or 0.0)
        / (med("plain", lambda r: r.bytes_per_job) or 1.0),
        "secure_vs_plain_device_cpu": (med("secure", lambda r: r.device_cpu_s_per_update) or 0.0)
        / (med("plain", lambda r: r.device_cpu_s_per_update) or 1.0),
        "plain_final_accuracy": plain_acc,
        "secure_final_accuracy": secure_acc,
        "clip_norm": CLIP_NORM,
        "frac_bits": secure_config().frac_bits,
        "buffer_size": BUFFER_K,
        "server_lr": SERVER_LR,
    }


def run(
    *, seeds: int = 3, quick: bool = False, log: Callable[[str], None] = lambda _: None
) -> list[dict[str, Any]]:
    duration = QUICK_DURATION_S if quick else DURATION_S
    records: list[Record] = []
    for seed in range(seeds):
        t0 = time.monotonic()
        records += run_seed(seed, duration)
        log(f"seed {seed}: {time.monotonic() - t0:.0f} s")
    rows: list[dict[str, Any]] = [{**r.__dict__, "duration_s": duration} for r in records]
    return [*rows, summary(records)]


def markdown(rows: list[dict[str, Any]]) -> str:
    s = rows[-1]
    lines = [
        "| mode | seed | final accuracy | time to target (s) | bytes/job | device CPU/update "
        "(ms) | aggregator updates/CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows[:-1]:
        ttt = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.0f}"
        lines.append(
            f"| {r['mode']} | {r['seed']} | {r['final_accuracy']:.4f} | {ttt} | "
            f"{r['bytes_per_job']:.0f} | {1e3 * r['device_cpu_s_per_update']:.3f} | "
            f"{r['updates_per_s']:.0f} |"
        )
    lines += [
        "",
        f"Median accuracy drop (plain - secure, paired by seed): "
        f"{100 * s['secure_accuracy_drop']:.2f} points (goal <= 0.5: "
        f"{'met' if s['goal_met'] else 'not met'}); secure/plain throughput "
        f"{s['secure_vs_plain_throughput']:.3f}, bytes {s['secure_vs_plain_bytes']:.2f}x, "
        f"device CPU {s['secure_vs_plain_device_cpu']:.1f}x "
        f"(C = {s['clip_norm']:g}, f = {s['frac_bits']}, K = {s['buffer_size']}).",
    ]
    return "\n".join(lines)


__all__ = ["markdown", "run", "run_seed", "summary"]
