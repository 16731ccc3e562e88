"""Central differential privacy for FedBuff: Gaussian noise on the flushed mean, and its cost.

Sensitivity rests on four things the aggregator enforces when DP is on (``validate``):
every update is clipped to ``clip_norm`` C, its weight is at most 1 (so FLSim-compat
normalisation and example weighting are refused), the mean divides by the fixed K (not by
the weights), and one client contributes at most once per buffer. Then one client moves
the mean by at most C / K, and the noise is N(0, (z C / K)^2) per coordinate.

**Where the noise comes from.** Anyone who can regenerate the noise can subtract it, so it
is never drawn from a seeded NumPy generator whose state sits in a checkpoint. Each flush
draws a fresh 256-bit key from the operating system's CSPRNG (:func:`noise_key`) and expands
it with ChaCha20 into Gaussian samples (:func:`gaussian`). The key is not part of the
policy's state (``state_dict`` holds none): the snapshot holds the model *after* the noise,
which is all that recovery from a snapshot needs. What recovery also needs is to replay the
write-ahead log after the snapshot exactly, including the flushes it made, whose versions
may already have been published; so the worker writes each flush's key to the log, in its
place after the message or drain that caused the flush, and replay feeds the keys back
(``FedBuff.replay_noise_keys``). A key therefore lives exactly as long as the log segment
that holds it, which is deleted once the next snapshot is durable (``snapshot_interval_s``).
The same segment holds the raw accepted updates of those flushes, from which the noise-free
sum follows anyway: the key exposes nothing the log did not (SECURITY.md, Retention).

``insecure_seed`` derives the keys from a public seed and the version instead, so that
simulations and benchmarks are reproducible; anyone who knows the seed can remove the
noise, so it never belongs in a deployment.

Accounting uses Google's dp-accounting (RDP). FedBuff participation is not Poisson
sampling, so by default no amplification is claimed (q = 1): every flush a client takes
part in costs one full Gaussian mechanism; count flushes per client, not flushes overall.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from fedbus.secure.prg import SEED_BYTES, new_seed, stream

NOISE_KEY_BYTES = SEED_BYTES
_INSECURE_TAG = b"fedbus insecure dp noise v1"
_PAIRS_PER_CHUNK = 1 << 18  # Gaussian pairs drawn per keystream read: bounded scratch memory


@dataclass(frozen=True)
class DPConfig:
    """``insecure_seed`` makes the noise reproducible by anyone who knows it: simulations
    and benchmarks only (see the module doc). ``None``, the default, draws every flush's
    noise key from the operating system's CSPRNG."""

    noise_multiplier: float
    clip_norm: float
    insecure_seed: int | None = None
    delta: float = 1e-5  # the delta every epsilon is reported at
    # Epsilon after which no further version is made (None: no budget); see ``max_steps``.
    budget: float | None = None

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError("DP needs a finite noise_multiplier >= 0")
        if not 0.0 < self.delta < 1.0:
            raise ValueError("DP needs 0 < delta < 1")
        if self.budget is not None and not (self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError("a privacy budget is a positive finite epsilon")
        if self.budget is not None and self.noise_multiplier == 0:
            raise ValueError("a privacy budget needs noise_multiplier > 0 (z = 0 spends it all)")
        if self.clip_norm is None or not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError("DP needs a positive finite clip_norm: it is the sensitivity")

    def noise_std(self, k: int) -> float:
        """Standard deviation of the noise on the mean of a buffer of size K."""
        return self.noise_multiplier * self.clip_norm / k


def noise_key(config: DPConfig, version: int) -> bytes:
    """The key of the noise added to make ``version``: fresh from the CSPRNG, or derived
    from the insecure seed (see the module doc)."""
    if config.insecure_seed is None:
        return new_seed()
    seed = config.insecure_seed.to_bytes(16, "little", signed=True)
    return hashlib.sha256(_INSECURE_TAG + seed + version.to_bytes(8, "little")).digest()


def gaussian(key: bytes, n: int) -> np.ndarray:
    """``n`` independent standard normal samples expanded from ``key`` (Box-Muller on
    53-bit uniforms from the ChaCha20 keystream of :mod:`fedbus.secure.prg`).

    Byte-exact for other implementations: keystream read as little-endian uint64 in pairs
    (a, b); u1 = ((a >> 11) + 1) 2^-53 in (0, 1], u2 = (b >> 11) 2^-53; samples 2i and 2i+1
    are r cos(2 pi u2) and r sin(2 pi u2) with r = sqrt(-2 ln u1); an odd n drops the last.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    read = stream(key)
    out = np.empty(n + (n & 1), dtype=np.float64)
    pairs = out.shape[0] // 2
    for start in range(0, pairs, _PAIRS_PER_CHUNK):
        m = min(_PAIRS_PER_CHUNK, pairs - start)
        bits = np.frombuffer(read(16 * m), dtype="<u8").reshape(m, 2) >> np.uint64(11)
        u1 = (bits[:, 0] + np.uint64(1)).astype(np.float64) * 2.0**-53
        theta = bits[:, 1].astype(np.float64) * (2.0**-53 * 2.0 * math.pi)
        r = np.sqrt(-2.0 * np.log(u1))
        block = out[2 * start : 2 * (start + m)].reshape(m, 2)
        block[:, 0] = r * np.cos(theta)
        block[:, 1] = r * np.sin(theta)
    return out[:n]


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


ACCOUNTANT = "rdp"  # the name events report: dp-accounting's RDP accountant, q = 1


def max_steps(config: DPConfig, limit: int = 1 << 40) -> int | None:
    """The most noised flushes whose epsilon (at ``config.delta``) stays within the budget;
    None without a budget. A client may take part in every flush, so this caps versions."""
    if config.budget is None:
        return None
    acc = Accountant(config.noise_multiplier)
    if acc.epsilon(1, config.delta) > config.budget:
        return 0
    lo, hi = 1, 2
    while hi < limit and acc.epsilon(hi, config.delta) <= config.budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # epsilon grows with steps: lo fits, hi does not
        mid = (lo + hi) // 2
        if acc.epsilon(mid, config.delta) <= config.budget:
            lo = mid
        else:
            hi = mid
    return lo


def epsilon(noise_multiplier: float, steps: int, delta: float, sampling_rate: float = 1.0) -> float:
    """Shorthand for ``Accountant(noise_multiplier, sampling_rate).epsilon(steps, delta)``."""
    return Accountant(noise_multiplier, sampling_rate).epsilon(steps, delta)
