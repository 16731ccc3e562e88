"""Central differential privacy for FedBuff: Gaussian noise on the flushed mean, and its cost.

Sensitivity rests on three things the aggregator enforces when DP is on: every update is
clipped to ``clip_norm`` C, its weight is at most 1 (all staleness functions here are), and
the mean divides by the fixed K (not by the weights). One client contributes at most once
per buffer, so the mean moves by at most C / K and the noise is N(0, (z C / K)^2).
Accounting uses Google's dp-accounting (RDP). FedBuff participation is not Poisson
sampling, so by default no amplification is claimed (q = 1): every flush a client takes
part in costs a full Gaussian mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass

import dp_accounting


@dataclass(frozen=True)
class DPConfig:
    noise_multiplier: float
    clip_norm: float
    seed: int = 0

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.clip_norm is None or self.clip_norm <= 0:
            raise ValueError("DP needs noise_multiplier >= 0 and a positive clip_norm")

    def noise_std(self, k: int) -> float:
        return self.noise_multiplier * self.clip_norm / k


def epsilon(noise_multiplier: float, steps: int, delta: float, sampling_rate: float = 1.0) -> float:
    """(epsilon, delta) after ``steps`` Gaussian mechanisms (Poisson-subsampled if q < 1)."""
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))
