"""Build the aggregation policy object a worker runs, from its settings."""

from __future__ import annotations

import numpy as np

from fedbus.aggregation import (
    Constant,
    DPConfig,
    FedAsync,
    FedBuff,
    Hinge,
    Polynomial,
    ServerAdam,
    ServerOptimizer,
    ServerSGD,
    Threshold,
)
from workers.settings import AggregationSettings

Strategy = FedAsync | FedBuff


def staleness_function(cfg: AggregationSettings) -> Constant | Polynomial | Hinge | Threshold:
    if cfg.staleness == "constant":
        return Constant()
    if cfg.staleness == "hinge":
        return Hinge(a=cfg.staleness_a, b=cfg.staleness_b)
    if cfg.staleness == "threshold":
        return Threshold(cutoff=int(cfg.staleness_b))
    return Polynomial(a=cfg.staleness_a)


def server_optimizer(cfg: AggregationSettings) -> ServerOptimizer:
    if cfg.server_optimizer == "adam":
        return ServerAdam(lr=cfg.server_lr)
    return ServerSGD(lr=cfg.server_lr, momentum=cfg.momentum)


def build(cfg: AggregationSettings, initial: np.ndarray, version: int) -> Strategy:
    """One object owns the policy: the worker only feeds it updates and asks for state."""
    s = staleness_function(cfg)
    if cfg.algorithm == "fedasync":
        strategy: Strategy = FedAsync(
            initial,
            alpha=cfg.alpha,
            staleness=s,
            max_staleness=cfg.max_staleness,
            direction=cfg.direction,
            ring_depth=cfg.ring_depth,
            clip_norm=cfg.clip_norm,
            dedup_window=cfg.dedup_window,
            version=version,
        )
    else:
        dp = (
            DPConfig(
                noise_multiplier=cfg.dp_noise_multiplier,
                clip_norm=cfg.clip_norm,
                insecure_seed=cfg.dp_insecure_seed,
                delta=cfg.dp_delta,
                budget=cfg.privacy_budget,
            )
            if cfg.dp_noise_multiplier is not None and cfg.clip_norm is not None
            else None  # the settings refuse a noise multiplier without clip_norm
        )
        strategy = FedBuff(
            initial,
            buffer_size=cfg.buffer_size,
            staleness=s,
            max_staleness=cfg.max_staleness,
            server_optimizer=server_optimizer(cfg),
            clip_norm=cfg.clip_norm,
            robust=cfg.robust,
            trim_beta=cfg.trim_beta,
            dp=dp,
            version=version,
            max_deferred=cfg.max_deferred,
            dedup_window=cfg.dedup_window,
            max_deferred_per_client=cfg.max_deferred_per_client,
            max_deferred_bytes=cfg.max_deferred_bytes,
        )
    return strategy
