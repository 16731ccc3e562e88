"""Discrete-event fleet simulation in simulated time: a heap of completion events.

No threads and no wall clock: the clock jumps from one job completion to the next, so a run
of thousands of uploads takes seconds however slow the simulated devices are, and the same
seeds give bitwise the same history.

Randomness is split into two streams spawned from ``seed``: the *schedule* (which device
starts, how long its job takes, whether it vanishes) and *training* (minibatch shuffles).
The schedule never depends on the model, the server or the codec, so runs that differ only
in algorithm, codec or learning rate see exactly the same fleet behaviour (paired
comparisons). Dropped jobs are never trained: their result is unobservable.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

from fedbus.sim.data import FleetData
from fedbus.sim.models import FlatModel
from fedbus.sim.timing import FleetTiming

Encode = Callable[[int, np.ndarray], tuple[np.ndarray, int]]
"""``encode(client, delta) -> (decoded delta the server sees, bytes sent)``.

The hook models a codec plus per-device error feedback; the simulator calls it once per
upload that reaches the server, in arrival order.
"""

Download = Callable[[np.ndarray], tuple[np.ndarray, int]]
"""``download(global params) -> (params a device decodes, bytes it receives)``.

The downlink codec: called once per model version that a job starts from; every job that
starts from that version pays the bytes (a device fetches the model when a job starts,
whether or not the job later drops), and trains from, and computes its delta against, the
decoded parameters, as a real device does.
"""

FP32_BYTES = 4
"""Bytes per parameter counted when no ``encode``/``download`` hook is given: ``fp32``."""


class ServerStep(Protocol):
    """A server optimiser (``ServerSGD``, ``ServerAdam``) as synchronous FedAvg uses it."""

    def step(self, x: np.ndarray, ubar: np.ndarray) -> None:
        """Update ``x`` in place from the mean delta ``ubar``."""
        ...


@dataclass(frozen=True)
class _DeviceJob:
    """One device's job, the same in every engine: train locally from ``base``, take the
    delta, pass it through the codec hook. Returns (delta the server sees, examples, bytes)."""

    model: FlatModel
    fleet: FleetData
    client_lr: float
    batch_size: int
    epochs: int
    rng: np.random.Generator
    encode: Encode | None

    def __call__(self, device: int, base: np.ndarray) -> tuple[np.ndarray, int, int]:
        new, num, _ = self.model.local_train(
            base,
            self.fleet.xs[device],
            self.fleet.ys[device],
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.client_lr,
            rng=self.rng,
        )
        delta = new - base
        if self.encode is None:
            return delta, num, self.model.n_params * FP32_BYTES
        delta, sent = self.encode(device, delta)
        return delta, num, sent


class AsyncServer(Protocol):
    """What :func:`run_async` needs from an aggregator (FedAsync, FedBuff, ...).

    ``version`` must change whenever the model does: the engine freezes one copy of
    ``model()`` per version for the jobs that start from it, so the server is free to update
    its parameters in place and to return its own storage.
    """

    @property
    def version(self) -> int:
        """The current global model version."""
        ...

    def model(self) -> np.ndarray:
        """The current global parameters (flat float64)."""
        ...

    def submit(self, client: int, base_version: int, delta: np.ndarray, num_examples: int) -> bool:
        """Fold in one update trained from ``base_version``; True if a new version resulted."""
        ...


class HistoryPoint(NamedTuple):
    """One evaluation tick: the global model's state at simulated time ``time``."""

    time: float
    version: int
    uploads: int
    bytes: int
    accuracy: float
    down_bytes: int = 0
    """Model bytes received by devices so far (one download per job started)."""


class JobRecord(NamedTuple):
    """One job, for invariant checks and staleness analysis (only with ``record_jobs``)."""

    device: int
    start: float
    end: float
    dropped: bool
    base_version: int


