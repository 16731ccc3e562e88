"""The in-process fleet simulator: data, partitions, timing, models and the event engine."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from fedbus.aggregation import ServerSGD
from fedbus.sim import (
    MLP,
    FleetData,
    FleetTiming,
    SoftmaxRegression,
    digits_fleet,
    dirichlet_partition,
    load_digits_split,
    owned_labels_partition,
    run_async,
    run_sync_fedavg,
    synthetic_dataset,
)
from fedbus.wire.layout import Layout


class BufferServer:
    """A trivial FedBuff-like server: average every ``k`` deltas and apply them."""

    def __init__(self, params: np.ndarray, k: int = 10, lr: float = 1.0) -> None:
        self.params = params.copy()
        self.version = 0
        self.k, self.lr = k, lr
        self.acc = np.zeros_like(params)
        self.count = 0
        self.submits: list[tuple[int, int, int, int]] = []

    def model(self) -> np.ndarray:
        return self.params

    def submit(self, client: int, base_version: int, delta: np.ndarray, num_examples: int) -> bool:
        assert base_version <= self.version
        self.submits.append((client, base_version, num_examples, self.version))
        self.acc += delta
        self.count += 1
        if self.count < self.k:
            return False
        self.params += (self.lr / self.count) * self.acc  # in place: the engine must snapshot
        self.acc[:] = 0.0
        self.count = 0
        self.version += 1
        return True


@pytest.fixture(scope="module")
def fleet() -> FleetData:
    return digits_fleet(300, 0.3, seed=0)


@pytest.fixture(scope="module")
def timing() -> FleetTiming:
    return FleetTiming(300, seed=0)


SOFTMAX = SoftmaxRegression(64, 10)


def _async(fleet: FleetData, timing: FleetTiming, **kw: object) -> tuple[BufferServer, object]:
    server = BufferServer(SOFTMAX.init_params(0))
    args: dict[str, object] = {"max_uploads": 600, "client_lr": 1.0, "eval_every": 2.0}
    args.update(kw)
    return server, run_async(server, fleet, SOFTMAX, timing, **args)  # type: ignore[arg-type]


# -- data and partitions ---------------------------------------------------------------------


def test_digits_split_is_scaled_stratified_and_deterministic() -> None:
    d = load_digits_split(0.2, seed=3)
    assert d.x_train.dtype == np.float32 and d.x_test.dtype == np.float32
    assert d.x_train.shape[1] == d.n_features == 64 and d.n_classes == 10
    assert d.x_train.min() >= 0.0 and d.x_train.max() == 1.0
    assert len(d.y_train) + len(d.y_test) == 1797
    assert abs(len(d.y_test) - 0.2 * 1797) <= 10
    frac = np.bincount(d.y_test, minlength=10) / np.bincount(d.y_train, minlength=10)
    assert np.all(np.abs(frac - 0.25) < 0.02)  # every class split 80/20
    again = load_digits_split(0.2, seed=3)
    np.testing.assert_array_equal(d.x_test, again.x_test)
    np.testing.assert_array_equal(d.y_train, again.y_train)
    assert not np.array_equal(load_digits_split(0.2, seed=4).y_test, d.y_test)


def test_dirichlet_partition_covers_disjointly_with_min_size() -> None:
    labels = load_digits_split(seed=0).y_train
    parts = dirichlet_partition(labels, 300, 0.3, seed=1, min_size=3)
    assert len(parts) == 300
    assert min(p.size for p in parts) >= 3
    joined = np.concatenate(parts)
    assert joined.size == labels.size and np.unique(joined).size == labels.size
    again = dirichlet_partition(labels, 300, 0.3, seed=1, min_size=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    with pytest.raises(ValueError):
        dirichlet_partition(labels, 1000, 0.3, seed=1, min_size=2)


def _mean_tv_from_global(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    glob = np.bincount(labels, minlength=10) / labels.size
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=10) / p.size - glob).sum() for p in parts]
    return float(np.mean(tv))


def test_dirichlet_alpha_controls_label_skew() -> None:
    labels = load_digits_split(seed=0).y_train
    skewed = _mean_tv_from_global(labels, dirichlet_partition(labels, 10, 0.1, seed=0))
    uniform = _mean_tv_from_global(labels, dirichlet_partition(labels, 10, 100.0, seed=0))
    assert skewed > 0.5
    assert uniform < 0.1


def test_fleet_shards_match_partition(fleet: FleetData) -> None:
    assert fleet.n_clients == 300 and fleet.n_features == 64
    assert fleet.sizes.sum() == 1797 - fleet.y_test.size and fleet.sizes.min() >= 2
    assert all(x.dtype == np.float64 and x.flags.c_contiguous for x in fleet.xs)
    assert (
        fleet.label_counts().sum(axis=0).tolist()
        == np.bincount(np.concatenate(fleet.ys), minlength=10).tolist()
    )


# -- timing ----------------------------------------------------------------------------------


def test_timing_statistics() -> None:
    t = FleetTiming(20_000, sigma=1.0, job_sigma=0.25, net_delay_fraction=0.1, seed=0)
    assert abs(t.median_job - 1.0) < 0.05
    assert abs(np.std(np.log(t.slowness)) - 1.0) < 0.03
    assert t.net_delay_mean == pytest.approx(0.1 * t.median_job)
    rng = np.random.default_rng(1)
    drops = np.mean([t.drops(rng) for _ in range(50_000)])
    assert abs(drops - 0.1) < 0.006
    d = int(np.argmin(np.abs(t.slowness - 2.0)))  # a device twice as slow as the median
    durations = np.array([t.job_duration(d, rng) for _ in range(20_000)])
    expected_mean = t.slowness[d] * math.exp(0.25**2 / 2) + t.net_delay_mean
    assert durations.min() > 0 and abs(durations.mean() / expected_mean - 1) < 0.02
    many = t.job_durations(np.full(20_000, d), rng)
    assert abs(many.mean() / expected_mean - 1) < 0.02
    assert abs(t.drops_many(50_000, rng).mean() - 0.1) < 0.006


def test_timing_is_deterministic() -> None:
    a, b = FleetTiming(100, seed=7), FleetTiming(100, seed=7)
    np.testing.assert_array_equal(a.slowness, b.slowness)
    ra, rb = np.random.default_rng(2), np.random.default_rng(2)
    assert [a.job_duration(i, ra) for i in range(100)] == [
        b.job_duration(i, rb) for i in range(100)
    ]
    assert not np.array_equal(a.slowness, FleetTiming(100, seed=8).slowness)


# -- models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [SoftmaxRegression(5, 3), MLP(5, 4, 3)], ids=["softmax", "mlp"])
def test_gradient_matches_finite_differences(model: SoftmaxRegression | MLP) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 5))
    y = rng.integers(0, 3, 7)
    params = model.init_params(1) + rng.normal(0, 0.3, model.n_params)
    loss, grad = model.loss_and_grad(params, x, y)
    assert grad.shape == params.shape and grad.dtype == np.float64
    eps = 1e-6
    numeric = np.empty_like(params)
    for i in range(params.size):
        e = np.zeros_like(params)
        e[i] = eps
        numeric[i] = (
            model.loss_and_grad(params + e, x, y)[0] - model.loss_and_grad(params - e, x, y)[0]
        ) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    probs = np.exp(model.logits(params, x))
    probs /= probs.sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(probs[np.arange(7), y])), rel=1e-12)


@pytest.mark.parametrize(
    "model", [SoftmaxRegression(64, 10), MLP(64, 16, 10)], ids=["softmax", "mlp"]
)
def test_layout_describes_the_flat_vector(model: SoftmaxRegression | MLP) -> None:
    wire = Layout.from_wire([[name, list(shape), dtype] for name, shape, dtype in model.layout()])
    assert wire.n_params == model.n_params == model.init_params(0).size


@pytest.mark.parametrize("model", [SoftmaxRegression(8, 4), MLP(8, 6, 4)], ids=["softmax", "mlp"])
def test_local_train_one_batch_is_one_gradient_step(model: SoftmaxRegression | MLP) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.random((5, 8)), rng.integers(0, 4, 5)
    params = model.init_params(0)
    before = params.copy()
    new, n, metrics = model.local_train(params, x, y, lr=0.5, batch_size=16, rng=rng)
    np.testing.assert_array_equal(params, before)  # the start point is not modified
    loss, grad = model.loss_and_grad(params, x, y)
    np.testing.assert_allclose(new, params - 0.5 * grad, rtol=1e-12, atol=1e-15)
    assert n == 5 and metrics["steps"] == 1 and metrics["loss"] == pytest.approx(loss)
    _, _, m3 = model.local_train(params, x, y, lr=0.5, batch_size=2, epochs=2, rng=rng)
    assert m3["steps"] == 6


def test_models_train_centrally_above_90_percent() -> None:
    d = load_digits_split(seed=0)
    x = d.x_train.astype(np.float64)
    rng = np.random.default_rng(0)
    for model, lr in ((SoftmaxRegression(64, 10), 0.5), (MLP(64, 32, 10), 0.1)):
        params = model.init_params(0)
        for _ in range(4):
            params, _, _ = model.local_train(params, x, d.y_train, lr=lr, batch_size=16, rng=rng)
        assert model.accuracy(params, d.x_test, d.y_test) > 0.9


# -- engine ----------------------------------------------------------------------------------


def test_run_async_learns(fleet: FleetData, timing: FleetTiming) -> None:
    server, result = _async(fleet, timing, max_uploads=1500)
    acc = result.accuracies()  # type: ignore[attr-defined]
    assert acc[0] < 0.3 and acc[-1] > 0.8
    assert result.uploads == 1500 and server.version == result.version == 150  # type: ignore[attr-defined]
    assert result.bytes_sent == 1500 * SOFTMAX.n_params * 4  # type: ignore[attr-defined]
    assert 0.05 < result.dropped / (result.dropped + result.uploads) < 0.15  # type: ignore[attr-defined]


def test_history_ticks_every_eval_interval(fleet: FleetData, timing: FleetTiming) -> None:
    _, r = _async(fleet, timing, max_uploads=None, duration=9.0, eval_every=2.0)
    times = [h.time for h in r.history]  # type: ignore[attr-defined]
    assert times == [0.0, 2.0, 4.0, 6.0, 8.0, 9.0]
    assert r.history[0].uploads == 0 and r.history[0].version == 0  # type: ignore[attr-defined]
    ups = [h.uploads for h in r.history]  # type: ignore[attr-defined]
    assert ups == sorted(ups) and ups[-1] == r.uploads  # type: ignore[attr-defined]
    assert r.sim_time == 9.0  # type: ignore[attr-defined]


def test_concurrency_invariant(fleet: FleetData, timing: FleetTiming) -> None:
    _, r = _async(fleet, timing, max_uploads=800, concurrency=50, record_jobs=True)
    jobs = r.jobs  # type: ignore[attr-defined]
    # every start happens at time 0 or at an end; just after it, exactly 50 jobs are running
    for job in jobs[::17]:
        running = sum(1 for j in jobs if j.start <= job.start < j.end)
        assert running == 50
    by_device: dict[int, list[tuple[float, float]]] = {}
    for j in jobs:
        by_device.setdefault(j.device, []).append((j.start, j.end))
    for spans in by_device.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert len(by_device) > 200  # uniform choice among idle devices reaches most of the fleet


def test_async_is_bitwise_deterministic_and_schedule_is_paired(
    fleet: FleetData, timing: FleetTiming
) -> None:
    s1, a = _async(fleet, timing, seed=5, record_jobs=True)
    s2, b = _async(fleet, timing, seed=5, record_jobs=True)
    assert a.history == b.history and a.jobs == b.jobs  # type: ignore[attr-defined]
    assert s1.submits == s2.submits
    np.testing.assert_array_equal(a.params, b.params)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(a.staleness, b.staleness)  # type: ignore[attr-defined]
    _, c = _async(fleet, timing, seed=6, record_jobs=True)
    assert c.jobs != a.jobs  # type: ignore[attr-defined]
    # another learning rate: different models, the very same fleet behaviour
    _, d = _async(fleet, timing, seed=5, record_jobs=True, client_lr=0.3)
    assert [(j.device, j.start, j.end, j.dropped) for j in d.jobs] == [  # type: ignore[attr-defined]
        (j.device, j.start, j.end, j.dropped)
        for j in a.jobs  # type: ignore[attr-defined]
    ]
    assert not np.array_equal(d.params, a.params)  # type: ignore[attr-defined]


def test_staleness_is_measured_against_the_base_version(
    fleet: FleetData, timing: FleetTiming
) -> None:
    server, r = _async(fleet, timing)
    st = r.staleness  # type: ignore[attr-defined]
    assert st.size == r.uploads and st.min() >= 0 and st.mean() > 1  # type: ignore[attr-defined]
    assert st.tolist() == [v - b for _, b, _, v in server.submits]


def test_jobs_train_from_the_version_current_at_their_start(
    fleet: FleetData, timing: FleetTiming
) -> None:
    """The server updates its model in place; every delta must still start from its base."""
    assert fleet.sizes.max() <= 16  # one batch per shard: a job is one exact gradient step
    server = BufferServer(SOFTMAX.init_params(0), k=3)
    versions = [server.params.copy()]
    checked = 0
    inner = server.submit

    def submit(client: int, base_version: int, delta: np.ndarray, num_examples: int) -> bool:
        nonlocal checked
        _, grad = SOFTMAX.loss_and_grad(versions[base_version], fleet.xs[client], fleet.ys[client])
        np.testing.assert_allclose(delta, -0.7 * grad, rtol=1e-9, atol=1e-12)
        checked += 1
        produced = inner(client, base_version, delta, num_examples)
        if produced:
            versions.append(server.params.copy())
        return produced

    server.submit = submit  # type: ignore[method-assign]
    r = run_async(server, fleet, SOFTMAX, timing, max_uploads=400, client_lr=0.7, eval_every=5.0)
    assert checked == 400 and r.staleness.max() >= 3


def test_encode_hook_sees_every_upload_and_sets_bytes(
    fleet: FleetData, timing: FleetTiming
) -> None:
    calls: list[int] = []

    def zero(client: int, delta: np.ndarray) -> tuple[np.ndarray, int]:
        calls.append(client)
        return np.zeros_like(delta), 7

    server, r = _async(fleet, timing, max_uploads=300, encode=zero)
    assert calls == [c for c, _, _, _ in server.submits] and len(calls) == 300
    assert r.bytes_sent == 7 * 300  # type: ignore[attr-defined]
    np.testing.assert_array_equal(server.params, SOFTMAX.init_params(0))


def test_sync_fedavg_rounds_are_weighted_means(fleet: FleetData, timing: FleetTiming) -> None:
    seen: list[tuple[int, np.ndarray]] = []

    def capture(client: int, delta: np.ndarray) -> tuple[np.ndarray, int]:
        seen.append((client, delta.copy()))
        return delta, 100

    init = SOFTMAX.init_params(0)
    r = run_sync_fedavg(
        init,
        fleet,
        SOFTMAX,
        timing,
        rounds=1,
        server_lr=0.5,
        client_lr=1.0,
        encode=capture,
        record_jobs=True,
    )
    assert r.version == 1 and r.uploads == len(seen) == 100 and r.bytes_sent == 100 * 100
    devices = [c for c, _ in seen]
    assert len(set(devices)) == 100
    sizes = fleet.sizes
    mean = sum(sizes[c] * d for c, d in seen) / sum(sizes[c] for c, _ in seen)
    np.testing.assert_allclose(r.params, init + 0.5 * mean, rtol=1e-12, atol=1e-15)
    assert r.jobs is not None and len(r.jobs) == 130 and len({j.device for j in r.jobs}) == 130
    close = max(j.end for j in r.jobs)
    assert r.sim_time == close
    # the first 100 survivors upload; stragglers are cut off at the close
    early = {j.device for j in r.jobs if not j.dropped and j.end < close}
    assert len(early) == 99 and early < set(devices)


def test_sync_fedavg_learns_and_is_deterministic(fleet: FleetData, timing: FleetTiming) -> None:
    init = SOFTMAX.init_params(0)
    kw: dict[str, object] = {"rounds": 15, "client_lr": 1.0, "eval_every": 5.0, "seed": 2}
    a = run_sync_fedavg(init, fleet, SOFTMAX, timing, **kw)  # type: ignore[arg-type]
    b = run_sync_fedavg(init, fleet, SOFTMAX, timing, **kw)  # type: ignore[arg-type]
    assert a.history == b.history
    np.testing.assert_array_equal(a.params, b.params)
    assert a.history[0].accuracy < 0.3 and a.history[-1].accuracy > 0.75
    assert a.uploads == 1500 and a.version == 15
    versions = [h.version for h in a.history]
    assert versions == sorted(versions) and versions[-1] == 15
    d = run_sync_fedavg(init, fleet, SOFTMAX, timing, duration=a.sim_time / 2, client_lr=1.0)
    assert d.sim_time == a.sim_time / 2 and 0 < d.version < 15


def test_engine_rejects_bad_arguments(fleet: FleetData, timing: FleetTiming) -> None:
    server = BufferServer(SOFTMAX.init_params(0))
    with pytest.raises(ValueError, match="stopping rule"):
        run_async(server, fleet, SOFTMAX, timing, client_lr=1.0)
    with pytest.raises(ValueError, match="concurrency"):
        run_async(server, fleet, SOFTMAX, timing, client_lr=1.0, max_uploads=1, concurrency=301)
    with pytest.raises(ValueError, match="timing"):
        run_async(server, fleet, SOFTMAX, FleetTiming(10), client_lr=1.0, max_uploads=1)
    with pytest.raises(ValueError, match="cohort"):
        run_sync_fedavg(server.params, fleet, SOFTMAX, timing, cohort=250, rounds=1, client_lr=1.0)


# -- the downlink, server optimisers, label ownership, the synthetic problem ------------------
class _SpyModel(SoftmaxRegression):
    """Records the parameters every local training starts from."""

    def __init__(self) -> None:
        super().__init__(64, 10)
        self.bases: list[np.ndarray] = []

    def local_train(self, params: np.ndarray, *a: Any, **kw: Any) -> Any:
        self.bases.append(params.copy())
        return super().local_train(params, *a, **kw)


def test_download_hook_feeds_decoded_weights_and_counts_every_job(
    fleet: FleetData, timing: FleetTiming
) -> None:
    """Devices train from (and take their delta against) what they decoded; each job pays
    the model's bytes once, dropped jobs included."""
    calls: list[np.ndarray] = []

    def down(params: np.ndarray) -> tuple[np.ndarray, int]:
        calls.append(params.copy())
        return np.round(params, 2), 11  # a coarse "codec" the test can recompute

    model = _SpyModel()
    server = BufferServer(model.init_params(0), k=5)
    r = run_async(server, fleet, model, timing, max_uploads=200, client_lr=1.0,
                  eval_every=5.0, download=down, record_jobs=True)  # fmt: skip
    assert r.jobs is not None
    assert r.down_bytes == 11 * len(r.jobs)  # one download per job started
    assert any(j.dropped for j in r.jobs)
    assert r.history[0].down_bytes == 11 * 100  # the first 100 jobs start at time 0
    assert len(model.bases) == 200
    for b in model.bases:  # every training starts from a rounded (decoded) model
        np.testing.assert_array_equal(b, np.round(b, 2))
    assert len(calls) == len({j.base_version for j in r.jobs})  # once per version


