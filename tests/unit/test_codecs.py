"""Codecs: error bounds, round trips and strict decoding, checked against float64 NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedbus.wire.codecs import CodecSpec, ErrorFeedback, decode, decode_dense, encode
from fedbus.wire.errors import Reason, WireError

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
vectors = st.integers(1, 700).flatmap(lambda n: arrays(np.float32, n, elements=finite))
blocks = st.sampled_from([2, 8, 64, 256])


TINY = float(np.finfo(np.float32).tiny)


def block_max(x: np.ndarray, block: int) -> np.ndarray:
    """Per-coordinate absmax of the block that coordinate belongs to (the float64 oracle)."""
    n = x.shape[0]
    pad = np.zeros(-n % block)
    m = np.abs(np.concatenate([x.astype(np.float64), pad])).reshape(-1, block).max(axis=1)
    return np.repeat(m, block)[:n]


# -- oracles from the reference notes (section 8.2) ----------------------------------------


def test_int8_nearest_oracle() -> None:
    x = np.array([0.3, -1.0, 0.25, 0.0])
    spec = CodecSpec("int8", block=4, rounding="nearest")
    payload = encode(x, spec)
    q = np.frombuffer(payload, np.int8, offset=4)
    assert q.tolist() == [38, -127, 32, 0]
    np.testing.assert_allclose(
        decode_dense(payload, spec, 4), [0.2992125984, -1.0, 0.2519685039, 0.0], rtol=1e-7
    )


def test_int4_nearest_oracle() -> None:
    x = np.array([0.3, -1.0, 0.25, 0.0])
    spec = CodecSpec("int4", block=4, rounding="nearest")
    np.testing.assert_allclose(
        decode_dense(encode(x, spec), spec, 4), [2 / 7, -1.0, 2 / 7, 0.0], rtol=1e-7
    )


def test_compression_ratios_match_formula() -> None:
    n = 1 << 20
    assert CodecSpec("int8", block=256).compression_ratio(n) == pytest.approx(3.9385, abs=1e-4)
    assert CodecSpec("int4", block=64).compression_ratio(n) == pytest.approx(7.1111, abs=1e-4)
    assert CodecSpec("fp16").compression_ratio(n) == 2.0
    # top-5% with int8 values: bitmap index (n bits) + k bytes + scales, above 20x.
    assert CodecSpec("topk", fraction=0.05).compression_ratio(n) > 20


# -- properties -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(x=vectors, block=blocks, name=st.sampled_from(["int8", "int4"]))
def test_nearest_error_bound(x: np.ndarray, block: int, name: str) -> None:
    q_max = 127 if name == "int8" else 7
    spec = CodecSpec(name, block=block, rounding="nearest")  # type: ignore[arg-type]
    out = decode_dense(encode(x, spec), spec, x.shape[0])
    m = block_max(x, block)
    # The scale is stored as float32: allow its rounding (relative 2^-24) on top of M/(2Q).
    # Blocks whose scale would be subnormal are sent as zeros (error at most M, < 1.5e-36).
    bound = np.where(m / q_max < TINY, m, m / (2 * q_max) * (1 + 1e-6))
    assert np.all(np.abs(out - x) <= bound)


@settings(max_examples=60, deadline=None)
@given(x=vectors, block=blocks, name=st.sampled_from(["int8", "int4"]), seed=st.integers(0, 2**31))
def test_stochastic_error_bound(x: np.ndarray, block: int, name: str, seed: int) -> None:
    q_max = 127 if name == "int8" else 7
    spec = CodecSpec(name, block=block)  # type: ignore[arg-type]
    out = decode_dense(encode(x, spec, np.random.default_rng(seed)), spec, x.shape[0])
    m = block_max(x, block)
    normal = m / q_max >= TINY  # smaller blocks are sent as zeros: error at most M
    assert np.all(np.abs(out - x)[~normal] <= m[~normal])
    err, bound = np.abs(out - x)[normal], (m / q_max * (1 + 1e-6))[normal]
    assert np.all(err < bound)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_stochastic_rounding_is_unbiased(name: str) -> None:
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, 64)
    x[0] = 1.0  # fix the block max so the scale is the same in every draw
    spec = CodecSpec(name, block=64)  # type: ignore[arg-type]
    draws = 4000
    mean = np.mean([decode_dense(encode(x, spec, rng), spec, 64) for _ in range(draws)], axis=0)
    q_max = 127 if name == "int8" else 7
    # per-coordinate variance <= (M/Q)^2 / 4: the Monte Carlo mean is within 5 sigma of x
    sigma = (1.0 / q_max) / 2 / np.sqrt(draws)
    assert np.all(np.abs(mean - x) < 5 * sigma)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 600), block=blocks, name=st.sampled_from(["int8", "int4", "fp16", "fp32"]))
def test_all_zero_decodes_to_zero(n: int, block: int, name: str) -> None:
    spec = CodecSpec(name, block=block if name in ("int8", "int4") else 0)  # type: ignore[arg-type]
    out = decode_dense(encode(np.zeros(n), spec), spec, n)
    assert np.array_equal(out, np.zeros(n))


@settings(max_examples=60, deadline=None)
@given(
    x=vectors,
    spec_text=st.sampled_from(
        [
            "fp32",
            "fp16",
            "int8",
            "int4",
            "int8+zstd",
            "topk:fraction=0.05",
            "topk:fraction=0.3,values=fp16",
            "topk:fraction=0.01",
            "int4:block=8+zstd",
        ]
    ),
)
def test_round_trip_and_lazy_fold(x: np.ndarray, spec_text: str) -> None:
    """Decoding twice gives the same vector; the fused fold and norm equal the dense oracle."""
    spec = CodecSpec.parse(spec_text)
    n = x.shape[0]
    payload = encode(x, spec, np.random.default_rng(0))
    if not spec.zstd:
        assert len(payload) == spec.raw_size(n)
    d = decode(payload, spec, n)
    dense = d.to_dense()
    assert np.array_equal(dense, decode_dense(payload, spec, n))
    assert d.sq_norm() == pytest.approx(float(dense @ dense), rel=1e-9, abs=1e-12)
    acc = np.arange(n, dtype=np.float64)
    d.fold_into(acc, -0.5)
    np.testing.assert_allclose(acc, np.arange(n) - 0.5 * dense, rtol=1e-12, atol=1e-12)
    if spec.name == "fp32":
        assert np.array_equal(dense, x.astype(np.float64))


@settings(max_examples=40, deadline=None)
@given(x=vectors, fraction=st.floats(0.01, 1.0))
def test_topk_keeps_the_largest(x: np.ndarray, fraction: float) -> None:
    spec = CodecSpec("topk", fraction=fraction, values="fp16")
    out = decode_dense(encode(x, spec), spec, x.shape[0])
    k = spec.k_for(x.shape[0])
    kept = np.flatnonzero(out)
    assert kept.shape[0] <= k
    # Every dropped coordinate is no larger than every kept one (ties may go either way).
    dropped = np.setdiff1d(np.arange(x.shape[0]), kept)
    if kept.size and dropped.size:
        assert np.abs(x[dropped]).max() <= np.abs(x[kept]).min() + 1e-6


def test_topk_error_feedback_oracle() -> None:
    """algorithms.md 8.2, k = 1 with error feedback, on values fp16 represents exactly."""
    ef = ErrorFeedback(4, CodecSpec("topk", fraction=0.25, values="fp16"))
    g1 = np.array([0.5, -2.0, 1.0, 0.125])
    c1 = decode_dense(ef.encode(g1), ef.spec, 4)
    np.testing.assert_allclose(c1, [0, -2, 0, 0])
    np.testing.assert_allclose(ef.residual, [0.5, 0, 1.0, 0.125])
    g2 = np.array([0.625, 0.125, -0.25, 0.125])
    c2 = decode_dense(ef.encode(g2), ef.spec, 4)
    np.testing.assert_allclose(c2, [1.125, 0, 0, 0])
    np.testing.assert_allclose(c1 + c2 + ef.residual, g1 + g2)


@settings(max_examples=25, deadline=None)
@given(
    steps=st.lists(arrays(np.float64, 50, elements=st.floats(-10, 10)), min_size=1, max_size=6),
    spec_text=st.sampled_from(
        ["topk:fraction=0.1", "int4", "topk:fraction=0.2,values=fp16", "int8"]
    ),
)
def test_error_feedback_invariant(steps: list[np.ndarray], spec_text: str) -> None:
    """sum(sent) + residual == sum(inputs), whatever the codec drops or rounds."""
    spec = CodecSpec.parse(spec_text)
    ef = ErrorFeedback(50, spec)
    rng = np.random.default_rng(1)
    sent = sum(decode_dense(ef.encode(g, rng), spec, 50) for g in steps)
    np.testing.assert_allclose(sent + ef.residual, np.sum(steps, axis=0), atol=1e-9)


# -- strict decoding --------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec_text", ["fp32", "fp16", "int8", "int4", "topk:fraction=0.1", "topk:fraction=0.01"]
)
def test_wrong_length_is_rejected(spec_text: str) -> None:
    spec = CodecSpec.parse(spec_text)
    payload = encode(np.ones(1000), spec)
    for bad in (payload[:-1], payload + b"\0", b""):
        with pytest.raises(WireError) as e:
            decode(bad, spec, 1000)
        assert e.value.reason in (Reason.PAYLOAD_LENGTH, Reason.MALFORMED)
    with pytest.raises(WireError) as e:
        decode(payload, spec, 900)
    assert e.value.reason == Reason.PAYLOAD_LENGTH


def test_non_finite_values_and_scales_are_rejected() -> None:
    bad = np.array([1.0, np.nan, 2.0], dtype="<f4").tobytes()
    with pytest.raises(WireError) as e:
        decode(bad, CodecSpec("fp32"), 3)
    assert e.value.reason == Reason.NON_FINITE
    inf16 = np.array([1.0, np.inf], dtype="<f2").tobytes()
    with pytest.raises(WireError) as e:
        decode(inf16, CodecSpec("fp16"), 2)
    assert e.value.reason == Reason.NON_FINITE
    spec = CodecSpec("int8", block=4)
    payload = bytearray(encode(np.ones(8), spec))
    payload[0:4] = np.array([np.inf], "<f4").tobytes()
    with pytest.raises(WireError) as e:
        decode(bytes(payload), spec, 8)
    assert e.value.reason == Reason.NON_FINITE


def test_bad_topk_indices_are_rejected() -> None:
    spec = CodecSpec("topk", fraction=0.01, values="fp16")
    n = 1000
    payload = bytearray(encode(np.arange(n, dtype=np.float64), spec))
    idx = np.frombuffer(bytes(payload), "<u4", count=10, offset=4).copy()
    for bad in (idx[::-1], np.full(10, 5), idx + 1000):
        payload[4:44] = bad.astype("<u4").tobytes()
        with pytest.raises(WireError) as e:
            decode(bytes(payload), spec, n)
        assert e.value.reason == Reason.MALFORMED


def test_decompression_bomb_is_refused() -> None:
    spec = CodecSpec("int8", zstd=True)
    n = 1000
    honest = encode(np.ones(n), spec)
    assert decode(honest, spec, n).n == n
    # A frame that expands to far more than the codec's exact size, with or without a size header.
    for comp in (zstandard.ZstdCompressor(), zstandard.ZstdCompressor(write_content_size=False)):
        bomb = comp.compress(b"\0" * 50_000_000)
        assert len(bomb) < 10_000
        with pytest.raises(WireError) as e:
            decode(bomb, spec, n)
        assert e.value.reason == Reason.DECOMPRESSION_BOMB
    with pytest.raises(WireError) as e:
        decode(b"not a zstd frame", spec, n)
    assert e.value.reason == Reason.MALFORMED


def test_zstd_window_larger_than_the_payload_is_refused_before_decoding() -> None:
    """A frame may claim a window of up to 2 GiB, which the decoder would allocate: for a
    1,000-parameter int8 payload no window beyond 2 KiB is honest."""
    spec = CodecSpec("int8", zstd=True)
    n = 1000
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27)
    raw = encode(np.ones(n), CodecSpec("int8")) + b"\0" * (1 << 20)
    big_window = zstandard.ZstdCompressor(compression_params=params).compress(raw)
    with pytest.raises(WireError) as e:
        decode(big_window, spec, n)
    assert e.value.reason == Reason.DECOMPRESSION_BOMB


@pytest.mark.parametrize(
    "wire",
    [
        {},
        {"name": "int9"},
        {"name": "int8", "block": 0.5},
        {"name": "int8", "block": 1},
        {"name": "int4", "block": 7},
        {"name": "topk", "fraction": 0},
        {"name": "topk", "fraction": 2.0},
        {"name": "int8", "zstd": "yes"},
        {"name": "int8", "block": True},
        {"name": "int8", "rounding": "up"},
    ],
)
def test_bad_codec_maps_are_rejected(wire: dict[str, object]) -> None:
    with pytest.raises(WireError) as e:
        CodecSpec.from_wire(wire)
    assert e.value.reason == Reason.UNKNOWN_CODEC


@pytest.mark.parametrize(
    "text", ["int8", "int4:block=32", "topk:fraction=0.05,values=fp16", "fp16+zstd"]
)
def test_spec_wire_round_trip(text: str) -> None:
    spec = CodecSpec.parse(text)
    assert CodecSpec.from_wire(spec.to_wire()) == spec


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_largest_scales_keep_the_norm_finite(name: str) -> None:
    """Why decode skips the non-finite check for integer codes: the worst finite float32
    scales with the largest codes still give a finite float64 norm (hand-derived bound)."""
    spec = CodecSpec(name, block=2)
    n = 4096
    nb = n // 2
    scales = np.full(nb, np.finfo(np.float32).max, dtype="<f4").tobytes()
    codes = np.full(n, 127, np.int8).tobytes() if name == "int8" else bytes([0x77]) * (n // 2)
    d = decode(scales + codes, spec, n)
    q = 127.0 if name == "int8" else 7.0
    expected = n * (float(np.finfo(np.float32).max) * q) ** 2
    assert np.isfinite(d.sq_norm())
    assert d.sq_norm() == pytest.approx(expected, rel=1e-12)
