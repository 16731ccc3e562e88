"""Server optimizers on the mean update ``ubar`` (pseudo-gradient ``g = -ubar``), as torch does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus.kernels import optim


@dataclass
class ServerSGD:
    """m <- mu m + ubar; x <- x + lr m (mu = 0: x <- x + lr ubar). Dampening 0, no Nesterov."""

    lr: float = 1.0
    momentum: float = 0.0
    _m: np.ndarray | None = field(default=None, repr=False)

    def step(self, x: np.ndarray, ubar: np.ndarray) -> None:
        if self.momentum == 0.0:
            optim.sgd_step(x, ubar, self.lr)
            return
        first = self._m is None
        if first:
            self._m = np.zeros_like(x)
        optim.sgd_momentum_step(x, ubar, self._m, self.lr, self.momentum, first)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "sgd", "lr": self.lr, "momentum": self.momentum, "m": self._m}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.lr, self.momentum = d["lr"], d["momentum"]
        self._m = None if d["m"] is None else np.array(d["m"], dtype=np.float64)


@dataclass
class ServerAdam:
    """Adam on g = -ubar, bias-corrected, eps outside the root, coupled L2 weight decay."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    _m: np.ndarray | None = field(default=None, repr=False)
    _v: np.ndarray | None = field(default=None, repr=False)
    _t: int = 0

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
        self.lr, self.betas, self.eps = d["lr"], (d["betas"][0], d["betas"][1]), d["eps"]
        self.weight_decay, self._t = d["weight_decay"], d["t"]
        self._m = None if d["m"] is None else np.array(d["m"], dtype=np.float64)
        self._v = None if d["v"] is None else np.array(d["v"], dtype=np.float64)


ServerOptimizer = ServerSGD | ServerAdam
