"""Clipping, robust statistics and central DP against the oracles of algorithms.md 6 and 8.2."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedbus.aggregation import (
    Accountant,
    Constant,
    DenseDelta,
    DPConfig,
    FedBuff,
    FLSimNormalised,
    Hinge,
    Polynomial,
    Threshold,
    Update,
    clip,
    clip_factor,
    epsilon,
    robust_mean,
)

_ids = itertools.count()


def upd(u: list[float] | np.ndarray, base: int = 0, client: str | None = None) -> Update:
    i = next(_ids)
    return Update(client or f"c{i}", f"u{i}", base, 1, DenseDelta(np.asarray(u, dtype=float)))


# -- clipping --------------------------------------------------------------------------------


def test_clipping_oracle() -> None:
    np.testing.assert_allclose(clip(np.array([3.0, 4.0]), 1.0), [0.6, 0.8], rtol=1e-9)
    np.testing.assert_array_equal(clip(np.array([0.3, 0.4]), 1.0), [0.3, 0.4])
    assert clip_factor(25.0, 1.0) == 1.0 / (5.0 + 1e-10)  # FLSim's C / (||u|| + 1e-10)
    assert clip_factor(25.0, None) == 1.0
    assert clip_factor(0.0, 1.0) == 1.0  # a zero update is left alone, no division by zero


def test_fedbuff_clips_before_the_staleness_weight() -> None:
    fb = FedBuff(np.zeros(2), buffer_size=1, staleness=Constant(), clip_norm=1.0)
    fb.submit(upd([3.0, 4.0]))
    np.testing.assert_allclose(fb.model, [0.6, 0.8], rtol=1e-9)
    fb.submit(upd([0.3, 0.4], base=1))
    np.testing.assert_allclose(fb.model, [0.9, 1.2], rtol=1e-9)


# -- robust statistics -------------------------------------------------------------------------


def test_robust_oracles() -> None:
    col = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert robust_mean(col, "median")[0] == 3.0
    assert robust_mean(col, "trimmed_mean", 0.2)[0] == 3.0
    assert robust_mean(np.array([[1.0], [2.0], [3.0], [100.0]]), "median")[0] == 2.5
    with pytest.raises(ValueError):
        robust_mean(col, "trimmed_mean", 0.5)
    with pytest.raises(ValueError):
        robust_mean(np.zeros((0, 3)), "median")


def test_trimmed_mean_matches_reference() -> None:
    """K = 10, beta = 0.2: two values trimmed per side per coordinate."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((10, 50))
    srt = np.sort(rows, axis=0)
    np.testing.assert_allclose(robust_mean(rows, "trimmed_mean", 0.2), srt[2:8].mean(axis=0))
    np.testing.assert_allclose(robust_mean(rows, "trimmed_mean", 0.0), rows.mean(axis=0))


@pytest.mark.parametrize("mode", ["median", "trimmed_mean"])
def test_fedbuff_robust_modes_ignore_an_outlier(mode: str) -> None:
    fb = FedBuff(np.zeros(1), buffer_size=5, staleness=Constant(), robust=mode)  # type: ignore[arg-type]
    for v in (1.0, 2.0, 3.0, 4.0, 100.0):
        fb.submit(upd([v]))
    np.testing.assert_allclose(fb.model, [3.0])


def test_fedbuff_robust_rows_are_weighted_and_clipped() -> None:
    rng = np.random.default_rng(1)
    us, bases = rng.standard_normal((5, 8)) * 2, [4, 3, 4, 0, 2]
    fb = FedBuff(
        np.zeros(8), buffer_size=5, staleness=Polynomial(0.5), robust="median", clip_norm=3.0,
        version=4,
    )  # fmt: skip
    for u, b in zip(us, bases, strict=True):
        fb.submit(upd(u, base=b))
    rows = [
        (1 + 4 - b) ** -0.5 * min(1.0, 3.0 / (np.linalg.norm(u) + 1e-10)) * u
        for u, b in zip(us, bases, strict=True)
    ]
    np.testing.assert_allclose(fb.model, np.median(rows, axis=0), rtol=1e-12)


# -- differential privacy ------------------------------------------------------------------------


