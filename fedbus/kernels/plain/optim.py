"""Server optimizer steps in NumPy (torch semantics; see :mod:`fedbus.kernels.jit.optim`)."""

from __future__ import annotations

import numpy as np


def sgd_step(x: np.ndarray, ubar: np.ndarray, lr: float) -> None:
    x += lr * ubar


def sgd_momentum_step(
    x: np.ndarray, ubar: np.ndarray, m: np.ndarray, lr: float, momentum: float, first: bool
) -> None:
    if first:
        m[:] = ubar
    else:
        m *= momentum
        m += ubar
    x += lr * m


def adam_step(
    x: np.ndarray,
    ubar: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    g = -ubar + weight_decay * x
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * g * g
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    x -= (lr / bc1) * m / (np.sqrt(v) / np.sqrt(bc2) + eps)


def mix_step(x: np.ndarray, target: np.ndarray, alpha: float) -> None:
    x *= 1.0 - alpha
    x += alpha * target
