"""Kernel benchmark: fold K encoded updates of N parameters into one accumulator.

Every figure is a ratio against baselines timed in the same process and the same repeat:
- ``numpy``: the naive path a reader would write (dequantise each update, then add);
- ``flower``: Flower's ``flwr.server.strategy.aggregate.aggregate`` (and ``aggregate_inplace``
  where its ``FitRes`` input is cheap to build) on the same float32 values;
- the roofline: NumPy copying a large float32 array, in GB/s (read + write bytes).

Ratios are computed per repeat and their median is reported, so a slow moment of the
machine slows both sides of a ratio alike. Peak memory is what the fold allocates beyond
its inputs, accumulator included (``tracemalloc`` sees NumPy's allocations; the Numba
kernels allocate nothing). The roofline array is 128 MB, far larger than the caches.
"""

from __future__ import annotations

import functools
import gc
import itertools
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

from fedbus.kernels.jit import fold
from fedbus.wire.codecs import CodecSpec, decode, encode

CODECS = ("int8", "int4", "fp16", "fp32", "topk")
_SPECS = {
    "int8": CodecSpec("int8"),
    "int4": CodecSpec("int4"),
    "fp16": CodecSpec("fp16"),
    "fp32": CodecSpec("fp32"),
    "topk": CodecSpec("topk", fraction=0.05),
}


