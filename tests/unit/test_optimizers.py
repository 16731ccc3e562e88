"""Server optimizers: torch semantics on the pseudo-gradient g = -ubar, against oracles
and against plain float64 NumPy references written here."""

from __future__ import annotations

import numpy as np
import pytest

from fedbus.aggregation import ServerAdam, ServerSGD, optimizer_from_state


def ref_sgd(x: np.ndarray, ubars: list[np.ndarray], lr: float, mu: float) -> np.ndarray:
    x, m = x.copy(), None
    for u in ubars:
        m = u.copy() if m is None else mu * m + u
        x = x + lr * m
    return x


def ref_adam(
    x: np.ndarray, ubars: list[np.ndarray], lr: float, b1: float, b2: float, eps: float, wd: float
) -> np.ndarray:
    x = x.copy()
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t, u in enumerate(ubars, start=1):
        g = -u + wd * x
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        x = x - lr * mhat / (np.sqrt(vhat) + eps)
    return x


def test_momentum_oracle() -> None:
    opt, x = ServerSGD(lr=1.0, momentum=0.9), np.zeros(2)
    opt.step(x, np.array([0.2, 0.4]))
    opt.step(x, np.array([0.1, -0.1]))
    np.testing.assert_allclose(opt.state_dict()["m"], [0.28, 0.26], rtol=1e-12)
    np.testing.assert_allclose(x, [0.48, 0.66], rtol=1e-12)


def test_plain_sgd_has_no_state() -> None:
    opt, x = ServerSGD(lr=0.5), np.ones(3)
    opt.step(x, np.array([1.0, -2.0, 4.0]))
    np.testing.assert_array_equal(x, [1.5, 0.0, 3.0])
    assert opt.state_dict()["m"] is None


def test_adam_oracle() -> None:
    opt, x = ServerAdam(lr=0.01), np.zeros(2)
    opt.step(x, np.array([2 / 9, 4 / 9]))  # g = [-2/9, -4/9]
    np.testing.assert_allclose(x, [9.99999955e-3, 9.999999775e-3], rtol=1e-8)


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
def test_sgd_matches_reference(mu: float) -> None:
    rng = np.random.default_rng(0)
    x0, ubars = rng.standard_normal(40), list(rng.standard_normal((7, 40)))
    opt, x = ServerSGD(lr=0.7, momentum=mu), x0.copy()
    for u in ubars:
        opt.step(x, u)
    np.testing.assert_allclose(x, ref_sgd(x0, ubars, 0.7, mu), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_adam_matches_reference(wd: float) -> None:
    rng = np.random.default_rng(1)
    x0, ubars = rng.standard_normal(40), list(rng.standard_normal((9, 40)) * 0.1)
    opt, x = ServerAdam(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd), x0.copy()
    for u in ubars:
        opt.step(x, u)
    assert opt.steps == 9
    np.testing.assert_allclose(
        x, ref_adam(x0, ubars, 0.05, 0.8, 0.99, 1e-6, wd), rtol=1e-10, atol=1e-13
    )


@pytest.mark.parametrize(
    "make", [lambda: ServerSGD(0.3, 0.9), lambda: ServerSGD(0.3), lambda: ServerAdam(0.02)]
)
def test_state_round_trip_continues_bitwise(make: object) -> None:
    rng = np.random.default_rng(2)
    ubars = list(rng.standard_normal((6, 10)))
    straight, x1 = make(), np.zeros(10)  # type: ignore[operator]
    for u in ubars:
        straight.step(x1, u)
    first, x2 = make(), np.zeros(10)  # type: ignore[operator]
    for u in ubars[:3]:
        first.step(x2, u)
    resumed = optimizer_from_state(first.state_dict())
    assert type(resumed) is type(straight)
    for u in ubars[3:]:
        resumed.step(x2, u)
    np.testing.assert_array_equal(x1, x2)


def test_validation() -> None:
    for bad in (lambda: ServerSGD(0.0), lambda: ServerSGD(1.0, 1.0), lambda: ServerSGD(1.0, -0.1)):
        with pytest.raises(ValueError):
            bad()
    for bad in (
        lambda: ServerAdam(0.0),
        lambda: ServerAdam(0.1, betas=(1.0, 0.9)),
        lambda: ServerAdam(0.1, eps=0.0),
        lambda: ServerAdam(0.1, weight_decay=-1.0),
    ):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError):
        optimizer_from_state({"kind": "lamb"})