@dataclass
class SimResult:
    """Outcome of one run. ``uploads``/``bytes_sent`` count updates that reached the server."""

    history: list[HistoryPoint]
    params: np.ndarray
    version: int
    sim_time: float
    uploads: int
    bytes_sent: int
    dropped: int
    staleness: np.ndarray  # per upload: server version at arrival minus base version
    jobs: list[JobRecord] | None = field(default=None)
    down_bytes: int = 0
    publications: int = 0
    """Model versions published (jobs start only from these): every version with interval 0."""

    def accuracies(self) -> np.ndarray:
        return np.array([h.accuracy for h in self.history])


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    schedule, train = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(schedule), np.random.default_rng(train)


def _check_stop(duration: float | None, *others: int | None) -> None:
    if duration is None and all(o is None for o in others):
        raise ValueError("give a stopping rule: duration, max_uploads or rounds")
    if duration is not None and duration <= 0:
        raise ValueError("duration must be positive")


class _Evaluator:
    """Accuracy on the test split, computed only on ticks and only once per version."""

    def __init__(self, model: FlatModel, fleet: FleetData, eval_every: float) -> None:
        if eval_every <= 0:
            raise ValueError("eval_every must be positive")
        self.model, self.fleet, self.every = model, fleet, float(eval_every)
        self.history: list[HistoryPoint] = []
        self.next_tick = 0.0
        self._cache: tuple[int, float] = (-1, 0.0)
        self.down = 0  # downlink bytes so far: the loops keep it current before each tick

    def _acc(self, version: int, params: np.ndarray) -> float:
        if self._cache[0] != version:
            acc = self.model.accuracy(params, self.fleet.x_test, self.fleet.y_test)
            self._cache = (version, acc)
        return self._cache[1]

    def record(self, t: float, version: int, params: np.ndarray, uploads: int, nbytes: int) -> None:
        acc = self._acc(version, params)
        self.history.append(HistoryPoint(t, version, uploads, nbytes, acc, self.down))

    def until(
        self,
        t: float,
        version: int,
        params: np.ndarray | Callable[[], np.ndarray],
        uploads: int,
        nbytes: int,
    ) -> None:
        """Record every tick strictly before ``t`` (the state before the event at ``t``).

        ``params`` may be a getter so the async loop fetches the model only on ticks.
        """
        while self.next_tick < t:
            current = params if isinstance(params, np.ndarray) else params()
            self.record(self.next_tick, version, current, uploads, nbytes)
            self.next_tick = len(self.history) * self.every

    def finish(self, t: float, version: int, params: np.ndarray, uploads: int, nbytes: int) -> None:
        """Record the ticks up to and including ``t``, then ``t`` itself if it was not a tick."""
        while self.next_tick <= t:
            self.record(self.next_tick, version, params, uploads, nbytes)
            self.next_tick = len(self.history) * self.every
        if self.history[-1].time < t:
            self.record(t, version, params, uploads, nbytes)


