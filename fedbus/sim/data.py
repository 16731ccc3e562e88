"""Real data that ships inside an installed package: scikit-learn's bundled digits.

The simulator must run offline and in CI, so it uses ``sklearn.datasets.load_digits`` (1797
8x8 images, read from a file inside scikit-learn; nothing downloads). The split is our own
stratified NumPy shuffle rather than ``train_test_split`` so that the same seed gives the same
split across scikit-learn versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedbus.sim.partition import dirichlet_partition


@dataclass(frozen=True)
class Dataset:
    """A train/test split: float32 features in [0, 1], int64 labels ``0..n_classes-1``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """Load once per process: the loader parses a CSV, which costs more than a whole sim run."""
    from sklearn.datasets import load_digits  # heavy import, only when the sim is used

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, test)``: each class contributes ``round(test_fraction * n_c)`` to test.

    Stratifying keeps the held-out accuracy comparable between seeds; both index arrays are
    sorted so the train order does not leak the shuffle into partitioning.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test.append(idx[: round(test_fraction * idx.size)])
    test_idx = np.sort(np.concatenate(test))
    mask = np.ones(labels.size, dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The digits data set, scaled to [0, 1] (pixel values are 0..16), split stratified."""
    x, y = _digits()
    train, test = stratified_split(y, test_fraction, seed)
    return Dataset(x[train], y[train], x[test], y[test], n_classes=10)


@dataclass(frozen=True)
class FleetData:
    """Per-device training shards plus the shared held-out test split.

    Shards are stored as contiguous float64 copies: the models compute in float64 and a
    mixed-dtype matmul would cast on every local step of every job.
    """

    xs: tuple[np.ndarray, ...]
    ys: tuple[np.ndarray, ...]
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_clients(self) -> int:
        return len(self.xs)

    @property
    def n_features(self) -> int:
        return int(self.x_test.shape[1])

    @property
    def sizes(self) -> np.ndarray:
        return np.array([y.size for y in self.ys], dtype=np.int64)

    def label_counts(self) -> np.ndarray:
        """``(n_clients, n_classes)`` label histogram, for checking how skewed a split is."""
        return np.stack([np.bincount(y, minlength=self.n_classes) for y in self.ys])


def make_fleet(
    dataset: Dataset, n_clients: int, alpha: float, seed: int, *, min_size: int = 2
) -> FleetData:
    """Split ``dataset``'s training part over ``n_clients`` devices, non-IID by Dirichlet."""
    parts = dirichlet_partition(dataset.y_train, n_clients, alpha, seed, min_size=min_size)
    return fleet_from_parts(dataset, parts)


def digits_fleet(
    n_clients: int = 300,
    alpha: float = 0.3,
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    min_size: int = 2,
) -> FleetData:
    """The standard convergence setting's data: digits over 300 devices, Dirichlet(0.3)."""
    return make_fleet(
        load_digits_split(test_fraction, seed), n_clients, alpha, seed, min_size=min_size
    )


def synthetic_dataset(
    n_train: int, n_test: int, n_features: int = 100, n_classes: int = 20, seed: int = 0
) -> Dataset:
    """A larger problem than digits, generated (nothing downloads): Gaussian classes.

    Class means are drawn once from a fixed stream (the *problem* does not depend on
    ``seed``, only the examples drawn from it do), at a spread chosen so that softmax
    regression plateaus well below 100% and keeps something to learn for hundreds of rounds.
    Features are squashed into [0, 1] like digits' pixels, so one client learning rate
    serves both.
    """
    means = np.random.default_rng(20_240_601).normal(0.0, 0.35, (n_classes, n_features))
    rng = np.random.default_rng([seed, 11])

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, n_classes, m)
        z = means[y] + rng.normal(0.0, 1.0, (m, n_features))
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32), y.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset(x_train, y_train, x_test, y_test, n_classes=n_classes)


def fleet_from_parts(dataset: Dataset, parts: list[np.ndarray]) -> FleetData:
    """Per-device shards from index lists into ``dataset``'s training part."""
    x = np.asarray(dataset.x_train, dtype=np.float64)
    return FleetData(
        xs=tuple(np.ascontiguousarray(x[p]) for p in parts),
        ys=tuple(np.ascontiguousarray(dataset.y_train[p]) for p in parts),
        x_test=np.asarray(dataset.x_test, dtype=np.float64),
        y_test=np.asarray(dataset.y_test, dtype=np.int64),
        n_classes=dataset.n_classes,
    )