def test_sync_with_a_server_optimizer_is_fedavgm(fleet: FleetData, timing: FleetTiming) -> None:
    seen: list[tuple[int, np.ndarray]] = []

    def capture(client: int, delta: np.ndarray) -> tuple[np.ndarray, int]:
        seen.append((client, delta.copy()))
        return delta, 1

    init = SOFTMAX.init_params(0)
    opt = ServerSGD(lr=0.5, momentum=0.9)
    r = run_sync_fedavg(init, fleet, SOFTMAX, timing, rounds=2, server_optimizer=opt,
                        client_lr=1.0, encode=capture)  # fmt: skip
    assert len(seen) == 200 and r.version == 2
    sizes = fleet.sizes
    means = []
    for chunk in (seen[:100], seen[100:]):
        w = np.array([sizes[c] for c, _ in chunk], dtype=np.float64)
        means.append(sum(wi * d for wi, (_, d) in zip(w, chunk, strict=True)) / w.sum())
    # torch's SGD with momentum on the pseudo-gradient -ubar, by hand
    m1 = means[0]
    x1 = init + 0.5 * m1
    m2 = 0.9 * m1 + means[1]
    np.testing.assert_allclose(r.params, x1 + 0.5 * m2, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="not both"):
        run_sync_fedavg(init, fleet, SOFTMAX, timing, rounds=1, server_lr=2.0,
                        server_optimizer=opt, client_lr=1.0)  # fmt: skip


