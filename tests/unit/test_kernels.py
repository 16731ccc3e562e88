"""Both kernel backends (Numba and plain NumPy) against float64 NumPy references written here."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.kernels.jit import blockwise as jit_blockwise
from fedbus.kernels.jit import fold as jit_fold
from fedbus.kernels.jit import optim as jit_optim
from fedbus.kernels.plain import blockwise as plain_blockwise
from fedbus.kernels.plain import fold as plain_fold
from fedbus.kernels.plain import optim as plain_optim

BACKENDS = {
    "jit": SimpleNamespace(blockwise=jit_blockwise, fold=jit_fold, optim=jit_optim),
    "plain": SimpleNamespace(blockwise=plain_blockwise, fold=plain_fold, optim=plain_optim),
}
each_backend = pytest.mark.parametrize("kb", list(BACKENDS.values()), ids=list(BACKENDS))


def ref_dequant(q: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    return q.astype(np.float64) * np.repeat(scales.astype(np.float64), block)[: q.shape[0]]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    block=st.sampled_from([2, 64, 256]),
    k=st.integers(1, 27),
    seed=st.integers(0, 999),
)
@each_backend
def test_fold_int8_rows_equals_reference(
    kb: SimpleNamespace, n: int, block: int, k: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scales = rng.uniform(0, 0.1, (k, (n + block - 1) // block)).astype(np.float32)
    factors = rng.uniform(-2, 2, k)
    ref = rng.standard_normal(n)
    acc_rows, acc_one = ref.copy(), ref.copy()
    for i in range(k):
        ref += factors[i] * ref_dequant(q[i], scales[i], block)
        kb.fold.fold_int8(acc_one, q[i], scales[i], block, factors[i])
    kb.fold.fold_int8_rows(acc_rows, q, scales, block, factors)
    np.testing.assert_allclose(acc_one, ref, rtol=1e-12, atol=1e-12)
    # groups of eight rows sum their products in float32 before the float64 accumulator
    # bound: sum over rows of |factor| * max|decoded row|, times float32's relative error
    magnitude = sum(
        abs(factors[i]) * np.abs(ref_dequant(q[i], scales[i], block)).max() for i in range(k)
    )
    np.testing.assert_allclose(acc_rows, ref, rtol=0, atol=float(magnitude) * 1e-6 + 1e-12)
    assert kb.fold.int8_sq_norm(q[0], scales[0], block) == pytest.approx(
        float(np.sum(ref_dequant(q[0], scales[0], block) ** 2)), rel=1e-12
    )


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2000), block=st.sampled_from([2, 8, 64]), seed=st.integers(0, 999))
@each_backend
def test_int4_pack_fold_norm(kb: SimpleNamespace, n: int, block: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    q = rng.integers(-7, 8, n).astype(np.int8)
    packed = kb.blockwise.pack_int4(q)
    assert packed.shape[0] == (n + 1) // 2
    assert np.array_equal(kb.blockwise.unpack_int4(packed, n), q)
    scales = rng.uniform(0, 1, (n + block - 1) // block).astype(np.float32)
    acc = np.zeros(n)
    kb.fold.fold_int4(acc, packed, scales, block, n, 0.75)
    ref = 0.75 * ref_dequant(q, scales, block)
    np.testing.assert_allclose(acc, ref, rtol=1e-12, atol=1e-15)
    assert kb.fold.int4_sq_norm(packed, scales, block, n) == pytest.approx(
        float(np.sum((ref / 0.75) ** 2)), rel=1e-12
    )


@each_backend
def test_sparse_folds_and_index_check(kb: SimpleNamespace) -> None:
    acc = np.zeros(10)
    idx = np.array([1, 4, 9], dtype=np.uint32)
    kb.fold.fold_sparse(acc, idx, np.array([1.0, -2.0, 3.0], np.float32), 2.0)
    assert acc.tolist() == [0, 2, 0, 0, -4, 0, 0, 0, 0, 6]
    assert kb.fold.indices_valid(idx, 10)
    assert not kb.fold.indices_valid(idx, 9)
    assert not kb.fold.indices_valid(np.array([1, 1], np.uint32), 10)
    assert not kb.fold.indices_valid(np.array([3, 2], np.uint32), 10)


@each_backend
def test_float_norm_propagates_nan(kb: SimpleNamespace) -> None:
    assert np.isnan(kb.fold.float_sq_norm(np.array([1.0, np.nan], np.float32)))
    assert np.isinf(kb.fold.float_sq_norm(np.array([1.0, np.inf])))
    assert kb.fold.float_sq_norm(np.array([3.0, 4.0], np.float32)) == 25.0


@each_backend
def test_quantize_matches_numpy_reference(kb: SimpleNamespace) -> None:
    rng = np.random.default_rng(3)
    v = rng.standard_normal(1000)
    q, s = kb.blockwise.quantize_blockwise(v, 256, 127, False, 0)
    m = np.array([np.abs(v[i : i + 256]).max() for i in range(0, 1000, 256)])
    np.testing.assert_allclose(s, (m / 127).astype(np.float32))
    ref = np.clip(np.floor(v / np.repeat(s.astype(np.float64), 256)[:1000] + 0.5), -127, 127)
    assert np.array_equal(q, ref.astype(np.int8))
    # same seed, same bytes; other seed, other bytes
    a = kb.blockwise.quantize_blockwise(v, 256, 127, True, 11)[0]
    assert np.array_equal(a, kb.blockwise.quantize_blockwise(v, 256, 127, True, 11)[0])
    assert not np.array_equal(a, kb.blockwise.quantize_blockwise(v, 256, 127, True, 12)[0])


# -- optimizer steps: the oracles of algorithms.md 8.2 -------------------------------------


@each_backend
def test_momentum_oracle(kb: SimpleNamespace) -> None:
    x, m = np.zeros(2), np.zeros(2)
    kb.optim.sgd_momentum_step(x, np.array([0.2, 0.4]), m, 1.0, 0.9, True)
    kb.optim.sgd_momentum_step(x, np.array([0.1, -0.1]), m, 1.0, 0.9, False)
    np.testing.assert_allclose(m, [0.28, 0.26])
    np.testing.assert_allclose(x, [0.48, 0.66])


@each_backend
def test_adam_oracle_and_reference(kb: SimpleNamespace) -> None:
    x, m, v = np.zeros(2), np.zeros(2), np.zeros(2)
    kb.optim.adam_step(x, np.array([2 / 9, 4 / 9]), m, v, 1, 0.01, 0.9, 0.999, 1e-8, 0.0)
    np.testing.assert_allclose(x, [9.99999955e-3, 9.999999775e-3], rtol=1e-8)
    # several steps with weight decay against a plain NumPy transcription of torch.optim.Adam
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50)
    xr, m, v, mr, vr = x.copy(), np.zeros(50), np.zeros(50), np.zeros(50), np.zeros(50)
    for t in range(1, 6):
        u = rng.standard_normal(50)
        kb.optim.adam_step(x, u, m, v, t, 0.05, 0.9, 0.99, 1e-8, 1e-3)
        g = -u + 1e-3 * xr
        mr = 0.9 * mr + 0.1 * g
        vr = 0.99 * vr + 0.01 * g * g
        xr = xr - 0.05 / (1 - 0.9**t) * mr / (np.sqrt(vr) / np.sqrt(1 - 0.99**t) + 1e-8)
    np.testing.assert_allclose(x, xr, rtol=1e-12)


@each_backend
def test_mix_and_sgd(kb: SimpleNamespace) -> None:
    x = np.array([1.0, 2.0])
    kb.optim.mix_step(x, np.array([3.0, -2.0]), 0.0545454545)
    np.testing.assert_allclose(x, [1.1090909091, 1.7818181818], rtol=1e-9)
    kb.optim.sgd_step(x, np.array([1.0, 1.0]), 0.5)
    np.testing.assert_allclose(x, [1.6090909091, 2.2818181818], rtol=1e-9)