@dataclass
class Record:
    """One fedbus case; the keys are the ``--json`` contract."""

    codec: str
    n_params: int
    k_updates: int
    threads: int
    path: str  # "batch" (K updates folded together, FedBuff) or "stream" (one at a time)
    seconds: float
    params_per_s: float
    vs_numpy: float
    vs_flower: float | None
    roofline_fraction: float
    roofline_gbps: float
    peak_mem_bytes: int
    numpy_peak_mem_bytes: int
    flower_peak_mem_bytes: int | None


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peak(fn: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def copy_bandwidth(n: int = 32_000_000, repeats: int = 5) -> float:
    """NumPy float32 copy of ``n`` elements: bytes read + written per second (GB/s)."""
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    times = [_timed(lambda: np.copyto(dst, src)) for _ in range(repeats)]
    return 2 * src.nbytes / statistics.median(times) / 1e9


def _flower() -> Callable[[list[tuple[list[np.ndarray], int]]], list[np.ndarray]] | None:
    try:
        from flwr.server.strategy.aggregate import aggregate
    except ImportError:  # the bench extra is not installed
        return None
    return aggregate


class _Case:
    """K encoded updates of one codec, their dense float32 twins, and the contenders."""

    def __init__(self, codec: str, n: int, k: int, rng: np.random.Generator) -> None:
        self.spec = _SPECS[codec]
        self.n, self.k = n, k
        self.factors = rng.uniform(0.1, 1.0, k)
        base = rng.standard_normal(n).astype(np.float32) * 0.01
        # Distinct updates without K full random draws: roll one vector by a different shift.
        self.payloads = [encode(np.roll(base, 7919 * i), self.spec, rng) for i in range(k)]
        self.deltas = [decode(p, self.spec, n) for p in self.payloads]
        self.dense = np.stack([d.to_dense().astype(np.float32) for d in self.deltas])
        if codec == "int8":
            nb = self.deltas[0].scales.shape[0]  # type: ignore[union-attr]
            self.q = np.stack([getattr(d, "codes") for d in self.deltas])  # noqa: B009
            self.scales = np.stack([getattr(d, "scales") for d in self.deltas])  # noqa: B009
            assert self.scales.shape == (k, nb)
        self.examples = [int(100 + 9 * i) for i in range(k)]

    def min_bytes(self) -> float:
        """What the fold must move at least: every payload once, the float64 accumulator r+w."""
        return self.k * self.spec.raw_size(self.n) + 16 * self.n

    # contenders: each returns the float64 accumulator
    def stream(self) -> np.ndarray:
        acc = np.zeros(self.n)
        for d, f in zip(self.deltas, self.factors, strict=True):
            d.fold_into(acc, float(f))
        return acc

    def batch(self, parallel: bool) -> np.ndarray:
        acc = np.zeros(self.n)
        kernel = fold.fold_int8_rows_parallel if parallel else fold.fold_int8_rows
        kernel(acc, self.q, self.scales, self.spec.block, self.factors)
        return acc

    def numpy(self) -> np.ndarray:
        """Naive NumPy: dequantise every update into a fresh array, then add it."""
        acc = np.zeros(self.n)
        block = self.spec.block
        for p, f in zip(self.payloads, self.factors, strict=True):
            if self.spec.name == "int8":
                nb = -(-self.n // block)
                s = np.frombuffer(p, "<f4", nb)
                q = np.frombuffer(p, np.int8, offset=4 * nb)
                deq = q.astype(np.float32) * np.repeat(s, block)[: self.n]
            elif self.spec.name == "int4":
                nb = -(-self.n // block)
                s = np.frombuffer(p, "<f4", nb)
                packed = np.frombuffer(p, np.uint8, offset=4 * nb).astype(np.int8)
                lo = ((packed & 0xF) ^ 8) - 8
                hi = ((packed >> 4 & 0xF) ^ 8) - 8
                q = np.stack([lo, hi], axis=1).reshape(-1)[: self.n]
                deq = q.astype(np.float32) * np.repeat(s, block)[: self.n]
            elif self.spec.name in ("fp16", "fp32"):
                deq = np.frombuffer(p, "<f2" if self.spec.name == "fp16" else "<f4").astype(
                    np.float32
                )
            else:
                deq = decode(p, self.spec, self.n).to_dense()
            acc += f * deq
        return acc

    def flower(self, aggregate: Callable[..., list[np.ndarray]]) -> list[np.ndarray]:
        """Flower's FedAvg helper on the same values, as six layers (views, no copies)."""
        cuts = [0, self.n // 2, self.n // 2 + 1000, (9 * self.n) // 10, self.n - 10, self.n]
        results = [
            ([row[a:b] for a, b in itertools.pairwise(cuts)], e)
            for row, e in zip(self.dense, self.examples, strict=True)
        ]
        return aggregate(results)


def run(
    sizes: Iterable[int] = (100_000, 1_000_000, 10_000_000),
    ks: Iterable[int] = (10, 100),
    codecs: Iterable[str] = CODECS,
    repeats: int = 5,
    seed: int = 0,
    log: Callable[[str], None] = lambda _m: None,
) -> list[Record]:
    """Run every (codec, N, K) case; returns one :class:`Record` per fedbus contender."""
    rng = np.random.default_rng(seed)
    aggregate = _flower()
    records: list[Record] = []
    for n in sizes:
        for k in ks:
            for codec in codecs:
                log(f"{codec} N={n:,} K={k}")
                case = _Case(codec, n, k, rng)
                contenders: list[tuple[str, int, Callable[[], np.ndarray]]] = [
                    ("stream", 1, case.stream)
                ]
                if codec == "int8":
                    contenders += [
                        ("batch", 1, functools.partial(case.batch, False)),
                        ("batch", 2, functools.partial(case.batch, True)),
                    ]
                # correctness guard: every contender agrees with naive NumPy
                ref = case.numpy()
                for _, _, fn in contenders:
                    got = fn()
                    tol = 1e-5 * float(np.abs(ref).max() + 1e-30)
                    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
                roof: list[float] = []
                t_numpy: list[float] = []
                t_flower: list[float] = []
                t_ours: dict[tuple[str, int], list[float]] = {(p, t): [] for p, t, _ in contenders}
                for _ in range(repeats):
                    roof.append(copy_bandwidth())
                    t_numpy.append(_timed(case.numpy))
                    if aggregate is not None:
                        t_flower.append(_timed(functools.partial(case.flower, aggregate)))
                    for path, threads, fn in contenders:
                        t_ours[(path, threads)].append(_timed(fn))
                roof_gbps = statistics.median(roof)
                numpy_peak = _peak(case.numpy)
                flower_peak = (
                    _peak(functools.partial(case.flower, aggregate)) if aggregate else None
                )
                for path, threads, fn in contenders:
                    ts = t_ours[(path, threads)]
                    med = statistics.median(ts)
                    records.append(
                        Record(
                            codec=codec,
                            n_params=n,
                            k_updates=k,
                            threads=threads,
                            path=path,
                            seconds=med,
                            params_per_s=n * k / med,
                            vs_numpy=statistics.median(
                                a / b for a, b in zip(t_numpy, ts, strict=True)
                            ),
                            vs_flower=statistics.median(
                                a / b for a, b in zip(t_flower, ts, strict=True)
                            )
                            if t_flower
                            else None,
                            roofline_fraction=statistics.median(
                                case.min_bytes() / t / 1e9 / r
                                for t, r in zip(ts, roof, strict=True)
                            ),
                            roofline_gbps=roof_gbps,
                            peak_mem_bytes=_peak(fn),
                            numpy_peak_mem_bytes=numpy_peak,
                            flower_peak_mem_bytes=flower_peak,
                        )
                    )
                del case
                gc.collect()
    return records


def as_dicts(records: list[Record]) -> list[dict[str, object]]:
    return [asdict(r) for r in records]


def markdown_table(records: list[Record]) -> str:
    """The README table: medians, ratios paired per repeat."""
    head = (
        "| codec | N | K | path | threads | Gparams/s | × NumPy | × Flower `aggregate` "
        "| roofline fraction | peak MiB (ours / NumPy / Flower) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for r in records:
        flower = f"{r.vs_flower:.1f}" if r.vs_flower is not None else "–"
        fpeak = f"{r.flower_peak_mem_bytes / 2**20:.0f}" if r.flower_peak_mem_bytes else "–"
        rows.append(
            f"| {r.codec} | {r.n_params:,} | {r.k_updates} | {r.path} | {r.threads} "
            f"| {r.params_per_s / 1e9:.2f} | {r.vs_numpy:.1f} | {flower} "
            f"| {r.roofline_fraction:.2f} "
            f"| {r.peak_mem_bytes / 2**20:.0f} / {r.numpy_peak_mem_bytes / 2**20:.0f} / {fpeak} |"
        )
    return head + "\n".join(rows) + "\n"


def compile_and_load_times() -> dict[str, float]:
    """Seconds to compile every kernel into an empty cache, then to load them from it."""
    import os
    import subprocess
    import sys
    import tempfile

    code = (
        "import time; t = time.perf_counter(); from fedbus.kernels.warm import warm; warm(); "
        "print(time.perf_counter() - t)"
    )
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("compile_s", "cached_load_s"):
            res = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            out[label] = float(res.stdout.strip().splitlines()[-1])
    return out
