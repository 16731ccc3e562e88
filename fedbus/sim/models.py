"""NumPy models behind a flat float64 parameter vector.

The aggregation layer, the codecs and the wire all see one 1-D vector; these models keep
their tensors as views into such a vector (in :meth:`layout` order), so a simulated device
trains and hands back exactly what a real one would upload, with no packing step.

One function per model, ``_loss_grad_into``, computes the loss and the mean gradient; both
the public :meth:`loss_and_grad` (checked against finite differences in the tests) and the
training loop use it, so what is tested is what trains. Device shards are tiny (a few
examples), so the cost is NumPy call overhead, not arithmetic: the code keeps the number of
array operations per step small and works in place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedbus.wire.layout import Layout

LayoutEntry = tuple[str, tuple[int, ...], str]


class FlatModel:
    """Shared training and evaluation on top of a subclass's ``_loss_grad_into``."""

    n_features: int
    n_classes: int
    n_params: int

    def layout(self) -> list[LayoutEntry]:
        raise NotImplementedError

    def wire_layout(self) -> Layout:
        """The layout as the wire carries it: what ``fedbus model init --example`` publishes
        and what a device checks the global model against."""
        return Layout.from_wire([[n, list(s), d] for n, s, d in self.layout()])

    def init_params(self, seed: int) -> np.ndarray:
        raise NotImplementedError

    def _loss_grad_into(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
        """Write the mean gradient over ``(x, y)`` into ``g``; return the summed loss."""
        raise NotImplementedError

    def logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # -- public API --------------------------------------------------------------------
    def loss_and_grad(
        self, params: np.ndarray, x: np.ndarray, y: np.ndarray
    ) -> tuple[float, np.ndarray]:
        """Mean cross-entropy over ``(x, y)`` and its gradient (a new flat float64 vector)."""
        w = self._check(params)
        g = np.empty(self.n_params, dtype=np.float64)
        total = self._loss_grad_into(w, np.asarray(x, dtype=np.float64), np.asarray(y), g)
        return total / max(1, len(y)), g

    def predict(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.asarray(
            np.argmax(self.logits(self._check(params), np.asarray(x, dtype=np.float64)), axis=1)
        )

    def accuracy(self, params: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.predict(params, x) == np.asarray(y)))

    def local_train(
        self,
        params: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 16,
        lr: float,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, int, dict[str, Any]]:
        """Plain minibatch SGD from ``params``; returns ``(new_params, len(y), metrics)``.

        ``params`` is not modified. Each epoch is shuffled with ``rng``, except when the whole
        shard fits one batch: then the order cannot matter and the draw is skipped (most
        devices hold fewer examples than a batch). ``metrics["loss"]`` is the mean minibatch
        loss seen before each step.
        """
        w = self._check(params).copy()
        n = len(y)
        if n == 0:
            return w, 0, {"loss": float("nan"), "steps": 0}
        g = np.empty(self.n_params, dtype=np.float64)
        total, steps = 0.0, 0
        for _ in range(epochs):
            if n <= batch_size:
                total += self._loss_grad_into(w, x, y, g)
                g *= lr
                w -= g
                steps += 1
                continue
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                total += self._loss_grad_into(w, x[idx], y[idx], g)
                g *= lr
                w -= g
                steps += 1
        return w, n, {"loss": total / (n * epochs), "steps": steps}

    def _check(self, params: np.ndarray) -> np.ndarray:
        if params.dtype != np.float64 or params.shape != (self.n_params,):
            raise ValueError(
                f"expected a flat float64 vector of {self.n_params} parameters, "
                f"got {params.dtype} {params.shape}"
            )
        return params


# the ufunc reductions themselves: ``ndarray.sum``/``np.sum`` add a Python-level wrapper that
# costs as much as the arithmetic on a shard of five examples
_sum = np.add.reduce
_max = np.maximum.reduce


def _softmax_xent_(z: np.ndarray, y: np.ndarray) -> float:
    """Turn logits ``z`` in place into ``(softmax - onehot) / m``; return the summed loss.

    Shifting by the row max keeps ``exp`` finite; the loss is taken from the shifted logits
    (``log sum exp - z_y``) so it stays finite even when a probability underflows.
    """
    m = y.shape[0]
    rows = np.arange(m)
    z -= _max(z, axis=1, keepdims=True)
    zy = z[rows, y]
    np.exp(z, out=z)
    s = _sum(z, axis=1, keepdims=True)
    loss = float(_sum(np.log(s), axis=None) - _sum(zy))
    z /= s
    z[rows, y] -= 1.0
    z *= 1.0 / m
    return loss


class SoftmaxRegression(FlatModel):
    """Multinomial logistic regression: ``softmax(x @ weight + bias)``."""

    def __init__(self, n_features: int, n_classes: int) -> None:
        self.n_features = n_features
        self.n_classes = n_classes
        self._nw = n_features * n_classes
        self.n_params = self._nw + n_classes

    def layout(self) -> list[LayoutEntry]:
        f, c = self.n_features, self.n_classes
        return [("weight", (f, c), "float64"), ("bias", (c,), "float64")]

    def init_params(self, seed: int) -> np.ndarray:
        """Small random weights, zero bias (the problem is convex; the seed barely matters)."""
        w = np.zeros(self.n_params, dtype=np.float64)
        w[: self._nw] = np.random.default_rng(seed).normal(0.0, 0.01, self._nw)
        return w

    def logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        nw = self._nw
        return np.asarray(x @ params[:nw].reshape(self.n_features, self.n_classes) + params[nw:])

    def _loss_grad_into(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
        nw, f, c = self._nw, self.n_features, self.n_classes
        z = x @ w[:nw].reshape(f, c)
        z += w[nw:]
        loss = _softmax_xent_(z, y)
        np.matmul(x.T, z, out=g[:nw].reshape(f, c))
        _sum(z, axis=0, out=g[nw:])
        return loss


class MLP(FlatModel):
    """One hidden ReLU layer: ``softmax(relu(x @ w1 + b1) @ w2 + b2)``."""

    def __init__(self, n_features: int, hidden: int, n_classes: int) -> None:
        self.n_features = n_features
        self.hidden = hidden
        self.n_classes = n_classes
        f, h, c = n_features, hidden, n_classes
        # offsets of w1, b1, w2, b2 in the flat vector, plus the end
        self._o = (0, f * h, f * h + h, f * h + h + h * c, f * h + h + h * c + c)
        self.n_params = self._o[-1]

    def layout(self) -> list[LayoutEntry]:
        f, h, c = self.n_features, self.hidden, self.n_classes
        return [
            ("w1", (f, h), "float64"),
            ("b1", (h,), "float64"),
            ("w2", (h, c), "float64"),
            ("b2", (c,), "float64"),
        ]

    def init_params(self, seed: int) -> np.ndarray:
        """He-normal first layer (ReLU), Glorot-scaled output layer, zero biases."""
        rng = np.random.default_rng(seed)
        f, h, c = self.n_features, self.hidden, self.n_classes
        o = self._o
        w = np.zeros(self.n_params, dtype=np.float64)
        w[o[0] : o[1]] = rng.normal(0.0, np.sqrt(2.0 / f), f * h)
        w[o[2] : o[3]] = rng.normal(0.0, np.sqrt(2.0 / (h + c)), h * c)
        return w

    def _views(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        o, f, h, c = self._o, self.n_features, self.hidden, self.n_classes
        return (
            w[o[0] : o[1]].reshape(f, h),
            w[o[1] : o[2]],
            w[o[2] : o[3]].reshape(h, c),
            w[o[3] : o[4]],
        )

    def logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        w1, b1, w2, b2 = self._views(params)
        a = x @ w1
        a += b1
        np.maximum(a, 0.0, out=a)
        return np.asarray(a @ w2 + b2)

    def _loss_grad_into(self, w: np.ndarray, x: np.ndarray, y: np.ndarray, g: np.ndarray) -> float:
        w1, b1, w2, b2 = self._views(w)
        g1, gb1, g2, gb2 = self._views(g)
        a = x @ w1
        a += b1
        np.maximum(a, 0.0, out=a)
        z = a @ w2
        z += b2
        loss = _softmax_xent_(z, y)
        np.matmul(a.T, z, out=g2)
        _sum(z, axis=0, out=gb2)
        da = z @ w2.T
        da *= a > 0.0
        np.matmul(x.T, da, out=g1)
        _sum(da, axis=0, out=gb1)
        return loss


EXAMPLES = ("softmax", "mlp")


def example(name: str) -> FlatModel:
    """The built-in digits models (64 pixels, 10 classes) that ``fedbus model init`` and
    ``fedbus client simulate`` share, so a simulated fleet trains what was published."""
    if name == "softmax":
        return SoftmaxRegression(64, 10)
    if name == "mlp":
        return MLP(64, 32, 10)
    raise ValueError(f"unknown example model {name!r}: {' or '.join(EXAMPLES)}")