def run_async(
    server: AsyncServer,
    fleet: FleetData,
    model: FlatModel,
    timing: FleetTiming,
    *,
    concurrency: int = 100,
    duration: float | None = None,
    max_uploads: int | None = None,
    client_lr: float,
    batch_size: int = 16,
    epochs: int = 1,
    eval_every: float = 10.0,
    encode: Encode | None = None,
    download: Download | None = None,
    seed: int = 0,
    record_jobs: bool = False,
    publish_interval: float = 0.0,
) -> SimResult:
    """Keep ``concurrency`` devices training at every moment against ``server``.

    When a job ends (upload or dropout) its device becomes idle and a new job starts at once
    on a device drawn uniformly from the idle ones (possibly the same device); a device never
    runs two jobs. A job trains from the newest *published* version when it starts. Its delta
    ``new - start`` goes through ``encode`` and then ``server.submit``. Stops at the first
    event after ``duration`` simulated seconds or after ``max_uploads`` uploads, whichever
    comes first; history ticks every ``eval_every`` simulated seconds from 0, plus a final
    point at the stop time.

    Publication is coalesced as the worker does it (``model_publish_interval_s``): a new
    version is published at once if ``publish_interval`` has passed since the last
    publication, else at the moment it has (the newest version by then). So a job may start
    from a version older than the server's, and its staleness counts from the version it
    downloaded. ``publish_interval`` 0 publishes every version when it is made: the
    behaviour, and the bits, of the engine before publication was modelled.
    """
    _check_stop(duration, max_uploads)
    if not publish_interval >= 0:
        raise ValueError("publish_interval must be >= 0")
    n = fleet.n_clients
    if timing.n_devices != n:
        raise ValueError(f"timing is for {timing.n_devices} devices, fleet has {n}")
    if not 1 <= concurrency <= n:
        raise ValueError(f"concurrency must be in [1, {n}], got {concurrency}")
    sched, train = _streams(seed)
    ev = _Evaluator(model, fleet, eval_every)
    end_time = math.inf if duration is None else float(duration)
    upload_cap = math.inf if max_uploads is None else max_uploads
    job_duration, drops, rand = timing.job_duration, timing.drops, sched.random
    submit = server.submit
    job = _DeviceJob(model, fleet, client_lr, batch_size, epochs, train, encode)
    snap_bytes = model.n_params * FP32_BYTES

    idle = list(range(n))
    heap: list[tuple[float, int, int, bool, int, np.ndarray]] = []
    jobs: list[JobRecord] | None = [] if record_jobs else None
    staleness: list[int] = []
    snap_version, snap = -1, np.empty(0)  # the published version: one frozen copy, shared
    last_publish = -math.inf
    seq = uploads = nbytes = dropped = publications = 0

    def publish(t: float) -> None:
        nonlocal snap_version, snap, snap_bytes, last_publish, publications
        snap_version = server.version
        snap = np.array(server.model(), dtype=np.float64)
        if download is not None:
            snap, snap_bytes = download(snap)
        last_publish = t
        publications += 1

    def start(now: float) -> None:
        nonlocal seq
        i = int(rand() * len(idle))
        device = idle[i]
        idle[i] = idle[-1]
        idle.pop()
        if server.version != snap_version and now - last_publish >= publish_interval:
            publish(now)
        ev.down += snap_bytes
        end = now + job_duration(device, sched)
        lost = drops(sched)
        heapq.heappush(heap, (end, seq, device, lost, snap_version, snap))
        seq += 1
        if jobs is not None:
            jobs.append(JobRecord(device, now, end, lost, snap_version))

    for _ in range(concurrency):
        start(0.0)
    now = 0.0
    while heap and uploads < upload_cap:
        t, _, device, lost, base_version, base = heap[0]
        if t > end_time:
            break
        heapq.heappop(heap)
        due = last_publish + publish_interval
        if server.version != snap_version and due <= t:
            # a publication fell due between events: the server has not changed since the
            # last event, so what it holds now is what it held then
            publish(due)
        ev.until(t, server.version, server.model, uploads, nbytes)
        now = t
        if lost:
            dropped += 1
        else:
            delta, num, sent = job(device, base)
            staleness.append(server.version - base_version)
            submit(device, base_version, delta, num)
            uploads += 1
            nbytes += sent
        idle.append(device)
        start(now)
    stop = end_time if duration is not None and uploads < upload_cap else now
    final = np.array(server.model(), dtype=np.float64)
    ev.finish(stop, server.version, final, uploads, nbytes)
    return SimResult(
        history=ev.history,
        params=final,
        version=server.version,
        sim_time=stop,
        uploads=uploads,
        bytes_sent=nbytes,
        dropped=dropped,
        staleness=np.array(staleness, dtype=np.int64),
        jobs=jobs,
        down_bytes=ev.down,
        publications=publications,
    )