@pytest.mark.parametrize(("z", "c", "k"), [(1.0, 1.0, 10), (2.0, 0.5, 4)])
def test_dp_noise_std_is_zc_over_k(z: float, c: float, k: int) -> None:
    n = 200_000
    fb = FedBuff(
        np.zeros(n), buffer_size=k, staleness=Constant(), dp=DPConfig(z, c, insecure_seed=0)
    )
    for _ in range(k):
        fb.submit(upd(np.zeros(n)))
    assert fb.version == 1
    assert float(np.std(fb.model)) == pytest.approx(z * c / k, rel=0.01)
    assert abs(float(np.mean(fb.model))) < 4 * z * c / k / np.sqrt(n)


def test_dp_clips_to_its_clip_norm() -> None:
    fb = FedBuff(np.zeros(2), buffer_size=1, staleness=Constant(), dp=DPConfig(0.0, 1.0))
    fb.submit(upd([30.0, 40.0]))  # no server clip given: DP's C applies
    np.testing.assert_allclose(fb.model, [0.6, 0.8], rtol=1e-9)


def _state_bytes(obj: object) -> list[bytes]:
    """Every bytes value anywhere in a state (a noise key would be one)."""
    if isinstance(obj, bytes | bytearray):
        return [bytes(obj)]
    if isinstance(obj, dict):
        return [b for v in obj.values() for b in _state_bytes(v)]
    if isinstance(obj, list | tuple):
        return [b for v in obj for b in _state_bytes(v)]
    return []


def test_dp_noise_is_not_reproducible_from_the_checkpoint() -> None:
    """An attacker holding the checkpoint taken just before a flush, and the updates of that
    buffer, recomputes the flush: without the noise key (never in the state) the noise
    comes out different, so it cannot be subtracted from the published model."""
    n, k = 40_000, 4  # the std checks below sit 10 standard errors from failing by chance
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((k, n)) * 0.01
    live = FedBuff(np.zeros(n), buffer_size=k, staleness=Constant(), dp=DPConfig(1.0, 1.0))
    for i in range(k - 1):
        live.submit(Update(f"c{i}", f"u{i}", 0, 1, DenseDelta(rows[i])))
    state = live.state_dict()
    assert "rng" not in state and _state_bytes(state) == []
    last = Update(f"c{k}", f"u{k}", 0, 1, DenseDelta(rows[k - 1]))
    assert live.submit(last).new_version == 1
    (key,) = live.take_noise_keys()
    assert len(key) == 32 and live.take_noise_keys() == []
    noise_free = rows.sum(axis=0) / k  # float64 reference: SGD lr 1 from zero
    noise = live.model - noise_free
    assert float(np.std(noise)) == pytest.approx(1.0 / k, rel=0.05)

    attacker = FedBuff(np.zeros(n), buffer_size=k, staleness=Constant(), dp=DPConfig(1.0, 1.0))
    attacker.load_state_dict(state)
    attacker.submit(last)
    guess = attacker.model - noise_free
    # independent draws: the difference has twice the variance, and no coordinate matches
    assert float(np.std(noise - guess)) == pytest.approx(np.sqrt(2) / k, rel=0.05)
    assert not np.any(np.isclose(noise, guess, rtol=0, atol=1e-12))


def test_dp_replay_with_the_logged_keys_is_bit_for_bit() -> None:
    """What recovery does: the keys the live run drew (written to the log) replayed in
    order through a policy restored from the same state give the same models, drains too."""
    n, k = 300, 3
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((8, n))

    def run(p: FedBuff) -> None:
        for i in range(7):
            p.submit(Update(f"c{i % 4}", f"u{i}", 0, 1, DenseDelta(rows[i])))
        p.drain()

    live = FedBuff(np.zeros(n), buffer_size=k, dp=DPConfig(0.7, 2.0))
    start = live.state_dict()
    run(live)
    keys = live.take_noise_keys()
    assert len(keys) == live.version == 3 and len(set(keys)) == 3

    again = FedBuff(np.zeros(n), buffer_size=k, dp=DPConfig(0.7, 2.0))
    again.load_state_dict(start)
    again.replay_noise_keys(keys)
    run(again)
    assert again.noise_keys_unused == 0
    np.testing.assert_array_equal(again.model, live.model)


def test_dp_insecure_seed_reproduces_its_noise() -> None:
    def noisy(seed: int | None) -> np.ndarray:
        p = FedBuff(np.zeros(64), buffer_size=1, dp=DPConfig(1.0, 1.0, insecure_seed=seed))
        p.submit(upd(np.zeros(64)))
        return p.model.copy()

    np.testing.assert_array_equal(noisy(3), noisy(3))
    assert not np.array_equal(noisy(3), noisy(4))
    assert not np.array_equal(noisy(None), noisy(None))  # the default: fresh keys


