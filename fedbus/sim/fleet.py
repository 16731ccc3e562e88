"""A simulated fleet in wall-clock time, speaking to a real broker through the client SDK.

:mod:`fedbus.sim.engine` replays a fleet in simulated time against an in-process server; it is
the instrument for experiments. This module is the opposite trade: every device is a real
:class:`~fedbus.client.device.Device` (its own encoder, error-feedback residual, optional
spool and signing key) publishing to whatever broker and worker are running, and time passes
for real, compressed by ``speed`` (a job the timing model says takes 2 simulated seconds
sleeps ``2 / speed`` wall seconds). It is what ``fedbus client simulate`` runs: load a worker
with a plausible fleet, watch the global model learn, and see every refusal on the
dead-letter channel, without owning a single device.

One process holds the whole fleet: the devices share one broker connection (a device is an
identity, not a socket) and one follower of the model channel, so a thousand devices cost a
thousand encoders rather than a thousand connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedbus.client.device import Device, SecureIdentities, spool_path
from fedbus.client.updates import GlobalModel, read_model
from fedbus.sim.data import FleetData
from fedbus.sim.models import FlatModel
from fedbus.sim.timing import FleetTiming
from fedbus.transport.base import Transport
from fedbus.wire.codecs import CodecSpec
from fedbus.wire.envelope import UpdateEnvelope

__all__ = ["FleetConfig", "FleetReport", "LayoutMismatchError", "run_fleet"]


class LayoutMismatchError(ValueError):
    """The model on the broker is not the one the simulated devices train."""


@dataclass(frozen=True)
class FleetConfig:
    model: str
    concurrency: int = 30
    duration_s: float = 60.0  # wall seconds
    max_uploads: int | None = None
    speed: float = 10.0  # simulated seconds per wall second
    codec: str = "int8"
    client_lr: float = 0.3
    batch_size: int = 16
    epochs: int = 1
    clip_norm: float | None = None
    spool_root: Path | None = None
    eval_every_s: float = 1.0  # wall seconds between accuracy readings
    settle_s: float = 1.0  # after the last upload, time for its version to come back
    seed: int = 0
    secure: SecureIdentities | None = None  # a model in secure aggregation: both identities


@dataclass
class FleetReport:
    uploads: int = 0
    dropped: int = 0
    bytes_uploaded: int = 0
    first_version: int = -1
    last_version: int = -1
    initial_accuracy: float = float("nan")
    final_accuracy: float = float("nan")
    wall_s: float = 0.0
    # (wall seconds, global version, uploads so far, accuracy)
    history: list[tuple[float, int, int, float]] = field(default_factory=list)


Progress = Callable[[FleetReport], None]


def _check_layout(gm: GlobalModel, model: FlatModel) -> None:
    expected = model.wire_layout()
    if gm.layout != expected:
        raise LayoutMismatchError(
            f"model {gm.model!r} on the broker has layout {gm.layout.fingerprint}, the simulated "
            f"devices train {expected.fingerprint}: initialise it with the matching example "
            "(fedbus model init --example softmax|mlp)"
        )


async def run_fleet(
    transport: Transport,
    fleet: FleetData,
    model: FlatModel,
    timing: FleetTiming,
    cfg: FleetConfig,
    *,
    on_progress: Progress | None = None,
    first_model_timeout_s: float = 10.0,
) -> FleetReport:
    """Keep ``cfg.concurrency`` devices training against the live global model until
    ``cfg.duration_s`` wall seconds or ``cfg.max_uploads`` uploads, whichever comes first.

    Devices pick up the newest version the follower has seen when their job starts, as a
    real device would on wake-up, and upload ``new - start`` through the SDK. Raises
    :class:`LayoutMismatchError` or :class:`TimeoutError` before any upload when the broker
    has no usable model.
    """
    if not 1 <= cfg.concurrency <= fleet.n_clients:
        raise ValueError(f"concurrency must be in [1, {fleet.n_clients}]")
    if timing.n_devices != fleet.n_clients:
        raise ValueError(f"timing is for {timing.n_devices} devices, fleet has {fleet.n_clients}")
    if cfg.speed <= 0:
        raise ValueError("speed must be positive")
    raw = await transport.latest_model(cfg.model, timeout=first_model_timeout_s)
    if raw is None:
        raise TimeoutError(
            f"no global model for {cfg.model!r} on the broker: run `fedbus model init` first"
        )
    latest = read_model(raw)
    _check_layout(latest, model)

    report = FleetReport(first_version=latest.version, last_version=latest.version)
    codec = CodecSpec.parse(cfg.codec)
    sched = np.random.default_rng([cfg.seed, 0])
    train_rng = np.random.default_rng([cfg.seed, 1])
    devices: dict[int, Device] = {}
    idle = list(range(fleet.n_clients))
    t0 = time.monotonic()
    deadline = t0 + cfg.duration_s
    done = asyncio.Event()

    def accuracy(gm: GlobalModel) -> float:
        return model.accuracy(gm.weights, fleet.x_test, fleet.y_test)

    report.initial_accuracy = accuracy(latest)

    def device(i: int) -> Device:
        if i not in devices:
            client = f"sim-{i:04d}"
            devices[i] = Device(
                transport,
                cfg.model,
                client,
                codec=codec,
                clip_norm=cfg.clip_norm,
                spool_dir=spool_path(cfg.spool_root, cfg.model, client) if cfg.spool_root else None,
                seed=cfg.seed * 1_000_003 + i,
                secure=cfg.secure,
            )
        return devices[i]

    async def follow() -> None:
        nonlocal latest
        async for raw_model in transport.follow_models(cfg.model):
            with contextlib.suppress(Exception):  # a bad model message must not stop the fleet
                gm = read_model(raw_model)
                if gm.version > latest.version:
                    latest = gm
                    report.last_version = gm.version

    claimed = 0

    async def slot() -> None:
        nonlocal claimed
        while not done.is_set():
            i = idle.pop(int(sched.random() * len(idle)))
            base = latest
            lost = timing.drops(sched)
            wait = timing.job_duration(i, sched) / cfg.speed
            try:
                if time.monotonic() + wait > deadline:
                    done.set()
                    return
                await asyncio.sleep(wait)
                if lost:
                    report.dropped += 1
                    continue
                if cfg.max_uploads is not None:
                    # Claim the upload before training: the slots in flight when the last one
                    # lands must not each add one more.
                    if claimed >= cfg.max_uploads:
                        done.set()
                        return
                    claimed += 1
                new, n, metrics = model.local_train(
                    base.weights,
                    fleet.xs[i],
                    fleet.ys[i],
                    epochs=cfg.epochs,
                    batch_size=cfg.batch_size,
                    lr=cfg.client_lr,
                    rng=train_rng,
                )
                update = await device(i).submit(base, new, n, {"loss": float(metrics["loss"])})
                report.uploads += 1
                report.bytes_uploaded += (
                    len(update.payload)
                    if isinstance(update, UpdateEnvelope)
                    else len(update.leader_share) + len(update.helper_share)
                )
                if cfg.max_uploads is not None and report.uploads >= cfg.max_uploads:
                    done.set()
            finally:
                idle.append(i)

    async def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), cfg.eval_every_s)
            snap = latest
            report.history.append(
                (time.monotonic() - t0, snap.version, report.uploads, accuracy(snap))
            )
            if on_progress is not None:
                on_progress(report)

    follower = asyncio.create_task(follow())
    watcher = asyncio.create_task(watch())
    try:
        slots = [asyncio.create_task(slot()) for _ in range(cfg.concurrency)]
        try:
            await asyncio.gather(*slots)
        finally:
            done.set()
            for s in slots:
                s.cancel()
        await watcher
        await asyncio.sleep(cfg.settle_s)
    finally:
        follower.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follower
    report.wall_s = time.monotonic() - t0
    report.final_accuracy = accuracy(latest)
    return report
