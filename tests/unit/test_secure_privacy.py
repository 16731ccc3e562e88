"""One aggregator's view of one update is indistinguishable from uniform noise.

The statistic: a chi-square test on the top 8 bits of every uint32 of the leader's opened
shares, over many updates of the *same* vector (the case where a leak would pile values up).
The detector is shown to work: shares made without a mask, or with a mask of only 16
random bits, fail it by a wide margin, so a pass means something. The threshold (p > 1e-6)
makes a false alarm a one-in-a-million event.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy.stats import chi2_contingency, chisquare

from fedbus.secure.params import QuantParams
from fedbus.secure.prg import expand
from fedbus.secure.sharing import leader_share, to_ring
from tests.unit.secure_world import World

ALPHA = 1e-6
N = 64
UPDATES = 600  # 38,400 values: 150 expected per top-byte bin


def top_byte_counts(shares: np.ndarray) -> np.ndarray:
    return np.bincount((shares.ravel() >> 24).astype(np.int64), minlength=256)


def uniformity_p(shares: np.ndarray) -> float:
    return float(chisquare(top_byte_counts(shares)).pvalue)


def no_mask(q: np.ndarray, seed: bytes) -> np.ndarray:
    return to_ring(q)


def short_mask(q: np.ndarray, seed: bytes) -> np.ndarray:
    return to_ring(q) - (expand(seed, q.size) & np.uint32(0xFFFF))


@pytest.fixture(scope="module")
def world() -> World:
    return World(n=N, buffer_size=2, clip_norm=1.0)


@pytest.fixture(scope="module")
def constant_delta(world: World) -> np.ndarray:
    return np.full(N, 0.9 / np.sqrt(N))  # norm 0.9: q is the same large value everywhere


def leader_views(world: World, delta: np.ndarray) -> np.ndarray:
    """What the leader sees of UPDATES independent updates of ``delta``: its opened shares."""
    world.device_key("dev-1")
    opener = world.opener("leader")
    rows = []
    for i in range(UPDATES):
        opened = opener.open(world.encode("dev-1", delta, update_id=f"u{i}"))
        assert opened.share is not None
        rows.append(opened.share)
    return np.stack(rows)


def test_leader_share_of_a_constant_vector_is_uniform(
    world: World, constant_delta: np.ndarray
) -> None:
    assert uniformity_p(leader_views(world, constant_delta)) > ALPHA


def test_leader_cannot_tell_two_vectors_apart(world: World, constant_delta: np.ndarray) -> None:
    """Shares of the vector above and of its negation have the same distribution
    (chi-square test of homogeneity on the top-byte histograms)."""
    a = top_byte_counts(leader_views(world, constant_delta))
    b = top_byte_counts(leader_views(world, -constant_delta))
    assert float(chi2_contingency(np.stack([a, b])).pvalue) > ALPHA


def test_helper_share_is_uniform_and_independent_of_the_update(
    world: World, constant_delta: np.ndarray
) -> None:
    """The helper's whole view is a random seed: its expansion is uniform, and the sealed
    sizes (all either aggregator sees besides the header) do not depend on the values."""
    world.device_key("dev-2")
    opener = world.opener("helper")
    seeds = []
    for i in range(UPDATES):
        opened = opener.open(world.encode("dev-2", constant_delta, update_id=f"h{i}"))
        assert opened.seed is not None
        seeds.append(expand(opened.seed, N))
    assert uniformity_p(np.stack(seeds)) > ALPHA
    big = world.encode("dev-2", constant_delta, update_id="big")
    zero = world.encode("dev-2", np.zeros(N), update_id="zero")
    assert len(big.leader_share) == len(zero.leader_share) == 48 + 4 * N
    assert len(big.helper_share) == len(zero.helper_share) == 48 + 32


@pytest.mark.parametrize("leaky", [no_mask, short_mask])
def test_the_detector_catches_a_leaking_share(leaky: object, constant_delta: np.ndarray) -> None:
    """Same statistic on shares that leak q: unmasked, or masked with 16 random bits only
    (the top bits then carry q's top bits)."""
    from fedbus.secure.fixedpoint import quantise

    quant = QuantParams(20, 1.0)
    q = quantise(constant_delta, quant)
    sound = np.stack([leader_share(q, os.urandom(32)) for _ in range(UPDATES)])
    leaked = np.stack([leaky(q, os.urandom(32)) for _ in range(UPDATES)])  # type: ignore[operator]
    assert uniformity_p(sound) > ALPHA
    assert uniformity_p(leaked) < 1e-100
