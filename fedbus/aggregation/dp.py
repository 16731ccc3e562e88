"""Central differential privacy for FedBuff: Gaussian noise on the flushed mean, and its cost.

Sensitivity rests on four things the aggregator enforces when DP is on (``validate``):
every update is clipped to ``clip_norm`` C, its weight is at most 1 (so FLSim-compat
normalisation and example weighting are refused), the mean divides by the fixed K (not by
the weights), and one client contributes at most once per buffer. Then one client moves
the mean by at most C / K, and the noise is N(0, (z C / K)^2) per coordinate.

Accounting uses Google's dp-accounting (RDP). FedBuff participation is not Poisson
sampling, so by default no amplification is claimed (q = 1): every flush a client takes
part in costs one full Gaussian mechanism; count flushes per client, not flushes overall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DPConfig:
    """``seed`` seeds the noise generator, whose state is checkpointed with the policy."""

    noise_multiplier: float
    clip_norm: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError("DP needs a finite noise_multiplier >= 0")
        if self.clip_norm is None or not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError("DP needs a positive finite clip_norm: it is the sensitivity")

    def noise_std(self, k: int) -> float:
        """Standard deviation of the noise on the mean of a buffer of size K."""
        return self.noise_multiplier * self.clip_norm / k


def validate(
    dp: DPConfig,
    *,
    clip_norm: float | None,
    weight_bound: float,
    normalisation: str,
    example_weighting: str,
    robust: str | None,
) -> float:
    """Refuse configurations that void the sensitivity bound; returns the clip norm to use.

    A tighter server clip than ``dp.clip_norm`` is fine (sensitivity only shrinks); a looser
    one is a contradiction and raises rather than being silently overridden.
    """
    if clip_norm is not None and clip_norm > dp.clip_norm:
        raise ValueError("clip_norm above the DP clip_norm would void the noise calibration")
    if weight_bound > 1.0:
        raise ValueError(
            "DP needs staleness weights <= 1 (FLSim-compat normalisation makes them > 1)"
        )
    if normalisation != "k":
        raise ValueError("DP needs the fixed denominator K (normalisation='k')")
    if example_weighting != "equal":
        raise ValueError("DP needs equal example weights (normalised weights can exceed 1)")
    if robust is not None:
        raise ValueError("DP noise is calibrated for the mean, not for robust statistics")
    return dp.clip_norm if clip_norm is None else clip_norm


@dataclass(frozen=True)
class Accountant:
    """(epsilon, delta) of ``steps`` Gaussian mechanisms with noise multiplier z.

    ``sampling_rate`` q < 1 claims Poisson amplification: only honest if the system really
    includes each client independently with probability q per flush, which a message bus
    fed by whoever finishes training does not. Hence q = 1 by default.
    """

    noise_multiplier: float
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.sampling_rate <= 1.0:
            raise ValueError("sampling_rate must be in (0, 1]")
        if not self.noise_multiplier > 0:
            raise ValueError("accounting needs noise_multiplier > 0 (z = 0 has no finite epsilon)")

    def epsilon(self, steps: int, delta: float) -> float:
        if steps < 0 or not 0.0 < delta < 1.0:
            raise ValueError("need steps >= 0 and 0 < delta < 1")
        if steps == 0:
            return 0.0
        import dp_accounting  # the worker extra: a device importing fedbus never needs it

        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, event)
        accountant = dp_accounting.rdp.RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return float(accountant.get_epsilon(delta))


def epsilon(noise_multiplier: float, steps: int, delta: float, sampling_rate: float = 1.0) -> float:
    """Shorthand for ``Accountant(noise_multiplier, sampling_rate).epsilon(steps, delta)``."""
    return Accountant(noise_multiplier, sampling_rate).epsilon(steps, delta)
