"""Server optimizers on the mean update ``ubar`` (pseudo-gradient ``g = -ubar``), as torch does.

The arithmetic of each optimizer is one function in :mod:`fedbus.kernels.optim` (single
pass over the model, no temporaries); these classes only own the hyperparameters and
the moment buffers, so the kernels can be swapped without touching the policies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus.aggregation.state import maybe_array
from fedbus.kernels import optim


@dataclass(eq=False)
class ServerSGD:
    """m <- mu m + ubar; x <- x + lr m (mu = 0: x <- x + lr ubar, no state).

    torch.optim.SGD with dampening 0 and no Nesterov; the first step sets m = ubar, which
    is mu * 0 + ubar. FedBuff's paper-faithful default is lr 1, mu 0 (mean convention).
    """

    lr: float = 1.0
    momentum: float = 0.0
    _m: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.lr > 0 or not 0.0 <= self.momentum < 1.0:
            raise ValueError("ServerSGD needs lr > 0 and 0 <= momentum < 1")

    def step(self, x: np.ndarray, ubar: np.ndarray) -> None:
        if self.momentum == 0.0:
            optim.sgd_step(x, ubar, self.lr)
            return
        first = self._m is None
        if self._m is None:
            self._m = np.zeros_like(x)
        optim.sgd_momentum_step(x, ubar, self._m, self.lr, self.momentum, first)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sgd", "lr": self.lr, "momentum": self.momentum, "m": self._m}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.lr, self.momentum = float(d["lr"]), float(d["momentum"])
        self._m = maybe_array(d["m"])


@dataclass(eq=False)
class ServerAdam:
    """torch.optim.Adam on g = -ubar: bias-corrected, eps outside the root, coupled L2
    weight decay (g += wd * x), not AdamW. Defaults are torch's, not FLSim's (wd 1e-5)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    _m: np.ndarray | None = field(default=None, init=False, repr=False)
    _v: np.ndarray | None = field(default=None, init=False, repr=False)
    _t: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        b1, b2 = self.betas
        if not (self.lr > 0 and 0 <= b1 < 1 and 0 <= b2 < 1 and self.eps > 0):
            raise ValueError("ServerAdam needs lr > 0, betas in [0, 1) and eps > 0")
        if self.weight_decay < 0:
            raise ValueError("weight_decay must be >= 0")
        self.betas = (float(b1), float(b2))

    @property
    def steps(self) -> int:
        return self._t

    def step(self, x: np.ndarray, ubar: np.ndarray) -> None:
        if self._m is None or self._v is None:
            self._m, self._v = np.zeros_like(x), np.zeros_like(x)
        self._t += 1
        b1, b2 = self.betas
        optim.adam_step(
            x, ubar, self._m, self._v, self._t, self.lr, b1, b2, self.eps, self.weight_decay
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "adam",
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "m": self._m,
            "v": self._v,
            "t": self._t,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.lr, self.eps = float(d["lr"]), float(d["eps"])
        self.betas = (float(d["betas"][0]), float(d["betas"][1]))
        self.weight_decay, self._t = float(d["weight_decay"]), int(d["t"])
        self._m, self._v = maybe_array(d["m"]), maybe_array(d["v"])


ServerOptimizer = ServerSGD | ServerAdam


def optimizer_from_state(d: dict[str, Any]) -> ServerOptimizer:
    """The optimizer a checkpoint describes (its kind, hyperparameters and moments)."""
    opt: ServerOptimizer
    if d["kind"] == "sgd":
        opt = ServerSGD(float(d["lr"]), float(d["momentum"]))
    elif d["kind"] == "adam":
        opt = ServerAdam(float(d["lr"]))
    else:
        raise ValueError(f"unknown server optimizer {d['kind']!r}")
    opt.load_state_dict(d)
    return opt
