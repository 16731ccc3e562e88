"""The ``fedbus`` command: one entry point for operators, device teams and benchmarks."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

CODECS = ("int8", "int4", "fp16", "fp32", "topk")

app = typer.Typer(
    help="fedbus: asynchronous federated learning over MQTT and Kafka.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(
    help="Benchmarks that print ratios against baselines run in the same process."
)
app.add_typer(bench_app, name="bench")


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


@bench_app.command("kernels")
def bench_kernels(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of records.")] = False,
    sizes: Annotated[str, typer.Option(help="Comma-separated parameter counts.")] = "1e5,1e6,1e7",
    ks: Annotated[str, typer.Option(help="Comma-separated update counts K.")] = "10,100",
    codecs: Annotated[
        str, typer.Option(help="Comma-separated codecs.")
    ] = "int8,int4,fp16,fp32,topk",
    repeats: Annotated[int, typer.Option(min=5, help="Repeats; medians are reported.")] = 5,
    compile_times: Annotated[
        bool, typer.Option(help="Also time Numba compilation and cached loading.")
    ] = True,
) -> None:
    """Fold K encoded updates into one accumulator: fedbus kernels against naive NumPy,
    Flower's FedAvg ``aggregate`` and the machine's memory bandwidth, in one run."""
    from fedbus.bench import kernels

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    records = kernels.run(
        _ints(sizes), _ints(ks), [c for c in codecs.split(",") if c], repeats=repeats, log=log
    )
    timing = kernels.compile_and_load_times() if compile_times else {}
    if json_out:
        print(json.dumps(kernels.as_dicts(records), indent=1))
    else:
        print(kernels.markdown_table(records))
    if timing:
        log(
            f"numba: compile {timing['compile_s']:.1f} s into an empty cache, "
            f"load {timing['cached_load_s']:.2f} s from it"
        )


@bench_app.command("e2e")
def bench_e2e(
    transport: Annotated[str, typer.Option(help="mqtt or kafka.")] = "mqtt",
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of records.")] = False,
    sizes: Annotated[str, typer.Option(help="Comma-separated parameter counts.")] = "1e5,1e6",
    repeats: Annotated[int, typer.Option(min=1, help="Paired repeats; medians are reported.")] = 5,
    updates: Annotated[
        int | None, typer.Option(help="Timed updates per case (default: ~200 MB of frames).")
    ] = None,
) -> None:
    """Updates per second through one worker beside a bare subscriber on the same client
    library and broker (started here on a free loopback port), plus commit latency."""
    from fedbus.bench import e2e

    if transport not in ("mqtt", "kafka"):
        raise typer.BadParameter("mqtt or kafka", param_hint="--transport")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    records = e2e.run(transport, _ints(sizes), repeats=repeats, updates_per_run=updates, log=log)
    print(json.dumps(records, indent=1) if json_out else e2e.markdown(records))


@bench_app.command("convergence")
def bench_convergence(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of records.")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds; medians and ranges reported.")] = 5,
    quick: Annotated[
        bool, typer.Option(help="Same fleet, short budget and small grid (for CI).")
    ] = False,
    plot: Annotated[Path | None, typer.Option(help="Write the PNG plot here.")] = None,
    workers: Annotated[int, typer.Option(help="Processes (0: up to 2).")] = 0,
) -> None:
    """FedBuff, FedAsync and synchronous FedAvg in the fixed standard setting (digits,
    300 devices, concurrency 100, lognormal speeds, 10% dropouts), each at its best server
    learning rate; fp32, int8 and top-k + int8."""
    from fedbus.bench import convergence

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = convergence.run(seeds=seeds, quick=quick, log=log, workers=workers)
    if json_out:
        print(json.dumps(convergence.to_json(report), indent=1))
    else:
        print(convergence.markdown(report))
    if plot is not None:
        convergence.plot(report, plot)
        log(f"plot: {plot}")


model_app = typer.Typer(help="Publish and inspect global models.")
app.add_typer(model_app, name="model")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file; FEDBUS_* env vars override it."),
]
TransportOpt = Annotated[
    str | None, typer.Option(help="mqtt or kafka (default from config: mqtt).")
]
ModelOpt = Annotated[str | None, typer.Option(help="Model id, [a-z0-9-].")]


@app.command("worker")
def worker(
    config: ConfigOpt = None,
    transport: TransportOpt = None,
    model: ModelOpt = None,
    algorithm: Annotated[str | None, typer.Option(help="fedbuff or fedasync.")] = None,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Where checkpoints live.")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="HTTP port for /metrics; 0 = off.")
    ] = None,
    log_format: Annotated[str | None, typer.Option(help="json or console.")] = None,
) -> None:
    """Run an aggregator worker until SIGTERM/SIGINT, then checkpoint and exit 0."""
    from workers.main import run_worker
    from workers.settings import load

    overrides: dict[str, object] = {
        "transport": transport,
        "model": model,
        "checkpoint_dir": checkpoint_dir,
        "metrics_port": metrics_port,
        "log_format": log_format,
    }
    settings = load(config, **overrides)
    if algorithm is not None:
        settings.aggregation.algorithm = algorithm  # type: ignore[assignment]
    raise typer.Exit(run_worker(settings))


@model_app.command("init")
def model_init(
    config: ConfigOpt = None,
    transport: TransportOpt = None,
    model: ModelOpt = None,
    example: Annotated[
        str, typer.Option(help="Built-in model: softmax or mlp (digits).")
    ] = "softmax",
    npz: Annotated[Path | None, typer.Option(help="Initial weights from an .npz instead.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the built-in initialisation.")] = 0,
) -> None:
    """Publish version 0 of a model (retained on MQTT, compacted on Kafka) with its layout."""
    from workers.main import publish_initial_model
    from workers.settings import load

    settings = load(config, transport=transport, model=model)
    version = publish_initial_model(settings, example=example, npz=npz, seed=seed)
    print(f"published {settings.model} version {version} on {settings.transport}")


client_app = typer.Typer(help="Device-side tools: simulated fleets against a live deployment.")
app.add_typer(client_app, name="client")


@client_app.command("simulate")
def client_simulate(
    config: ConfigOpt = None,
    transport: TransportOpt = None,
    model: ModelOpt = None,
    example: Annotated[
        str, typer.Option(help="What the devices train: softmax or mlp (match model init).")
    ] = "softmax",
    devices: Annotated[int, typer.Option(min=1, help="Simulated devices (digits shards).")] = 100,
    concurrency: Annotated[int, typer.Option(min=1, help="Devices training at any moment.")] = 30,
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha of the label split.")] = 0.3,
    sigma: Annotated[float, typer.Option(help="Lognormal sigma of device slowness.")] = 1.0,
    dropout: Annotated[float, typer.Option(help="Fraction of jobs that vanish.")] = 0.1,
    codec: Annotated[
        str, typer.Option(help="Update codec, e.g. int8, int4, fp16, 'topk:fraction=0.05'.")
    ] = "int8",
    client_lr: Annotated[float, typer.Option(help="Local SGD learning rate.")] = 0.3,
    clip_norm: Annotated[float | None, typer.Option(help="Clip each delta to this L2 norm.")] = (
        None
    ),
    duration: Annotated[float, typer.Option(help="Wall seconds to run.")] = 60.0,
    uploads: Annotated[int | None, typer.Option(help="Stop after this many uploads.")] = None,
    speed: Annotated[
        float, typer.Option(help="Simulated seconds per wall second (a median job is 1 s).")
    ] = 10.0,
    spool: Annotated[
        Path | None, typer.Option(help="Store-and-forward folder (survives broker outages).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of split, speeds, dropouts and training.")] = 0,
) -> None:
    """Run a fleet of simulated devices (scikit-learn's digits, non-IID, heterogeneous speeds,
    dropouts) through the real client SDK against a running broker and worker; print the
    global model's accuracy as versions come back."""
    import asyncio

    from fedbus import log as fedlog
    from fedbus.sim.data import digits_fleet
    from fedbus.sim.fleet import FleetConfig, FleetReport, LayoutMismatchError, run_fleet
    from fedbus.sim.models import EXAMPLES
    from fedbus.sim.models import example as example_model
    from fedbus.sim.timing import FleetTiming
    from workers.main import make_transport
    from workers.settings import load

    if example not in EXAMPLES:
        raise typer.BadParameter(" or ".join(EXAMPLES), param_hint="--example")
    settings = load(config, transport=transport, model=model)
    fedlog.configure("console", "warning")
    fleet = digits_fleet(devices, alpha, seed)
    net = example_model(example)
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
    )

    def progress(r: FleetReport) -> None:
        t, version, n, acc = r.history[-1]
        print(f"{t:6.1f} s  version {version:5d}  uploads {n:6d}  accuracy {acc:.3f}", flush=True)

    async def main() -> FleetReport:
        async with make_transport(settings, role="fleet") as t:
            return await run_fleet(t, fleet, net, timing, cfg, on_progress=progress)

    try:
        r = asyncio.run(main())
    except (LayoutMismatchError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(
        f"{r.uploads} uploads ({r.bytes_uploaded / 1e6:.2f} MB, {r.dropped} dropped) in "
        f"{r.wall_s:.1f} s; versions {r.first_version} -> {r.last_version}; accuracy "
        f"{r.initial_accuracy:.3f} -> {r.final_accuracy:.3f}"
    )


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the plot (and JSON).")] = Path(
        "fedbus-demo"
    ),
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")
    ] = None,
    devices: Annotated[
        int, typer.Option(help="Simulated devices (digits, Dirichlet split).")
    ] = 100,
    concurrency: Annotated[int, typer.Option(help="Devices training at any moment.")] = 30,
    duration: Annotated[
        float, typer.Option(help="Simulated seconds per run (the median job takes ~1 s).")
    ] = 120.0,
    alpha: Annotated[float, typer.Option(help="Dirichlet alpha of the label split.")] = 0.3,
    codecs: Annotated[str, typer.Option(help="Comma-separated: fp32,int8,topk+int8.")] = (
        "fp32,int8,topk+int8"
    ),
    algorithms: Annotated[
        str, typer.Option(help="Comma-separated: fedbuff,fedasync,sync-fedavg.")
    ] = "fedbuff,fedasync,sync-fedavg",
    seed: Annotated[int, typer.Option(help="Seed of data split, device speeds and training.")] = 0,
) -> None:
    """Start embedded brokers (Mosquitto if installed, else the pip-installed Tansu Kafka
    broker), a real worker and a simulated fleet on scikit-learn's digits; show live
    progress, then a summary table and a PNG plot of accuracy against simulated time and
    against bytes uploaded, for FedBuff, FedAsync and synchronous FedAvg."""
    import asyncio

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from fedbus import log as fedlog
    from workers import demo as d

    # SIGTERM would end the process without unwinding, leaving the embedded broker running:
    # turn it into an exit that runs every context manager's cleanup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    fedlog.configure("console", "warning")
    cfg = d.DemoConfig(
        devices=devices,
        concurrency=concurrency,
        duration=duration,
        dirichlet_alpha=alpha,
        seed=seed,
        codecs=tuple(c for c in codecs.split(",") if c),
        algorithms=tuple(a for a in algorithms.split(",") if a),
    )
    console = Console()
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[uploads]} uploads"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        tasks: dict[str, object] = {}

        def tick(label: str, uploads: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(label, uploads=0)
            progress.update(tasks[label], uploads=uploads)  # type: ignore[arg-type]

        results = asyncio.run(d.run_demo(cfg, tick))
    table = Table(title="fedbus demo: digits, simulated fleet, real broker and worker")
    for col in (
        "algorithm",
        "codec",
        "final accuracy",
        "uploads",
        "MB uploaded",
        "versions",
        "wall s",
    ):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.algorithm, r.codec, f"{r.final_accuracy:.3f}", str(r.uploads),
            f"{r.bytes_uploaded / 1e6:.2f}", str(r.versions), f"{r.wall_s:.1f}",
        )  # fmt: skip
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    d.plot(results, out / "accuracy.png")
    console.print(f"plot: {out / 'accuracy.png'}")
    if json_path is not None:
        d.write_json(results, cfg, json_path)
        console.print(f"figures: {json_path}")


def main() -> None:  # pragma: no cover - console script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
