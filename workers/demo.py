"""``fedbus demo``: embedded brokers, a real worker, a simulated fleet, convergence you can see.

Every asynchronous upload really travels: the simulated device's delta is encoded with its
codec (error feedback kept per device), wrapped in a signed-format envelope, published to a
broker started for the demo (Mosquitto when installed, otherwise amqtt, the pure-Python MQTT
broker that pip installs with the demo; or, asked for, the Tansu Kafka-protocol broker),
folded by an :class:`~workers.aggregator.AggregatorWorker`, and the new global model comes
back through the broker's model channel. Only the *time* is simulated: devices' training
durations, network delays and dropouts come from the fleet simulator, so an experiment of
thousands of uploads finishes in minutes.

The synchronous FedAvg baseline has no asynchronous worker to talk to and runs in-process on
the same fleet, with the same codecs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedbus.bench.convergence import codec_hook
from fedbus.bench.convergence.output import algorithm_colours
from fedbus.cli.errors import UserError
from fedbus.client.updates import UpdateEncoder, read_model
from fedbus.sim.data import FleetData, digits_fleet
from fedbus.sim.engine import SimResult, run_async, run_sync_fedavg
from fedbus.sim.models import SoftmaxRegression
from fedbus.sim.timing import FleetTiming
from fedbus.testing.brokers import (
    AmqttBroker,
    MosquittoBroker,
    TansuBroker,
    mosquitto_available,
)
from fedbus.transport.base import Transport
from fedbus.wire import envelope as env
from fedbus.wire.codecs import CodecSpec, decode_dense
from fedbus.wire.layout import Layout
from fedbus.wire.model_message import encode_model_message
from workers.main import make_transport
from workers.settings import WorkerSettings, load

CODECS = {"fp32": "fp32", "int8": "int8", "topk+int8": "topk:fraction=0.05"}
ALGORITHMS = ("fedbuff", "fedasync", "sync-fedavg")
SYNC_TRANSPORT = "none (in-process)"
"""Synchronous FedAvg has no asynchronous worker: its rows say so rather than borrow the
broker's name."""


class DemoStopped(Exception):
    """SIGTERM or Ctrl-C: the runs end at their next upload and everything unwinds."""


class Progress(Protocol):
    def start(self, label: str) -> None: ...
    def tick(self, label: str, uploads: int) -> None: ...
    def finish(self, label: str, uploads: int, wall_s: float, accuracy: float) -> None: ...


@dataclass
class DemoConfig:
    devices: int = 100
    concurrency: int = 30
    dirichlet_alpha: float = 0.3
    duration: float = 120.0  # simulated seconds per run; the median job takes about 1 s
    client_lr: float = 0.3
    buffer_k: int = 10
    fedbuff_lr: float = 4.0
    fedasync_alpha: float = 0.4
    sync_lr: float = 1.0
    eval_every: float = 2.0
    seed: int = 0
    codecs: tuple[str, ...] = tuple(CODECS)
    algorithms: tuple[str, ...] = ALGORITHMS
    broker: str = "auto"  # auto: Mosquitto when installed, else amqtt; or mosquitto, amqtt, tansu


@dataclass
class RunResult:
    algorithm: str
    codec: str
    transport: str
    final_accuracy: float
    uploads: int
    bytes_uploaded: int
    versions: int
    wall_s: float
    sim_time_s: float
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (time, bytes, acc)


