"""Compile (or load from the on-disk cache) every kernel signature a worker or device uses.

Workers call :func:`warm` before they report ready, so the first real update does not pay
for compilation; CI calls it once so the test suite finds a filled cache.
"""

from __future__ import annotations

import numpy as np


def warm() -> None:
    from fedbus.kernels.jit import fold, optim
    from fedbus.wire.codecs import CodecSpec, decode, encode

    rng = np.random.default_rng(0)
    x = rng.standard_normal(300)
    acc = np.zeros(300)
    for text in (
        "fp32",
        "fp16",
        "int8",
        "int8:rounding=nearest",
        "int4",
        "topk:fraction=0.05",
        "topk:fraction=0.5",
        "topk:fraction=0.05,values=fp16",
    ):
        spec = CodecSpec.parse(text)
        for v in (x, x.astype(np.float32)):
            decode(encode(v, spec, rng), spec, 300).fold_into(acc, 0.5)
    q = rng.integers(-127, 128, (9, 300)).astype(np.int8)
    s = np.ones((9, 2), np.float32)
    fold.fold_int8_rows(acc, q, s, 256, np.ones(9))
    fold.fold_int8_rows_parallel(acc, q, s, 256, np.ones(9))
    m, v = np.zeros(300), np.zeros(300)
    optim.sgd_step(acc, x, 0.1)
    optim.sgd_momentum_step(acc, x, m, 0.1, 0.9, True)
    optim.adam_step(acc, x, m, v, 1, 0.1, 0.9, 0.999, 1e-8, 0.0)
    optim.mix_step(acc, x, 0.5)


if __name__ == "__main__":
    warm()
