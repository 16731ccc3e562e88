"""Staleness weights s(tau): how much an update trained on an old model still counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Constant:
    def __call__(self, tau: int) -> float:
        return 1.0


@dataclass(frozen=True)
class Polynomial:
    """(1 + tau)^-a; FedBuff's default with a = 0.5."""

    a: float = 0.5

    def __call__(self, tau: int) -> float:
        return float((1.0 + tau) ** -self.a)


@dataclass(frozen=True)
class Hinge:
    """1 up to b, then 1 / (a (tau - b) + 1): the FedAsync paper's formula (not FedLab's)."""

    a: float = 10.0
    b: float = 4.0

    def __call__(self, tau: int) -> float:
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


@dataclass(frozen=True)
class Threshold:
    cutoff: int = 5
    value_after: float = 0.0

    def __call__(self, tau: int) -> float:
        return 1.0 if tau <= self.cutoff else self.value_after


Staleness = Constant | Polynomial | Hinge | Threshold
_KINDS: dict[str, type] = {
    "constant": Constant,
    "polynomial": Polynomial,
    "hinge": Hinge,
    "threshold": Threshold,
}


def to_config(s: Staleness) -> dict[str, Any]:
    kind = next(k for k, v in _KINDS.items() if isinstance(s, v))
    return {"kind": kind, **asdict(s)}


def from_config(d: dict[str, Any]) -> Staleness:
    d = dict(d)
    return _KINDS[d.pop("kind")](**d)  # type: ignore[no-any-return]
