"""Staleness weights against the float64 oracles of algorithms.md 8.2."""

from __future__ import annotations

import dataclasses

import pytest

from fedbus.aggregation import Constant, FLSimNormalised, Hinge, Polynomial, Threshold
from fedbus.aggregation.staleness import from_config, to_config


def test_polynomial_oracle() -> None:
    poly = Polynomial(0.5)
    got = [poly(t) for t in (0, 1, 3, 8, 15)]
    assert got == pytest.approx([1.0, 0.7071067812, 0.5, 0.3333333333, 0.25], abs=1e-10)
    assert Polynomial() == poly  # FedBuff's default exponent


def test_hinge_oracle_is_the_paper_formula() -> None:
    hinge = Hinge(10, 4)
    got = [hinge(t) for t in (0, 4, 5, 6, 10)]
    assert got == pytest.approx([1.0, 1.0, 1 / 11, 1 / 21, 1 / 61], rel=1e-12)
    assert got[2:] == pytest.approx([0.0909090909, 0.0476190476, 0.0163934426], abs=1e-10)


def test_hinge_is_not_fedlabs() -> None:
    """FedLab writes 1/(a*((t-b)+1)): 0.05 and 0.0333 at t = 5, 6. We must not."""
    hinge = Hinge(10, 4)
    for tau in (5, 6):
        fedlab = 1 / (10 * ((tau - 4) + 1))
        assert hinge(tau) != pytest.approx(fedlab, rel=1e-3)
    assert hinge(5) == 1 / 11


def test_constant_and_threshold() -> None:
    assert [Constant()(t) for t in (0, 1, 1000)] == [1.0, 1.0, 1.0]
    th = Threshold(cutoff=2, value_after=0.3)
    assert [th(t) for t in (0, 2, 3, 50)] == [1.0, 1.0, 0.3, 0.3]


def test_flsim_compat_normalisation_oracle() -> None:
    s = FLSimNormalised(Polynomial(0.5), avg_staleness=1)
    got = [s(t) for t in (0, 1, 3, 8)]
    assert got == pytest.approx([1.4142135624, 1.0, 0.7071067812, 0.4714045208], abs=1e-10)
    assert s.bound == pytest.approx(2**0.5)  # > 1: this is what breaks DP sensitivity


def test_bounds() -> None:
    for s in (Constant(), Polynomial(0.5), Polynomial(0.0), Hinge(4, 2), Threshold(3, 0.5)):
        assert s.bound == 1.0
        assert all(s(t) <= s.bound for t in range(100))
    assert Threshold(3, 2.0).bound == 2.0


@pytest.mark.parametrize(
    "s",
    [
        Constant(),
        Polynomial(0.3),
        Hinge(4.0, 2.0),
        Threshold(7, 0.25),
        FLSimNormalised(Hinge(10, 4), avg_staleness=2.0),
    ],
)
def test_config_round_trip(s: object) -> None:
    cfg = s.to_config()  # type: ignore[attr-defined]
    assert isinstance(cfg["kind"], str)
    assert from_config(cfg) == s
    assert type(s).from_config(cfg) == s  # type: ignore[attr-defined]
    assert to_config(s) == cfg  # type: ignore[arg-type]
    assert from_config(dict(cfg)) == s  # from_config does not consume its argument


def test_config_refuses_unknowns() -> None:
    with pytest.raises(ValueError):
        from_config({"kind": "exponential"})
    with pytest.raises(TypeError):
        from_config({"kind": "polynomial", "exponent": 0.5})


def test_validation_and_frozen() -> None:
    with pytest.raises(ValueError):
        Polynomial(-0.5)
    with pytest.raises(ValueError):
        Hinge(0, 4)
    with pytest.raises(ValueError):
        Hinge(10, -1)
    with pytest.raises(ValueError):
        Threshold(-1, 0.0)
    with pytest.raises(ValueError):
        FLSimNormalised(Threshold(0, 0.0), avg_staleness=1)  # s(avg) = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        Polynomial(0.5).a = 1.0  # type: ignore[misc]