def test_owned_labels_live_only_on_their_owners() -> None:
    labels = np.repeat(np.arange(10), 50)
    owners = np.arange(40, 50)
    parts = owned_labels_partition(labels, 50, owners, (8, 9), 0.5, seed=1)
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(labels.size))  # disjoint and covering
    for c, p in enumerate(parts):
        owned = np.isin(labels[p], (8, 9))
        assert owned.all() if c >= 40 else not owned.any()
        assert p.size >= 2


def test_synthetic_problem_is_fixed_and_learnable() -> None:
    a = synthetic_dataset(2000, 500, seed=0)
    b = synthetic_dataset(2000, 500, seed=0)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (2000, 100) and a.n_classes == 20
    assert a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0
    model = SoftmaxRegression(100, 20)
    w = model.init_params(0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        w, _, _ = model.local_train(w, a.x_train, a.y_train, batch_size=64, lr=0.5, rng=rng)
    acc = model.accuracy(w, a.x_test, a.y_test)
    assert 0.5 < acc < 0.99  # learnable, and not trivially separable


# -- coalesced model publication -------------------------------------------------------------


def _publications(made: list[float], interval: float) -> list[tuple[float, int]]:
    """The worker's rule, derived by hand from the times versions are made (``made[v]``):
    the newest version goes out at once if ``interval`` has passed since the last
    publication, else as soon as it has."""
    pubs = [(0.0, 0)]
    while pubs[-1][1] + 1 < len(made):
        last, newest = pubs[-1]
        at = max(made[newest + 1], last + interval)
        pubs.append((at, max(v for v, t in enumerate(made) if t <= at)))
    return pubs


@pytest.mark.parametrize("interval", [0.0, 0.3, 2.5])
def test_jobs_start_from_the_newest_published_version(
    fleet: FleetData, timing: FleetTiming, interval: float
) -> None:
    server, r = _async(fleet, timing, max_uploads=1000, record_jobs=True,
                       publish_interval=interval)  # fmt: skip
    jobs = r.jobs  # type: ignore[attr-defined]
    arrived = sorted(j.end for j in jobs if not j.dropped and j.end <= r.sim_time)  # type: ignore[attr-defined]
    assert len(arrived) == len(server.submits) == 1000
    made = [0.0] + [arrived[v * server.k - 1] for v in range(1, server.version + 1)]
    pubs = _publications(made, interval)
    at = [t for t, _ in pubs]
    for j in jobs:
        i = int(np.searchsorted(at, j.start, side="right")) - 1
        assert j.base_version == pubs[i][1]  # never newer than the last publication
    started = {j.base_version for j in jobs}
    used = [p for p in pubs if p[0] <= max(j.start for j in jobs)]
    assert started == {v for _, v in used}
    assert r.publications == len(used)  # type: ignore[attr-defined]
    assert all(b[0] - a[0] >= interval - 1e-9 for a, b in itertools.pairwise(used))
    if interval == 0:  # every version, the moment it is made
        assert [v for _, v in used] == list(range(len(used)))
        assert r.publications == server.version + 1  # type: ignore[attr-defined]
    # staleness counts from the downloaded version
    assert r.staleness.tolist() == [v - b for _, b, _, v in server.submits]  # type: ignore[attr-defined]


def test_coalescing_keeps_the_schedule_and_adds_staleness(
    fleet: FleetData, timing: FleetTiming
) -> None:
    _, a = _async(fleet, timing, record_jobs=True)
    _, z = _async(fleet, timing, record_jobs=True, publish_interval=0.0)
    assert a.history == z.history and a.jobs == z.jobs  # type: ignore[attr-defined]
    np.testing.assert_array_equal(a.params, z.params)  # type: ignore[attr-defined]
    _, b = _async(fleet, timing, record_jobs=True, publish_interval=2.0)
    assert [(j.device, j.start, j.end, j.dropped) for j in b.jobs] == [  # type: ignore[attr-defined]
        (j.device, j.start, j.end, j.dropped)
        for j in a.jobs  # type: ignore[attr-defined]
    ]
    assert b.staleness.mean() > a.staleness.mean()  # type: ignore[attr-defined]
    assert b.publications <= b.sim_time / 2.0 + 1 < a.publications  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="publish_interval"):
        _async(fleet, timing, publish_interval=-1.0)
