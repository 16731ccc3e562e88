"""Long fuzz run of the whole ingest path: bytes and what the transport knows -> ingest ->
the aggregation policy, as :func:`fedbus.ingest.judge` runs it live.

The CI-sized run is ``tests/fuzz`` (hypothesis, about 20 inputs a second); this script is
a mutation fuzzer fast enough for millions of inputs. It starts from valid updates in every
codec (with and without zstd, signed and unsigned) and mutates them at three levels: raw
bytes (bit flips, cuts, splices, random bytes), the msgpack map (a field replaced by a
value of another type, dropped or added), and the codec descriptor and payload (random
bytes of the right length, wrong lengths, non-finite floats, zstd frames that claim huge
sizes). The transport's view (MQTT topic, Kafka key) is mutated too. Policies are FedBuff
(small K, one deferral), FedBuff with central DP, a privacy budget of a few versions and
tight deferral caps, and FedAsync, replaced every ``--reset`` inputs.

A crash is an exception escaping :func:`~fedbus.ingest.judge` or a refusal with reason
``internal_error`` (an input the checks did not anticipate); ``--crashes DIR`` keeps each
one's bytes. Prints a JSON summary: inputs, verdicts, refusals by reason, crashes, seconds.

    nice -n 10 python benchmarks/fuzz_ingest.py --inputs 1000000 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard

from fedbus.aggregation import Constant, DPConfig, FedAsync, FedBuff
from fedbus.ingest import Folded, Ingest, Refusal, Source, judge
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, encode
from fedbus.wire.errors import Reason
from fedbus.wire.layout import Layout
from fedbus.wire.signing import Verifier, generate_keypair, sign_update

MODEL = "fuzz"
LAYOUT = Layout.from_wire([["w", [7, 5], "float32"], ["b", [6], "float16"]])  # n = 41
N = LAYOUT.n_params
CODECS = ["fp32", "fp16", "int8", "int4", "topk:fraction=0.3", "int8+zstd", "fp32+zstd",
          "topk:fraction=0.3+zstd", "int8:block=4", "int4:block=8"]  # fmt: skip
CLIENTS = ["dev-1", "dev-2", "dev-3", "", "..", "DEV-1", "d" * 70, "a/b", "+", "#"]
FIELDS = ["schema", "type", "model", "client", "update_id", "base_version", "num_examples",
          "codec", "layout", "payload", "signature", "metrics", "created_at", "extra"]  # fmt: skip


def _seeds(rng: np.random.Generator, private_key: bytes) -> list[dict[str, Any]]:
    """Valid update maps in every codec, some signed."""
    out = []
    for i, codec in enumerate(CODECS):
        spec = CodecSpec.parse(codec)
        for client in ("dev-1", "dev-2"):
            delta = rng.normal(0, 0.1, N)
            upd = env.UpdateEnvelope(
                model=MODEL,
                client=client,
                update_id=f"u-{i}-{client}",
                base_version=int(rng.integers(0, 3)),
                num_examples=int(rng.integers(1, 100)),
                codec=spec.to_wire(),
                layout=LAYOUT.fingerprint,
                payload=encode(delta, spec, rng),
            )
            if client == "dev-1":
                upd = sign_update(upd, private_key)
            out.append(upd.to_map())
    return out


class Mutator:
    def __init__(self, seed: int, seeds: list[dict[str, Any]]) -> None:
        self.r = random.Random(seed)
        self.seeds = seeds
        self.raw_seeds = [msgpack.packb(m, use_bin_type=True) for m in seeds]

    def value(self, depth: int = 0) -> Any:
        r = self.r
        kind = r.randrange(9 if depth < 2 else 7)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return r.choice([0, -1, 1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1,
                             r.randrange(-1000, 1000)])  # fmt: skip
        if kind == 3:
            return r.choice([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e308, 5e-324,
                             r.uniform(-10, 10)])  # fmt: skip
        if kind == 4:
            return "".join(chr(r.randrange(32, 0x2FF)) for _ in range(r.randrange(0, 40)))
        if kind == 5:
            return r.randbytes(r.randrange(0, 300))
        if kind == 6:
            return r.choice(["dev-1", "fuzz", "fp32", "int8", "topk", "", "update", "model"])
        if kind == 7:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 4))]
        return {self.value(2) if r.random() < 0.2 else str(self.value(2)): self.value(depth + 1)
                for _ in range(r.randrange(0, 4))}  # fmt: skip

    def payload(self, m: dict[str, Any]) -> None:
        r = self.r
        codec = dict(m["codec"])
        if r.random() < 0.5:  # another descriptor, or one key perturbed
            if r.random() < 0.5:
                codec = CodecSpec.parse(r.choice(CODECS)).to_wire()
            else:
                codec[r.choice(["name", "block", "fraction", "values", "zstd", "rounding"])] = (
                    self.value(1)
                )
        m["codec"] = codec
        body: bytes = m["payload"]
        choice = r.randrange(6)
        if choice == 0:  # same length, any bytes
            body = r.randbytes(len(body))
        elif choice == 1:  # any length
            body = r.randbytes(r.randrange(0, 2 * len(body) + 8))
        elif choice == 2:  # extreme floats
            vals = [r.choice([float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-45, 0.0])
                    for _ in range(N)]  # fmt: skip
            body = struct.pack(f"<{N}f", *vals)[: len(body)]
        elif choice == 3:  # a zstd frame of something
            body = zstandard.ZstdCompressor().compress(r.randbytes(r.randrange(0, 400)))
        elif choice == 4:  # a zstd frame claiming a huge content size (bomb-shaped)
            frame = bytearray(zstandard.ZstdCompressor().compress(bytes(r.randrange(1, 5000))))
            body = bytes(frame[:4]) + bytes([0xE0]) + struct.pack("<Q", 2**40) + r.randbytes(20)
        else:  # flip some bits
            b = bytearray(body)
            for _ in range(r.randrange(1, 8)):
                if b:
                    b[r.randrange(len(b))] ^= 1 << r.randrange(8)
            body = bytes(b)
        m["payload"] = body

    def bytes_level(self, raw: bytes) -> bytes:
        r = self.r
        b = bytearray(raw)
        for _ in range(r.randrange(1, 5)):
            op = r.randrange(6)
            if op == 0 and b:
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
            elif op == 1 and b:
                b[r.randrange(len(b))] = r.randrange(256)
            elif op == 2 and b:
                del b[r.randrange(len(b)) :]
            elif op == 3:
                i = r.randrange(len(b) + 1)
                b[i:i] = r.randbytes(r.randrange(1, 16))
            elif op == 4:
                other = r.choice(self.raw_seeds)
                i, j = r.randrange(len(b) + 1), r.randrange(len(other) + 1)
                b = b[:i] + bytearray(other[j:])
            elif op == 5 and b:  # a msgpack header byte with a huge length (str32, bin32, map32)
                i = r.randrange(len(b))
                b[i : i + 5] = bytes([r.choice([0xDB, 0xC6, 0xDF, 0xDD])]) + r.randbytes(4)
        return bytes(b)

    def source(self, client: str) -> Source:
        r = self.r
        named = client if r.random() < 0.7 else r.choice(CLIENTS)
        if r.random() < 0.5:
            model = MODEL if r.random() < 0.85 else r.choice(["other", "", "+"])
            topic = f"fedbus/v1/{model}/updates/{named}"
            if r.random() < 0.05:
                topic = str(self.value(2))
            return Source("mqtt", topic)
        key = named.encode() if r.random() < 0.85 else r.choice([None, r.randbytes(8)])
        topic = f"fedbus.{MODEL}.updates" if r.random() < 0.9 else "fedbus.other.updates"
        return Source("kafka", topic, key)

    def next(self) -> tuple[bytes, Source]:
        r = self.r
        m = dict(r.choice(self.seeds))
        m["update_id"] = f"u{r.randrange(10**9)}"  # fresh by default; duplicates happen too
        if r.random() < 0.05:
            m["update_id"] = "u-dup"
        client = m["client"]
        kind = r.randrange(10)
        if kind == 0:
            return r.randbytes(r.randrange(0, 600)), self.source(client)
        if kind in (1, 2, 3):
            for _ in range(r.randrange(1, 4)):
                m[r.choice(FIELDS)] = self.value()
            for _ in range(r.randrange(0, 2)):
                m.pop(r.choice(FIELDS), None)
        elif kind in (4, 5, 6):
            self.payload(m)
        elif kind == 7:
            m["base_version"] = r.choice([0, 1, 2, 5, 10**6, 2**40])
        raw = msgpack.packb(m, use_bin_type=True)
        if kind in (8, 9):
            raw = self.bytes_level(raw)
        return raw, self.source(client)


def _policy(i: int) -> FedAsync | FedBuff:
    if i % 3 == 1:
        return FedAsync(np.zeros(N), alpha=0.5, staleness=Constant(), clip_norm=10.0)
    if i % 3 == 2:  # central DP with a budget of a few versions, and tight deferral caps
        return FedBuff(
            np.zeros(N), buffer_size=2, dp=DPConfig(1.0, 1.0, budget=8.0), max_deferred=2,
            max_deferred_per_client=1, max_deferred_bytes=200,
        )  # fmt: skip
    return FedBuff(np.zeros(N), buffer_size=2, clip_norm=1.0, max_deferred=1)


def run(inputs: int, seed: int, reset: int, crashes: Path | None) -> dict[str, Any]:
    private, public = generate_keypair()
    seeds = _seeds(np.random.default_rng(seed), private)
    mut = Mutator(seed, seeds)
    ingests = [
        Ingest(MODEL, LAYOUT, max_bytes=1 << 16),
        Ingest(MODEL, LAYOUT, max_bytes=1 << 16,
               verifier=Verifier({"dev-1": public}, required=True)),
    ]  # fmt: skip
    refusals: collections.Counter[str] = collections.Counter()
    folded = found = 0
    policies = [_policy(k) for k in range(3)]
    t0 = time.perf_counter()
    for i in range(inputs):
        if i % reset == 0:
            policies = [_policy(k) for k in range(3)]
        raw, source = mut.next()
        policy = policies[i % 3]
        try:
            verdict = judge(ingests[(i // 2) % 2], policy, raw, source)
        except Exception as exc:  # judge must never raise
            verdict = Refusal(Reason.INTERNAL_ERROR, repr(exc), error=exc)
        if isinstance(verdict, Folded):
            folded += 1
            if not np.isfinite(policy.model).all():
                verdict = Refusal(Reason.INTERNAL_ERROR, "non-finite model after a fold")
        if isinstance(verdict, Refusal):
            refusals[verdict.reason.value] += 1
            if verdict.reason is Reason.INTERNAL_ERROR:
                found += 1
                print(f"crash {found}: {verdict.detail[:200]}", file=sys.stderr)
                if crashes is not None:
                    crashes.mkdir(parents=True, exist_ok=True)
                    (crashes / f"crash-{i}.bin").write_bytes(raw)
    seconds = time.perf_counter() - t0
    return {
        "inputs": inputs,
        "seed": seed,
        "folded": folded,
        "refused": sum(refusals.values()),
        "refusals_by_reason": dict(refusals.most_common()),
        "crashes": found,
        "seconds": round(seconds, 1),
        "inputs_per_second": round(inputs / seconds),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reset", type=int, default=1000, help="new policies every this many")
    ap.add_argument("--crashes", type=Path, default=None, help="keep crashing inputs here")
    ap.add_argument("--json", type=Path, default=None, help="write the summary here too")
    args = ap.parse_args()
    summary = run(args.inputs, args.seed, args.reset, args.crashes)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
