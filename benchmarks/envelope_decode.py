"""Envelope decoding: fedbus's validators against a msgspec Struct doing the same checks.

The package issue asked whether a library (msgspec Structs, or pydantic) should replace the
hand-written envelope validation, measured before switching. This decodes one update
envelope both ways, a small one (a 650-parameter top-k payload) and a large one (1M
parameters in int8), and prints the median time of each and their ratio. The msgspec
Struct checks what the wire format needs that a schema can say: field types, the id
pattern, non-negative integers, the fingerprint's shape, a size cap on the message. What it
cannot say (a codec map's allowed keys per codec, metrics values that must be finite,
a refusal *reason* per failure, which the dead-letter contract needs) would still be
hand-written after it.

    python benchmarks/envelope_decode.py           # needs: pip install msgspec
"""

from __future__ import annotations

import statistics
import time
from typing import Annotated

import msgspec
import numpy as np

from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, encode
from fedbus.wire.ids import ID_PATTERN

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Fingerprint = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{32}$")]


class Update(msgspec.Struct, forbid_unknown_fields=True):
    schema: Count
    type: str
    model: Id
    client: Id
    update_id: Id
    base_version: Count
    num_examples: Count
    codec: dict[str, str | int | float | bool | None]
    layout: Fingerprint
    payload: bytes
    sig: bytes | None = None
    metrics: dict[str, float | int] | None = None
    sent_at: float | None = None
    seq: Count | None = None
    created_at: float | None = None


def message(n_params: int, codec: str) -> bytes:
    spec = CodecSpec.parse(codec)
    delta = np.random.default_rng(0).standard_normal(n_params).astype(np.float32)
    return env.encode(
        env.UpdateEnvelope(
            model="digits", client="dev-0001", update_id="u-000001", base_version=7,
            num_examples=32, codec=spec.to_wire(), layout="0" * 32,
            payload=encode(delta, spec), seq=12, metrics={"loss": 0.2},
        )
    )  # fmt: skip


def median_us(fn: object, raw: bytes, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(raw)  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    decoder = msgspec.msgpack.Decoder(Update)
    print("| message | bytes | fedbus decode (µs) | msgspec Struct (µs) | fedbus / msgspec |")
    print("|---|---:|---:|---:|---:|")
    for label, n, codec, reps in (
        ("650 params, top-k 5 % + int8", 650, "topk:fraction=0.05", 20000),
        ("1M params, int8", 1_000_000, "int8", 300),
    ):
        raw = message(n, codec)
        assert decoder.decode(raw).client == env.decode(raw).client  # type: ignore[union-attr]
        ours = [median_us(env.decode, raw, reps) for _ in range(5)]
        theirs = [median_us(decoder.decode, raw, reps) for _ in range(5)]
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"| {label} | {len(raw):,} | {a:.1f} | {b:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
