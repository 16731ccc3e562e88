"""The attacks report: what an attacker uploads, what each defence makes of one buffer (hand
derived), the sybil refused by real ingest, and the quick report's shape."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedbus.aggregation import FedBuff, ServerSGD
from fedbus.bench import attacks as at
from fedbus.bench.convergence import STANDARD, world

N = 6


def _buffer(defence: at.Defence, attack: str, honest: np.ndarray) -> np.ndarray:
    """One K = 10 buffer from model 0 (staleness 0, weight 1, server lr 1): devices 0 and 1
    are attackers, 2..9 honest, every device's honest delta is ``honest``."""
    policy = FedBuff(
        np.zeros(N),
        buffer_size=10,
        server_optimizer=ServerSGD(lr=1.0, momentum=0.0),
        clip_norm=defence.clip_norm,
        robust=defence.robust,
        trim_beta=defence.trim_beta,
    )
    server = at.AttackedServer(policy, attack, frozenset({0, 1}), np.random.default_rng(0))
    for device in range(10):
        server.submit(device, 0, honest.copy(), 5)
    assert policy.version == 1
    assert server.attacker_uploads == 2
    return np.array(policy.model)


HONEST = np.array([0.6, -0.8, 0.0, 0.0, 0.0, 0.0])  # norm 1, both signs


def test_sign_flip_cancels_learning_undefended() -> None:
    # 8 honest u and 2 attackers at -4u: (8 - 2 * 4) u / 10 = 0, the attack stalls the model
    np.testing.assert_allclose(_buffer(at.NONE, "sign_flip", HONEST), 0.0, atol=1e-15)


def test_scaled_undefended_moves_ten_times_an_update() -> None:
    # label flips act on the data; here the poisoned update is the honest one, boosted x10:
    # (8 + 2 * 10) u / 10 = 2.8 u
    np.testing.assert_allclose(_buffer(at.NONE, "scaled", HONEST), 2.8 * HONEST, rtol=1e-12)


@pytest.mark.parametrize(
    ("defence", "expected"),
    [
        # median of eight u and two -4u per coordinate: u
        (at.Defence("median", robust="median"), 1.0),
        # beta 0.2 drops 2 of 10 at each end: the two -4u go, six u stay
        (at.Defence("trimmed_mean", robust="trimmed_mean", trim_beta=0.2), 1.0),
        # C = 1: honest u (norm 1) untouched, -4u clipped to -u: (8 - 2) u / 10
        (at.Defence("clip", clip_norm=1.0), 0.6),
    ],
)
def test_defences_recover_from_sign_flips(defence: at.Defence, expected: float) -> None:
    # rtol: the clip factor is C / (||u|| + 1e-10)
    np.testing.assert_allclose(
        _buffer(defence, "sign_flip", HONEST), expected * HONEST, rtol=1e-9, atol=1e-15
    )


def test_gaussian_replaces_the_update_and_honest_devices_are_untouched() -> None:
    policy = FedBuff(np.zeros(N), buffer_size=100)
    server = at.AttackedServer(policy, "gaussian", frozenset({3}), np.random.default_rng(5))
    honest = np.full(N, 0.25)
    assert server.poison(2, honest) is honest
    noise = server.poison(3, honest)
    expected = np.random.default_rng(5).normal(0.0, at.NOISE_STD, N)
    np.testing.assert_array_equal(noise, expected)


def test_label_flip_and_attacker_draw() -> None:
    fleet, _, _, _ = world(STANDARD, 0)
    bad = at.attackers(0, 0.2)
    assert len(bad) == 60 and len(set(bad)) == 60 and all(0 <= d < at.DEVICES for d in bad)
    assert at.attackers(0, 0.1) == sorted(at.attackers(0, 0.1))
    assert set(at.attackers(0, 0.1)) <= set(bad)  # one draw, nested fractions
    flipped = at.flip_labels(fleet, frozenset(bad))
    for d in range(at.DEVICES):
        want = 9 - fleet.ys[d] if d in bad else fleet.ys[d]
        np.testing.assert_array_equal(flipped.ys[d], want)
        np.testing.assert_array_equal(flipped.xs[d], fleet.xs[d])


@pytest.mark.parametrize("identity", [False, True])
def test_sybil_goes_through_ingest(identity: bool) -> None:
    fleet, model, _, init = world(STANDARD, 0)
    # a shard within one batch: local training draws no shuffle, so the reference below
    # trains exactly what the attacker trained
    me = next(d for d in range(at.DEVICES) if 2 <= fleet.ys[d].size <= 16)
    sybil = at.Sybil(me, 1.0, fleet, model, np.random.default_rng(1), identity=identity)
    forged = [sybil.forge(0, init) for _ in range(5)]
    assert sybil.sent == 5
    if identity:
        # the SASL principal names the attacker; every envelope names another device
        assert forged == [None] * 5
        assert dict(sybil.refused) == {"client_mismatch": 5}
        return
    assert not sybil.refused
    for f in forged:
        assert f is not None
        assert f.update.client_id.startswith("dev-") and f.update.client_id != f"dev-{me:04d}"
        # the payload is the attacker's own update, sign-flipped x4, in fp32
        rng = np.random.default_rng(0)
        new, _, _ = model.local_train(init, fleet.xs[me], fleet.ys[me], lr=at.CLIENT_LR, rng=rng)
        want = (-at.SIGN_FLIP * (new - init)).astype(np.float32)
        np.testing.assert_allclose(f.update.delta.to_dense(), want, rtol=1e-6, atol=1e-7)


def test_short_runs_attack_hurts_and_median_recovers() -> None:
    """60 simulated seconds of the standard fleet. 20% attackers at -4u make the expected
    step 0.8 u - 0.2 * 4 u = 0 (the buffer test above, exactly): the model barely leaves its
    start, while the median recovers most of the clean run's progress."""
    clean = at.run_one(at.Task("none", 0.0, at.NONE, 0, 60.0))
    fleet, model, _, init = world(STANDARD, 0)
    start = model.accuracy(init, fleet.x_test, fleet.y_test)
    attacked = at.run_one(at.Task("sign_flip", 0.2, at.NONE, 0, 60.0))
    median = at.run_one(at.Task("sign_flip", 0.2, at.GRID["median"][0], 0, 60.0))
    assert clean.final_accuracy > start + 0.5
    assert attacked.final_accuracy < start + 0.5 * (clean.final_accuracy - start)
    assert median.final_accuracy > clean.final_accuracy - 0.1
    assert 0.1 < attacked.attacker_share < 0.3, attacked


def test_quick_report_shape() -> None:
    rep = at.run(quick=True, log=lambda _: None, workers=1, attacks=("sign_flip",))
    items = json.loads(json.dumps(at.to_json(rep)))
    records = [r for r in items if not r.get("grid") and not r.get("summary")]
    assert {(r["attack"], r["fraction"], r["defence"]) for r in records} == {
        (a, f, d)
        for d in at.DEFENCES
        for a, f in [("none", 0.0), ("sign_flip", 0.1), ("sign_flip", 0.2)]
    }
    for r in records:
        assert {"attack", "fraction", "defence", "final_accuracy", "clean_accuracy", "seeds"} <= (
            r.keys()
        )
        assert r["seeds"] == [0]
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert r["drop"] == pytest.approx(r["clean_accuracy"] - r["final_accuracy"])
    assert len([r for r in items if r.get("grid")]) == 3  # quick: one value per defence
    table = at.markdown(rep)
    assert "| sign_flip | 20% |" in table
    assert at.markdown(at.from_json(items)) == table
