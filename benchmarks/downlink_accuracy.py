"""Accuracy effect of the downlink codec, in a closed loop where devices train from exactly
the weights they decoded.

Digits, 300 devices with Dirichlet(0.3) labels, softmax regression, one local epoch (batch
16, lr 0.1), FedBuff-shaped rounds: each round K = 10 random devices train from the model
they hold and send int8 deltas (fedbus's device encoder, error feedback on), the server
averages them (server lr 1.0) and publishes. What a device holds depends on the downlink:

* ``fp32`` / ``fp16`` / ``int8``: the full model in that codec (``fedbus.downlink``);
* ``int8-diffs`` / ``int4-diffs`` / ``topk10-diffs``: a device that follows the diffs
  channel (keyframe every 10 publications in fp32, differences in between), i.e. the
  server-tracked reconstruction.

Per configuration, over 5 seeds: final test accuracy (mean), its drop against fp32, the
downlink bytes (whole messages) a following device receives per publication, and how far
the weights it trains from are from the server's (max absolute difference, mean over
publications). Synchronous rounds
stand in for asynchronous arrival: the point is the downlink's error, not staleness.

    python benchmarks/downlink_accuracy.py --json > benchmarks/results/downlink_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

import numpy as np

from fedbus.client.updates import UpdateEncoder, read_model
from fedbus.downlink import DownlinkEncoder, Reconstruction
from fedbus.sim.data import digits_fleet
from fedbus.sim.models import example
from fedbus.wire.codecs import CodecSpec, decode_dense

CONFIGS: dict[str, tuple[str, str | None]] = {
    "fp32": ("fp32", None),
    "fp16": ("fp16", None),
    "int8": ("int8", None),
    "int8-diffs": ("fp32", "int8"),
    "int4-diffs": ("fp32", "int4"),
    "topk10-diffs": ("fp32", "topk:fraction=0.1,values=int8"),
}
K = 10


def run_one(name: str, seed: int, rounds: int) -> dict[str, Any]:
    model_codec, diff = CONFIGS[name]
    fleet = digits_fleet(seed=seed)
    net = example("softmax")
    layout = net.wire_layout()
    rng = np.random.default_rng(seed)
    w = net.init_params(seed)
    down = DownlinkEncoder("m", layout, model_codec, diff, keyframe_every=10)
    follower = Reconstruction("m")
    encoders = [
        UpdateEncoder("m", f"d-{i}", layout, "int8", seed=seed * 1000 + i)
        for i in range(fleet.n_clients)
    ]
    received = 0
    errors = []  # max |held - server weights| per publication
    for version in range(rounds + 1):
        out = down.next(version, w)
        if diff is None:
            held = read_model(out.model).weights
            received += len(out.model)
        else:
            assert out.stream is not None
            follower.offer(out.stream)
            assert follower.weights is not None and follower.version == version
            held = follower.weights
            received += len(out.stream)
        errors.append(float(np.max(np.abs(held - w))))
        if version == rounds:
            break
        total = np.zeros_like(w)
        for d in rng.choice(fleet.n_clients, K, replace=False):
            new, _, _ = net.local_train(
                held, fleet.xs[d], fleet.ys[d], epochs=1, batch_size=16, lr=0.1, rng=rng
            )
            upd = encoders[d].build(version, held, new, len(fleet.ys[d]))
            total += decode_dense(upd.payload, CodecSpec.from_wire(upd.codec), layout.n_params)
        w = w + total / K
    return {
        "config": name,
        "seed": seed,
        "accuracy": net.accuracy(held, fleet.x_test, fleet.y_test),
        "downlink_bytes_per_publication": received / (rounds + 1),
        "n_params": layout.n_params,
        "error_vs_server": statistics.mean(errors),
        "weight_absmax": float(np.max(np.abs(w))),
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    base = statistics.mean(r["accuracy"] for r in rows if r["config"] == "fp32")
    fp32_bytes = statistics.mean(
        r["downlink_bytes_per_publication"] for r in rows if r["config"] == "fp32"
    )
    for name in CONFIGS:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        acc = statistics.mean(r["accuracy"] for r in mine)
        err = statistics.mean(r["error_vs_server"] for r in mine)
        b = statistics.mean(r["downlink_bytes_per_publication"] for r in mine)
        out.append(
            {
                "config": name,
                "accuracy": acc,
                "accuracy_drop": base - acc,
                "downlink_bytes_per_publication": b,
                "fp32_over_config_bytes": fp32_bytes / b,
                "error_vs_server": err,
                "seeds": len(mine),
            }
        )
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| downlink | test accuracy | drop vs fp32 | bytes / publication | fp32 / this "
        "| device vs server weights, max abs |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['config']} | {s['accuracy']:.4f} | {s['accuracy_drop'] * 100:+.2f} pt "
            f"| {s['downlink_bytes_per_publication']:,.0f} | {s['fp32_over_config_bytes']:.1f} "
            f"| {s['error_vs_server']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = [run_one(n, s, args.rounds) for n in CONFIGS for s in range(args.seeds)]
    summary = summarise(rows)
    if args.json:
        print(json.dumps({"summary": summary, "runs": rows}, indent=1))
    else:
        print(markdown(summary))


if __name__ == "__main__":
    main()
