"""How long each device's jobs take, and which jobs vanish.

Real fleets are heavy-tailed: a phone on a charger finishes many times faster than one in a
pocket, and the same device varies from job to job. The model:

- per-device slowness ``s_d ~ lognormal(0, sigma)``, drawn once (median 1 simulated second);
- each job takes ``s_d * lognormal(0, job_sigma)`` of compute plus a network delay
  ``Exponential(mean = net_delay_fraction * median compute time)``, where the median compute
  time is the fleet's median slowness (the per-job factor has median 1);
- each job independently vanishes (device offline, upload lost) with probability ``dropout``.

The fleet is fixed by ``seed``; per-job draws come from the generator the caller passes, so a
simulation owns one stream and stays deterministic.
"""

from __future__ import annotations

import numpy as np


class FleetTiming:
    """Per-device speeds and the per-job duration and dropout draws."""

    def __init__(
        self,
        n_devices: int,
        sigma: float = 1.0,
        job_sigma: float = 0.25,
        net_delay_fraction: float = 0.1,
        dropout: float = 0.1,
        seed: int = 0,
    ) -> None:
        if n_devices < 1:
            raise ValueError("n_devices must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if sigma < 0 or job_sigma < 0 or net_delay_fraction < 0:
            raise ValueError("sigma, job_sigma and net_delay_fraction must be non-negative")
        self.n_devices = n_devices
        self.sigma = float(sigma)
        self.job_sigma = float(job_sigma)
        self.net_delay_fraction = float(net_delay_fraction)
        self.dropout = float(dropout)
        self.slowness = np.random.default_rng(seed).lognormal(0.0, self.sigma, n_devices)
        self.slowness.setflags(write=False)
        self.median_job = float(np.median(self.slowness))
        self.net_delay_mean = self.net_delay_fraction * self.median_job
        # Python floats: indexing a NumPy array per event would cost more than the draw itself
        self._slow: list[float] = self.slowness.tolist()

    def job_duration(self, device: int, rng: np.random.Generator) -> float:
        """Simulated seconds from a job's start to its upload's arrival."""
        compute = self._slow[device] * rng.lognormal(0.0, self.job_sigma)
        if self.net_delay_mean > 0.0:
            return float(compute + rng.exponential(self.net_delay_mean))
        return float(compute)

    def job_durations(self, devices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Vectorised :meth:`job_duration` for a whole cohort (one draw per device, in order)."""
        devices = np.asarray(devices, dtype=np.int64)
        compute = self.slowness[devices] * rng.lognormal(0.0, self.job_sigma, devices.size)
        if self.net_delay_mean > 0.0:
            compute = compute + rng.exponential(self.net_delay_mean, devices.size)
        return np.asarray(compute, dtype=np.float64)

    def drops(self, rng: np.random.Generator) -> bool:
        """Whether a job vanishes: it occupies its device for its duration, then no upload."""
        return bool(rng.random() < self.dropout)

    def drops_many(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Vectorised :meth:`drops`."""
        return rng.random(size) < self.dropout
