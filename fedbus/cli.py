"""The ``fedbus`` command: one entry point for operators, device teams and benchmarks."""

from __future__ import annotations

import json
import sys
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


def main() -> None:  # pragma: no cover - console script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