class BrokerServer:
    """The simulator's ``AsyncServer``, backed by a real broker and worker.

    The engine runs on a thread; each call hops onto the event loop that owns the
    transport and the worker, and waits for the worker to have handled the upload.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        worker: Any,
        device: Transport,
        latest: dict[str, Any],
        layout: Layout,
        model_id: str,
        codec: CodecSpec,
        seed: int,
    ) -> None:
        self.loop, self.worker, self.device, self.latest = loop, worker, device, latest
        self.layout, self.model_id, self.codec, self.seed = layout, model_id, codec, seed
        self.encoders: dict[int, UpdateEncoder] = {}
        self.payloads: dict[int, bytes] = {}
        self.version = 0
        self.uploads = 0
        self.on_upload: Callable[[], None] = lambda: None
        self.halt = threading.Event()
        self._weights = latest["weights"]

    def encode(self, client: int, delta: np.ndarray) -> tuple[np.ndarray, int]:
        """The engine's codec hook: the device's own encoder, error feedback included."""
        if self.halt.is_set():
            raise DemoStopped
        enc = self.encoders.get(client)
        if enc is None:
            enc = UpdateEncoder(
                self.model_id, f"dev-{client:04d}", self.layout, self.codec, seed=self.seed + client
            )
            self.encoders[client] = enc
        payload = enc.encode_delta(delta)
        self.payloads[client] = payload
        return decode_dense(payload, self.codec, self.layout.n_params), len(payload)

    def model(self) -> np.ndarray:
        weights: np.ndarray = self._weights
        return weights

    def submit(self, client: int, base_version: int, delta: np.ndarray, num_examples: int) -> bool:
        payload = self.payloads.pop(client)
        fut = asyncio.run_coroutine_threadsafe(
            self._submit(client, base_version, payload, num_examples), self.loop
        )
        deadline = time.monotonic() + 60
        while True:  # wait in slices, so a stop request ends the run at once
            try:
                return fut.result(timeout=0.2)
            except TimeoutError:
                if self.halt.is_set() or time.monotonic() > deadline:
                    fut.cancel()
                    raise DemoStopped from None

    async def _submit(self, client: int, base: int, payload: bytes, n: int) -> bool:
        enc = self.encoders[client]
        update = env.UpdateEnvelope(
            model=self.model_id,
            client=enc.client,
            update_id=f"u{client:04d}-{self.worker.processed:08d}",
            base_version=base,
            num_examples=n,
            codec=self.codec.to_wire(),
            layout=self.layout.fingerprint,
            payload=payload,
        )
        target = self.worker.processed + 1
        await self.device.publish_update(self.model_id, enc.client, env.encode(update))
        self.uploads += 1
        self.on_upload()
        while self.worker.processed < target:
            self.worker.progress.clear()
            await self.worker.progress.wait()
        version = self.worker.strategy.version
        if version == self.version:
            return False
        while self.latest["version"] < version:  # the new model, as devices receive it
            self.latest["event"].clear()
            await self.latest["event"].wait()
        self._weights = self.latest["weights"]
        self.version = self.latest["version"]
        return True


async def _follow(transport: Transport, model_id: str, latest: dict[str, Any]) -> None:
    async for raw in transport.follow_models(model_id):
        gm = read_model(raw)
        if gm.version >= latest["version"]:
            latest.update(version=gm.version, weights=gm.weights)
            latest["event"].set()


def _encode_hook(
    codec: CodecSpec, n: int, seed: int, halt: threading.Event
) -> Callable[[int, np.ndarray], tuple[np.ndarray, int]]:
    """The convergence benchmark's codec hook (per-device error feedback), stopping the run
    at its next upload once ``halt`` is set."""
    encode = codec_hook(codec, 1, n, np.random.default_rng(seed))

    def hook(client: int, delta: np.ndarray) -> tuple[np.ndarray, int]:
        if halt.is_set():
            raise DemoStopped
        return encode(client, delta)

    return hook


def _result(alg: str, codec: str, transport: str, res: SimResult, wall: float) -> RunResult:
    curve = [(float(p.time), int(p.bytes), float(p.accuracy)) for p in res.history]
    return RunResult(
        alg, codec, transport, curve[-1][2], res.uploads, res.bytes_sent, res.version, wall,
        float(res.sim_time), curve,
    )  # fmt: skip


async def _async_run(
    cfg: DemoConfig,
    settings: WorkerSettings,
    fleet: FleetData,
    timing: FleetTiming,
    algorithm: str,
    codec_name: str,
    view: Progress,
    halt: threading.Event,
) -> RunResult:
    from workers.aggregator import AggregatorWorker

    model = SoftmaxRegression(fleet.n_features, fleet.n_classes)
    layout = model.wire_layout()
    x0 = model.init_params(cfg.seed)
    model_id = f"demo-{algorithm}-{codec_name.replace('+', '-')}"
    label = f"{algorithm} {codec_name}"
    agg = {
        "algorithm": algorithm,
        "buffer_size": cfg.buffer_k,
        "server_lr": cfg.fedbuff_lr,
        "alpha": cfg.fedasync_alpha,
        "staleness": "polynomial",
    }
    s = settings.model_copy(
        update={
            "model": model_id,
            "aggregation": settings.aggregation.model_copy(update=agg),
            "worker_id": "demo-worker",
            "model_publish_interval_s": 0.0,  # the simulated devices see every version
        }
    )
    device_settings = s.model_copy(update={"worker_id": "demo-fleet"})
    async with (
        make_transport(device_settings, role="init") as init,
        make_transport(device_settings, role="fleet") as device,
        make_transport(s) as wt,
    ):
        await init.publish_model(model_id, encode_model_message(model_id, 0, layout, x0, "fp32"), 0)
        worker = AggregatorWorker(s, wt)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        latest: dict[str, Any] = {"version": -1, "weights": None, "event": asyncio.Event()}
        follower = asyncio.create_task(_follow(device, model_id, latest))
        try:
            while not worker.health.ready:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
            while latest["version"] < 0:
                await latest["event"].wait()
            codec = CodecSpec.parse(CODECS[codec_name])
            server = BrokerServer(
                asyncio.get_running_loop(), worker, device, latest, layout, model_id, codec,
                cfg.seed,
            )  # fmt: skip
            server.halt = halt
            server.on_upload = lambda: view.tick(label, server.uploads)
            t0 = time.perf_counter()
            result = await asyncio.to_thread(
                run_async,
                server,
                fleet,
                model,
                timing,
                concurrency=cfg.concurrency,
                duration=cfg.duration,
                client_lr=cfg.client_lr,
                eval_every=cfg.eval_every,
                encode=server.encode,
                seed=cfg.seed,
            )
            wall = time.perf_counter() - t0
        finally:
            stop.set()
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await task
    return _result(algorithm, codec_name, settings.transport, result, wall)


def _sync_run(
    cfg: DemoConfig, fleet: FleetData, timing: FleetTiming, codec_name: str, halt: threading.Event
) -> RunResult:
    model = SoftmaxRegression(fleet.n_features, fleet.n_classes)
    codec = CodecSpec.parse(CODECS[codec_name])
    t0 = time.perf_counter()
    res = run_sync_fedavg(
        model.init_params(cfg.seed),
        fleet,
        model,
        timing,
        cohort=cfg.concurrency,
        duration=cfg.duration,
        server_lr=cfg.sync_lr,
        client_lr=cfg.client_lr,
        eval_every=cfg.eval_every,
        encode=_encode_hook(codec, model.n_params, cfg.seed, halt),
        seed=cfg.seed,
    )
    return _result("sync-fedavg", codec_name, SYNC_TRANSPORT, res, time.perf_counter() - t0)


@contextlib.contextmanager
def embedded_broker(choice: str = "auto") -> Any:
    """Mosquitto when installed, otherwise amqtt (MQTT, pure Python, installed with the demo);
    ``choice`` forces one, or Tansu (the Kafka protocol). Yields (transport name, broker, a
    sentence saying which)."""
    if choice == "mosquitto" or (choice == "auto" and mosquitto_available()):
        if not mosquitto_available():
            raise UserError("--broker mosquitto: Mosquitto is not installed "
                            "(Debian/Ubuntu: apt install mosquitto)")  # fmt: skip
        with MosquittoBroker() as broker:
            yield "mqtt", broker, f"broker: Mosquitto (MQTT 5) on {broker.host}:{broker.port}"
    elif choice == "tansu":
        with TansuBroker() as tansu:
            where = tansu.bootstrap_servers
            yield "kafka", tansu, f"broker: embedded Tansu (Kafka protocol) on {where}"
    else:
        why = "" if choice == "amqtt" else " (Mosquitto is not installed)"
        with AmqttBroker() as amqtt:
            where = f"{amqtt.host}:{amqtt.port}"
            yield "mqtt", amqtt, f"broker: embedded amqtt (MQTT 3.1.1, pure Python) on {where}{why}"


def _run_settings(kind: str, broker: Any, state: Path) -> WorkerSettings:
    overrides: dict[str, Any] = {
        "transport": kind,
        "checkpoint_dir": state,
        "checkpoint_fsync": False,
        "metrics_port": 0,
        "log_level": "warning",
    }
    if kind == "mqtt":
        overrides["mqtt"] = broker.mqtt_settings
    else:
        overrides["kafka"] = broker.kafka_settings()
    return load(None, **overrides)


class _Quiet:
    def start(self, label: str) -> None:
        return None

    def tick(self, label: str, uploads: int) -> None:
        return None

    def finish(self, label: str, uploads: int, wall_s: float, accuracy: float) -> None:
        return None


async def run_demo(
    cfg: DemoConfig,
    view: Progress | None = None,
    *,
    announce: Callable[[str], None] = lambda _text: None,
    stop: asyncio.Event | None = None,
) -> list[RunResult]:
    """Every (algorithm, codec) run in turn, reported to ``view``. Setting ``stop`` ends the
    current run at its next upload and raises :class:`DemoStopped` once everything (worker,
    broker, temporary state) is cleaned up."""
    view = view or _Quiet()
    halt = threading.Event()
    fleet = digits_fleet(cfg.devices, cfg.dirichlet_alpha, cfg.seed)
    timing = FleetTiming(cfg.devices, seed=cfg.seed)
    results: list[RunResult] = []

    async def watch() -> None:
        if stop is not None:
            await stop.wait()
            halt.set()

    watcher = asyncio.create_task(watch())
    try:
        with (
            tempfile.TemporaryDirectory(prefix="fedbus-demo-") as tmp,
            contextlib.ExitStack() as on_exit,
        ):
            kind, broker, which = on_exit.enter_context(embedded_broker(cfg.broker))
            announce(which)
            for algorithm in cfg.algorithms:
                for codec in cfg.codecs:
                    if halt.is_set():
                        raise DemoStopped
                    label = f"{algorithm} {codec}"
                    view.start(label)
                    if algorithm == "sync-fedavg":
                        r = await asyncio.to_thread(_sync_run, cfg, fleet, timing, codec, halt)
                    else:
                        if kind == "kafka" and results:
                            # A fresh Tansu per run: its in-memory store slows down as the
                            # topics of earlier runs grow (the broker, not the worker, becomes
                            # CPU-bound), which made later runs several times slower.
                            on_exit.close()
                            kind, broker, _ = on_exit.enter_context(embedded_broker("tansu"))
                        settings = _run_settings(kind, broker, Path(tmp) / f"state-{len(results)}")
                        r = await _async_run(
                            cfg, settings, fleet, timing, algorithm, codec, view, halt
                        )
                    view.finish(label, r.uploads, r.wall_s, r.final_accuracy)
                    results.append(r)
    finally:
        watcher.cancel()
    if halt.is_set():
        raise DemoStopped
    return results


def plot(results: list[RunResult], cfg: DemoConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"fp32": "-", "int8": "--", "topk+int8": ":"}
    colors = algorithm_colours()  # the convergence report's: one colour per algorithm
    for r in results:
        t, b, a = zip(*r.curve, strict=True)
        kw = {
            "ls": styles.get(r.codec, "-"),
            "color": colors.get(r.algorithm.replace("-", "_")),
            "label": f"{r.algorithm} {r.codec}",
        }
        ax_t.plot(t, a, **kw)
        ax_b.plot(np.array(b) / 1e6, a, **kw)
    ax_t.set(xlabel="simulated time (s)", ylabel="test accuracy", title="accuracy vs time")
    ax_b.set(xlabel="MB uploaded (payload)", ylabel="test accuracy", title="accuracy vs bytes")
    ax_b.set_xscale("log")
    for ax in (ax_t, ax_b):
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=7, ncol=2)
    brokers = sorted({r.transport for r in results if r.transport != SYNC_TRANSPORT})
    fig.suptitle(
        f"fedbus demo: digits, {cfg.devices} devices (Dirichlet {cfg.dirichlet_alpha:g}), "
        f"{cfg.concurrency} training at a time; broker: {', '.join(brokers) or 'none'}; "
        "sync FedAvg runs in-process",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_json(results: list[RunResult], cfg: DemoConfig) -> dict[str, Any]:
    return {"config": asdict(cfg), "runs": [asdict(r) for r in results]}


def write_json(results: list[RunResult], cfg: DemoConfig, path: Path) -> None:
    path.write_text(json.dumps(to_json(results, cfg), indent=1))
