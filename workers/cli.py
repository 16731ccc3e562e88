"""The services' commands, added to ``fedbus`` through entry points (see
:mod:`fedbus.cli.plugins`): run a worker, publish a model, load a deployment with a simulated
fleet, the demo, and the end-to-end benchmark. Imports stay inside the commands so that
``fedbus --help`` does not load NumPy, Numba or pydantic."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from fedbus.cli.bench import ints, log
from fedbus.cli.errors import UserError
from fedbus.cli.options import (
    AlgorithmName,
    ConfigOpt,
    Example,
    KafkaBootstrapOpt,
    LogFormat,
    LogLevel,
    ModelOpt,
    MqttHostOpt,
    MqttPortOpt,
    Role,
    TransportName,
    TransportOpt,
    broker_overrides,
)

POSITIVE = click.FloatRange(min=0.0, min_open=True)
FRACTION = click.FloatRange(min=0.0, max=1.0, max_open=True)


def _settings(config: Path | None, **overrides: Any) -> Any:
    from workers.settings import load

    return load(config, **{k: v for k, v in overrides.items() if v is not None})


def worker(
    config: ConfigOpt = None,
    transport: TransportOpt = None,
    model: ModelOpt = None,
    algorithm: Annotated[
        AlgorithmName | None, typer.Option(help="Aggregation policy (default from config).")
    ] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Where snapshots and the write-ahead log live.")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(min=0, max=65535, help="HTTP port for /metrics, /livez, /readyz; 0 = off."),
    ] = None,
    log_format: Annotated[LogFormat | None, typer.Option(help="Log line format.")] = None,
    log_level: Annotated[LogLevel | None, typer.Option(help="Lowest level logged.")] = None,
    mqtt_host: MqttHostOpt = None,
    mqtt_port: MqttPortOpt = None,
    kafka_bootstrap: KafkaBootstrapOpt = None,
    role: Annotated[
        Role | None,
        typer.Option(
            help="all: one process per model; reducer: fold a share of the updates; "
            "committer: merge partials and commit (a second one waits as standby); "
            "leader, helper: the two aggregators of secure aggregation ([secure])."
        ),
    ] = None,
) -> None:
    """Run an aggregator worker until SIGTERM or SIGINT, then checkpoint and exit 0.

    \b
    Example: fedbus worker --transport mqtt --mqtt-host broker --model digits --algorithm fedbuff
    """
    from workers.main import run_worker

    overrides = broker_overrides(transport, mqtt_host, mqtt_port, kafka_bootstrap)
    if algorithm is not None:
        overrides["aggregation"] = {"algorithm": algorithm.value}
    settings = _settings(
        config,
        model=model,
        checkpoint_dir=checkpoint_dir,
        metrics_port=metrics_port,
        log_format=log_format.value if log_format else None,
        log_level=log_level.value if log_level else None,
        role=role.value if role else None,
        **overrides,
    )
    raise typer.Exit(run_worker(settings))


model_app = typer.Typer(
    help="Publish and inspect global models.", no_args_is_help=True, rich_markup_mode=None
)


@model_app.command("init")
def model_init(
    config: ConfigOpt = None,
    transport: TransportOpt = None,
    model: ModelOpt = None,
    example: Annotated[Example, typer.Option(help="Built-in digits model.")] = Example.softmax,
    npz: Annotated[
        Path | None, typer.Option(help="Initial weights from an .npz of named float arrays.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the built-in initialisation.")] = 0,
    mqtt_host: MqttHostOpt = None,
    mqtt_port: MqttPortOpt = None,
    kafka_bootstrap: KafkaBootstrapOpt = None,
) -> None:
    """Publish version 0 of a model (retained on MQTT, compacted on Kafka) with its layout.

    \b
    Example: fedbus model init --transport mqtt --model digits --example softmax
    """
    from workers.main import publish_initial_model

    if npz is not None and not npz.is_file():
        raise UserError(f"--npz {npz}: no such file")
    settings = _settings(
        config, model=model, **broker_overrides(transport, mqtt_host, mqtt_port, kafka_bootstrap)
    )
    version = publish_initial_model(settings, example=example.value, npz=npz, seed=seed)
    print(f"published {settings.model} version {version} on {settings.transport}")


client_app = typer.Typer(
    help="Device-side tools: simulated fleets against a live deployment.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@client_app.command("simulate")
def client_simulate(
    config: ConfigOpt = None,
    transport: TransportOpt = None,
    model: ModelOpt = None,
    example: Annotated[
        Example, typer.Option(help="What the devices train (match `model init`).")
    ] = Example.softmax,
    devices: Annotated[int, typer.Option(min=1, help="Simulated devices (digits shards).")] = 100,
    concurrency: Annotated[int, typer.Option(min=1, help="Devices training at any moment.")] = 30,
    alpha: Annotated[
        float, typer.Option(click_type=POSITIVE, help="Dirichlet alpha of the label split.")
    ] = 0.3,
    sigma: Annotated[
        float, typer.Option(min=0.0, help="Lognormal sigma of device slowness.")
    ] = 1.0,
    dropout: Annotated[
        float, typer.Option(click_type=FRACTION, help="Fraction of jobs that vanish, in [0, 1).")
    ] = 0.1,
    codec: Annotated[
        str, typer.Option(help="Update codec: int8, int4, fp16, fp32, 'topk:fraction=0.05'.")
    ] = "int8",
    client_lr: Annotated[float, typer.Option(min=0.0, help="Local SGD learning rate.")] = 0.3,
    clip_norm: Annotated[
        float | None, typer.Option(click_type=POSITIVE, help="Clip each delta's L2 norm.")
    ] = None,
    duration: Annotated[float, typer.Option(min=0.0, help="Wall seconds to run.")] = 60.0,
    uploads: Annotated[
        int | None, typer.Option(min=1, help="Stop after exactly this many uploads.")
    ] = None,
    speed: Annotated[
        float,
        typer.Option(
            click_type=POSITIVE, help="Simulated seconds per wall second (a median job: 1 s)."
        ),
    ] = 10.0,
    spool: Annotated[
        Path | None, typer.Option(help="Store-and-forward folder (survives broker outages).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of split, speeds, dropouts and training.")] = 0,
    secure: Annotated[
        tuple[Path, Path] | None,
        typer.Option(
            help="Secure aggregation: the leader's and the helper's identity.pub files "
            "(devices then seal their updates to both aggregators' signed keys)."
        ),
    ] = None,
    mqtt_host: MqttHostOpt = None,
    mqtt_port: MqttPortOpt = None,
    kafka_bootstrap: KafkaBootstrapOpt = None,
) -> None:
    """Run simulated devices (scikit-learn's digits, non-IID, heterogeneous speeds, dropouts)
    through the real device SDK against a running broker and worker; print the global model's
    accuracy as versions come back.

    \b
    Example: fedbus client simulate --transport mqtt --model digits --devices 300 --duration 60
    """
    import asyncio

    from fedbus import log as fedlog
    from fedbus.sim.data import digits_fleet
    from fedbus.sim.fleet import FleetConfig, FleetReport, LayoutMismatchError, run_fleet
    from fedbus.sim.models import example as example_model
    from fedbus.sim.timing import FleetTiming
    from fedbus.transport.base import TransportError
    from fedbus.wire.codecs import CodecSpec
    from fedbus.wire.errors import WireError
    from workers.main import make_transport

    try:
        CodecSpec.parse(codec)
    except WireError as exc:
        raise UserError(f"--codec {codec!r}: {exc.detail}") from None
    settings = _settings(
        config, model=model, **broker_overrides(transport, mqtt_host, mqtt_port, kafka_bootstrap)
    )
    identities = None
    if secure is not None:
        from fedbus.client.device import SecureIdentities
        from fedbus.store.keys import parse_key_file

        try:
            identities = SecureIdentities(*(parse_key_file(p) for p in secure))
        except (OSError, ValueError) as exc:
            raise UserError(f"--secure: {exc}") from None
    fedlog.configure("console", "warning")
    fleet = digits_fleet(devices, alpha, seed)
    net = example_model(example.value)
    timing = FleetTiming(devices, sigma=sigma, dropout=dropout, seed=seed)
    cfg = FleetConfig(
        model=settings.model,
        concurrency=min(concurrency, devices),
        duration_s=duration,
        max_uploads=uploads,
        speed=speed,
        codec=codec,
        client_lr=client_lr,
        clip_norm=clip_norm,
        spool_root=spool,
        seed=seed,
        secure=identities,
    )

    def progress(r: FleetReport) -> None:
        t, version, n, acc = r.history[-1]
        print(f"{t:6.1f} s  version {version:5d}  uploads {n:6d}  accuracy {acc:.3f}", flush=True)

    async def main() -> FleetReport:
        async with make_transport(settings, role="fleet") as t:
            return await run_fleet(t, fleet, net, timing, cfg, on_progress=progress)

    try:
        r = asyncio.run(main())
    except (LayoutMismatchError, TimeoutError, TransportError) as exc:
        raise UserError(str(exc)) from None
    print(
        f"{r.uploads} uploads ({r.bytes_uploaded / 1e6:.2f} MB, {r.dropped} dropped) in "
        f"{r.wall_s:.1f} s; versions {r.first_version} -> {r.last_version}; accuracy "
        f"{r.initial_accuracy:.3f} -> {r.final_accuracy:.3f}"
    )


def demo(
    out: Annotated[Path, typer.Option(help="Folder for the plot (and JSON).")] = Path(
        "fedbus-demo"
    ),
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")
    ] = None,
    devices: Annotated[
        int, typer.Option(min=2, help="Simulated devices (digits, Dirichlet split).")
    ] = 100,
    concurrency: Annotated[int, typer.Option(min=1, help="Devices training at any moment.")] = 30,
    duration: Annotated[
        float,
        typer.Option(min=1.0, help="Simulated seconds per run (the median job takes ~1 s)."),
    ] = 120.0,
    alpha: Annotated[
        float, typer.Option(click_type=POSITIVE, help="Dirichlet alpha of the label split.")
    ] = 0.3,
    codecs: Annotated[str, typer.Option(help="Comma-separated: fp32,int8,topk+int8.")] = (
        "fp32,int8,topk+int8"
    ),
    algorithms: Annotated[
        str, typer.Option(help="Comma-separated: fedbuff,fedasync,sync-fedavg.")
    ] = "fedbuff,fedasync,sync-fedavg",
    broker: Annotated[
        str,
        typer.Option(
            help="auto (Mosquitto if installed, else amqtt, the pure-Python MQTT broker "
            "installed with the demo), mosquitto, amqtt, or tansu (the embedded Kafka-protocol "
            "broker)."
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of data split, device speeds and training.")] = 0,
) -> None:
    """Start an embedded broker, a real worker and a simulated fleet on scikit-learn's digits;
    show live progress, then a summary table and a plot of accuracy against simulated time and
    against bytes uploaded, for FedBuff, FedAsync and synchronous FedAvg.

    \b
    Example: fedbus demo --duration 60 --codecs int8
    """
    from workers.demo_cli import run

    run(
        out=out,
        json_path=json_path,
        devices=devices,
        concurrency=concurrency,
        duration=duration,
        alpha=alpha,
        codecs=codecs,
        algorithms=algorithms,
        broker=broker,
        seed=seed,
    )


def bench_e2e(
    transport: Annotated[
        TransportName, typer.Option(help="Broker protocol (a broker is started here).")
    ] = TransportName.mqtt,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of records.")] = False,
    sizes: Annotated[str, typer.Option(help="Comma-separated parameter counts.")] = "1e5,1e6",
    repeats: Annotated[int, typer.Option(min=1, help="Paired repeats; medians are reported.")] = 5,
    updates: Annotated[
        int | None,
        typer.Option(min=1, help="Timed updates per case (default: ~200 MB of frames)."),
    ] = None,
    intervals: Annotated[
        str,
        typer.Option(help="Comma-separated model_publish_interval_s values (0: every version)."),
    ] = "0,1",
    model_codec: Annotated[
        str, typer.Option(help="Full-model codec: fp32, fp16, int8, int4.")
    ] = "fp32",
    model_diff_codec: Annotated[
        str, typer.Option(help="Difference codec (int8, int4, topk:fraction=F); empty: none.")
    ] = "int8",
    kafka_fetch_wait_ms: Annotated[
        int | None,
        typer.Option(min=1, help="Kafka: fetch wait of the worker and the bare consumer."),
    ] = None,
    mqtt_max_inflight: Annotated[
        int | None,
        typer.Option(min=1, help="MQTT: Mosquitto's max_inflight_messages (default 20)."),
    ] = None,
) -> None:
    """Updates per second through one worker beside a bare subscriber on the same client
    library and broker (started here on a free loopback port), plus commit latency and the
    bytes the worker publishes on the model channels.

    \b
    Example: fedbus bench e2e --transport kafka --sizes 1e5 --repeats 3
    """
    from workers.bench import e2e

    try:
        periods = [float(x) for x in intervals.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--intervals {intervals!r}: comma-separated seconds, e.g. 0,1") from None
    records = e2e.run(
        transport.value,
        ints(sizes, "--sizes"),
        repeats=repeats,
        updates_per_run=updates,
        log=log,
        model_publish_interval_s=periods,
        model_codec=model_codec,
        model_diff_codec=model_diff_codec,
        kafka_fetch_wait_ms=kafka_fetch_wait_ms,
        mqtt_max_inflight=mqtt_max_inflight,
    )
    print(json.dumps(records, indent=1) if json_out else e2e.markdown(records))


def bench_scale(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of records.")] = False,
    sizes: Annotated[str, typer.Option(help="Comma-separated parameter counts.")] = "1e5,1e6",
    repeats: Annotated[int, typer.Option(min=1, help="Repeats; medians are reported.")] = 1,
    updates: Annotated[
        int | None,
        typer.Option(min=1, help="Timed updates per case (default: ~200 MB of frames)."),
    ] = None,
    reducers: Annotated[str, typer.Option(help="Comma-separated reducer counts.")] = "1,2",
    transports: Annotated[
        str, typer.Option(help="Comma-separated transports, each on a broker started here.")
    ] = "mqtt,kafka",
    inflight: Annotated[
        int, typer.Option(min=1, help="Mosquitto max_inflight_messages (the shipped 20).")
    ] = 20,
    buffer_size: Annotated[
        int, typer.Option(min=1, help="FedBuff K, also the reducers' flush size.")
    ] = 10,
) -> None:
    """Updates per second through reducers plus a committer beside one `all` worker and a
    bare subscriber (Mosquitto and Tansu, started here), and the standby committer's takeover.

    \b
    Example: fedbus bench scale --sizes 1e5 --reducers 1,2 --json
    """
    from workers.bench import scale

    chosen = [t.strip() for t in transports.split(",") if t.strip()]
    if not chosen or any(t not in ("mqtt", "kafka") for t in chosen):
        raise UserError(f"--transports {transports!r}: mqtt, kafka or mqtt,kafka")
    records = scale.run(
        ints(sizes, "--sizes"),
        transports=chosen,
        repeats=repeats,
        updates_per_run=updates,
        reducer_counts=ints(reducers, "--reducers"),
        log=log,
        inflight=inflight,
        buffer_size=buffer_size,
    )
    print(json.dumps(records, indent=1) if json_out else scale.markdown(records))