def run_sync_fedavg(
    initial: np.ndarray,
    fleet: FleetData,
    model: FlatModel,
    timing: FleetTiming,
    *,
    cohort: int = 100,
    over_selection: float = 1.3,
    rounds: int | None = None,
    duration: float | None = None,
    max_uploads: int | None = None,
    server_lr: float = 1.0,
    server_optimizer: ServerStep | None = None,
    client_lr: float,
    batch_size: int = 16,
    epochs: int = 1,
    eval_every: float = 10.0,
    encode: Encode | None = None,
    download: Download | None = None,
    seed: int = 0,
    record_jobs: bool = False,
) -> SimResult:
    """Synchronous FedAvg with over-selection, in the same simulated time as :func:`run_async`.

    Each round draws ``ceil(over_selection * cohort)`` distinct devices uniformly; all train
    from the current model. The round closes when the first ``cohort`` jobs that did not drop
    have arrived; the stragglers are told to abort, so every device is idle again when the
    next round starts. Only uploads received before the close are counted (uploads, bytes)
    or trained; the stragglers' results are never seen. If fewer than ``cohort`` jobs
    survive, the round closes at the last arrival with what it has (a real server would wait
    for a deadline). The new model is ``current + server_lr * mean(deltas)`` weighted by
    example count (with ``server_optimizer``, its ``step`` on that weighted mean instead:
    FedAvgM, FedAdam; ``server_lr`` must then stay 1), and the version is the number of
    rounds applied. Every selected device downloads the model (``download``) at the round's
    start, stragglers included. A round that would close
    after ``duration`` is not applied; the round that reaches ``max_uploads`` is applied
    whole. Every selected job that drops counts in ``dropped``.
    """
    _check_stop(duration, rounds, max_uploads)
    n = fleet.n_clients
    if timing.n_devices != n:
        raise ValueError(f"timing is for {timing.n_devices} devices, fleet has {n}")
    select = math.ceil(over_selection * cohort - 1e-9)
    if cohort < 1 or not cohort <= select <= n:
        raise ValueError(f"need 1 <= cohort <= ceil(over_selection * cohort) <= {n}")
    sched, train = _streams(seed)
    ev = _Evaluator(model, fleet, eval_every)
    end_time = math.inf if duration is None else float(duration)
    round_cap = math.inf if rounds is None else rounds
    upload_cap = math.inf if max_uploads is None else max_uploads
    job = _DeviceJob(model, fleet, client_lr, batch_size, epochs, train, encode)
    if server_optimizer is not None and server_lr != 1.0:
        raise ValueError("give server_lr or server_optimizer, not both")

    params = np.array(initial, dtype=np.float64)
    jobs: list[JobRecord] | None = [] if record_jobs else None
    version = done = uploads = nbytes = dropped = 0
    now = 0.0
    while done < round_cap and uploads < upload_cap:
        devices = sched.choice(n, size=select, replace=False)
        ends = now + timing.job_durations(devices, sched)
        lost = timing.drops_many(select, sched)
        order = np.argsort(ends, kind="stable")
        arrived = order[~lost[order]][:cohort]
        close = float(ends[arrived[-1]]) if arrived.size else float(ends.max())
        if close > end_time:
            break
        if jobs is not None:
            closed = np.minimum(ends, close)  # stragglers abort at the close
            jobs.extend(
                JobRecord(int(d), now, float(e), bool(x), version)
                for d, e, x in zip(devices, closed, lost, strict=True)
            )
        if download is None:
            base, sent_down = params, model.n_params * FP32_BYTES
        else:
            base, sent_down = download(params)
        ev.down += select * sent_down
        ev.until(close, version, params, uploads, nbytes)
        dropped += int(lost.sum())
        acc = np.zeros_like(params)
        weight = 0
        for j in arrived:
            device = int(devices[j])
            delta, num, sent = job(device, base)
            acc += num * delta
            weight += num
            nbytes += sent
        uploads += int(arrived.size)
        if weight > 0:
            if server_optimizer is None:
                params = params + (server_lr / weight) * acc
            else:
                params = params.copy()  # the history and callers may hold the old array
                server_optimizer.step(params, acc / weight)
            version += 1
        done += 1
        now = close
    capped = done >= round_cap or uploads >= upload_cap
    stop = end_time if duration is not None and not capped else now
    ev.finish(stop, version, params, uploads, nbytes)
    return SimResult(
        history=ev.history,
        params=params,
        version=version,
        sim_time=stop,
        uploads=uploads,
        bytes_sent=nbytes,
        dropped=dropped,
        staleness=np.zeros(uploads, dtype=np.int64),
        jobs=jobs,
        down_bytes=ev.down,
    )
