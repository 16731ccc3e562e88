"""In-place server steps: one pass over the model per new version.

NumPy would spend several full passes (and temporaries the size of the model) on Adam's
five array expressions; these loops do one pass and allocate nothing, which matters once
the model no longer fits in cache. Semantics are torch's (``torch.optim.SGD`` with
dampening 0 and no Nesterov; ``torch.optim.Adam`` with coupled L2 weight decay and eps
outside the square root), applied to the pseudo-gradient ``g = -ubar``.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def sgd_step(x: np.ndarray, ubar: np.ndarray, lr: float) -> None:
    """x <- x + lr * ubar (plain server SGD on g = -ubar)."""
    for i in range(x.shape[0]):
        x[i] += lr * ubar[i]


@njit(cache=True, nogil=True)
def sgd_momentum_step(
    x: np.ndarray, ubar: np.ndarray, m: np.ndarray, lr: float, momentum: float, first: bool
) -> None:
    """m <- mu*m + ubar (m <- ubar on the first step, as torch does); x <- x + lr*m."""
    for i in range(x.shape[0]):
        mi = ubar[i] if first else momentum * m[i] + ubar[i]
        m[i] = mi
        x[i] += lr * mi


@njit(cache=True, nogil=True)
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
    """One torch-semantics Adam step on g = -ubar (+ weight_decay * x); ``step`` counts from 1."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    step_size = lr / bc1
    sqrt_bc2 = np.sqrt(bc2)
    for i in range(x.shape[0]):
        g = -ubar[i] + weight_decay * x[i]
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        x[i] -= step_size * mi / (np.sqrt(vi) / sqrt_bc2 + eps)


@njit(cache=True, nogil=True)
def mix_step(x: np.ndarray, target: np.ndarray, alpha: float) -> None:
    """FedAsync paper-direction mixing: x <- (1 - alpha) * x + alpha * target."""
    for i in range(x.shape[0]):
        x[i] = (1.0 - alpha) * x[i] + alpha * target[i]