def test_gaussian_matches_its_byte_level_definition() -> None:
    """Box-Muller written out in plain Python from the ChaCha20 keystream (the definition in
    the docstring), across the boundary between two keystream reads."""
    import math
    import struct

    from fedbus.aggregation import dp as dpmod
    from fedbus.secure.prg import keystream

    key = bytes(range(32))
    pairs = dpmod._PAIRS_PER_CHUNK + 3
    n = 2 * pairs - 1  # odd: the last sample is dropped
    got = dpmod.gaussian(key, n)
    assert got.shape == (n,)
    raw = keystream(key, 16 * pairs)
    for pair in (0, 1, dpmod._PAIRS_PER_CHUNK - 1, dpmod._PAIRS_PER_CHUNK, pairs - 1):
        a, b = struct.unpack_from("<QQ", raw, 16 * pair)
        u1 = ((a >> 11) + 1) / 2.0**53
        u2 = (b >> 11) / 2.0**53
        r = math.sqrt(-2.0 * math.log(u1))
        assert got[2 * pair] == pytest.approx(r * math.cos(2 * math.pi * u2), rel=1e-12)
        if 2 * pair + 1 < n:
            assert got[2 * pair + 1] == pytest.approx(r * math.sin(2 * math.pi * u2), rel=1e-12)
    # standard normal moments over ~half a million samples (4 standard errors)
    assert abs(float(np.mean(got))) < 4 / math.sqrt(n)
    assert float(np.var(got)) == pytest.approx(1.0, abs=4 * math.sqrt(2 / n))
    assert float(np.mean(np.abs(got) > 1.96)) == pytest.approx(0.05, abs=0.002)


@pytest.mark.parametrize(
    "kw",
    [
        {"normalisation": "weight_sum"},
        {"staleness": FLSimNormalised(Polynomial(0.5), 1.0)},  # weights > 1
        {"staleness": Threshold(2, 1.5)},
        {"example_weighting": "linear", "avg_num_examples": 10},
        {"robust": "median"},
        {"clip_norm": 2.0},  # looser than the DP clip norm
    ],
)
def test_dp_refuses_what_voids_the_sensitivity(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FedBuff(np.zeros(2), dp=DPConfig(1.0, 1.0), **kw)  # type: ignore[arg-type]


def test_dp_accepts_bounded_weights_and_a_tighter_clip() -> None:
    for s in (Constant(), Polynomial(0.5), Hinge(10, 4), Threshold(3, 0.2)):
        FedBuff(np.zeros(2), staleness=s, dp=DPConfig(1.0, 1.0))
    assert FedBuff(np.zeros(2), clip_norm=0.5, dp=DPConfig(1.0, 1.0)).clip_norm == 0.5


def test_dp_config_validation() -> None:
    for bad in ((1.0, 0.0), (1.0, -1.0), (-1.0, 1.0), (float("nan"), 1.0), (1.0, float("inf"))):
        with pytest.raises(ValueError):
            DPConfig(*bad)
    assert DPConfig(1.0, 1.0).noise_std(10) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("q", "z", "steps", "delta", "eps"),
    [
        (0.01, 1.0, 1000, 1e-5, 2.1014),
        (0.001, 1.0, 10000, 1e-6, 0.9795),
        (1.0, 1.0, 1, 1e-5, 4.7285),
        (1.0, 5.0, 100, 1e-5, 10.7255),
        (0.01, 0.8, 5000, 1e-5, 7.5331),
    ],
)
def test_accountant_oracles(q: float, z: float, steps: int, delta: float, eps: float) -> None:
    assert Accountant(z, sampling_rate=q).epsilon(steps, delta) == pytest.approx(eps, abs=1e-4)
    assert epsilon(z, steps, delta, sampling_rate=q) == pytest.approx(eps, abs=1e-4)


def test_accountant_defaults_to_no_amplification() -> None:
    acc = Accountant(1.0)
    assert acc.sampling_rate == 1.0
    assert acc.epsilon(1, 1e-5) == pytest.approx(4.7285, abs=1e-4)
    assert acc.epsilon(0, 1e-5) == 0.0
    assert acc.epsilon(10, 1e-5) > acc.epsilon(1, 1e-5)
    for bad in (lambda: Accountant(0.0), lambda: Accountant(1.0, 0.0), lambda: acc.epsilon(1, 0)):
        with pytest.raises(ValueError):
            bad()
