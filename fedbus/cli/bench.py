"""``fedbus bench``: benchmarks that print ratios against baselines run in the same process.

The library's own benchmarks live here (kernels, convergence); the services add theirs
(``e2e`` and others) through the plugin seam (:mod:`fedbus.cli.plugins`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedbus.cli.errors import UserError

app = typer.Typer(
    help="Benchmarks that print ratios against baselines run in the same process.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ints(text: str, option: str) -> list[int]:
    """A comma-separated list of counts, '1e6' allowed; a mistake names the option."""
    try:
        values = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"{option} takes comma-separated numbers like 1e5,1e6, not {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise UserError(f"{option} needs positive numbers, got {text!r}")
    return values


@app.command("kernels")
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
    Flower's FedAvg aggregate and the machine's memory bandwidth, in one run.

    \b
    Example: fedbus bench kernels --sizes 1e6 --ks 100 --codecs int8 --json
    """
    try:
        from fedbus.bench import kernels
    except ImportError as exc:
        raise UserError(f"bench kernels needs the bench extra ({exc.name} missing): "
                        "pip install 'fedbus[bench]'") from None  # fmt: skip
    records = kernels.run(
        ints(sizes, "--sizes"),
        ints(ks, "--ks"),
        [c for c in codecs.split(",") if c],
        repeats=repeats,
        log=log,
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


@app.command("convergence")
def bench_convergence(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of records.")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds; medians and ranges reported.")] = 10,
    quick: Annotated[
        bool, typer.Option(help="Same fleet, short budget, one grid value (for CI).")
    ] = False,
    rows: Annotated[
        bool, typer.Option(help="Also the MLP, drift, paper-regime, label and sensitivity rows.")
    ] = True,
    row_seeds: Annotated[int, typer.Option(min=1, help="Seeds for the extra rows.")] = 3,
    cache: Annotated[
        Path | None, typer.Option(help="Keep each run's trace here and reuse it.")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the PNG plot here.")] = None,
    workers: Annotated[int, typer.Option(help="Processes (0: up to 2).")] = 0,
    extend: Annotated[
        Path | None,
        typer.Option(
            help="Add the codec, downlink and publication sections to the report stored here "
            "(a --json output), rerunning only the runs they need."
        ),
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Also write the Markdown tables here.")
    ] = None,
) -> None:
    """FedBuff, FedAsync and synchronous FedAvg in the fixed standard setting (digits, 300
    devices, concurrency 100, lognormal speeds, 10% dropouts), each with plain, momentum
    and Adam server optimisers tuned on the metric reported; codecs, bytes both ways.

    \b
    Example: fedbus bench convergence --quick --plot convergence.png
    """
    from fedbus.bench import convergence

    if extend is not None:
        from fedbus.bench.convergence import merge

        if plot is not None or quick:
            raise UserError("--extend keeps the stored plot and the full setting: drop --plot "
                            "and --quick")  # fmt: skip
        if not extend.is_file():
            raise UserError(f"--extend {extend}: no such file (give a --json output)")
        try:
            stored = merge.load(extend)
        except (ValueError, KeyError) as exc:
            raise UserError(f"--extend {extend}: not a convergence --json output ({exc})") from None
        if stored.summary.get("quick"):
            raise UserError(f"--extend {extend}: a --quick run; extend the full report's JSON")
        report = merge.extend_with_pool(stored, str(cache) if cache else None, workers, log)
    else:
        report = convergence.run(
            seeds=seeds,
            quick=quick,
            log=log,
            workers=workers,
            cache=str(cache) if cache is not None else None,
            rows=rows,
            row_seeds=row_seeds,
        )
    text = convergence.markdown(report)
    if markdown is not None:
        markdown.write_text(text + "\n")
    if json_out:
        print(json.dumps(convergence.to_json(report), indent=1))
    else:
        print(text)
    if plot is not None:
        convergence.plot(report, plot)
        log(f"plot: {plot}")


@app.command("attacks")
def bench_attacks(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of records.")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds; medians reported.")] = 3,
    quick: Annotated[
        bool, typer.Option(help="Same fleet, short runs and one grid value each (for CI).")
    ] = False,
    workers: Annotated[int, typer.Option(help="Processes (0: up to 2).")] = 0,
    markdown: Annotated[
        Path | None, typer.Option(help="Also write the markdown report here.")
    ] = None,
    only: Annotated[
        str, typer.Option("--attacks", help="Comma-separated attacks (default: all).")
    ] = "scaled,sign_flip,gaussian,label_flip,sybil",
) -> None:
    """10% and 20% malicious devices (scaled, sign-flipped, Gaussian, label-flipped updates,
    and one producer posing as many clients) against FedBuff with and without norm
    clipping, coordinate median, trimmed mean and identity binding, in the convergence
    report's standard setting; defence parameters tuned on a separate seed.

    \b
    Example: fedbus bench attacks --quick --json
    """
    from fedbus.bench import attacks

    chosen = [a.strip() for a in only.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in attacks.ATTACKS]
    if unknown or not chosen:
        raise UserError(f"--attacks takes names among {','.join(attacks.ATTACKS)}, not {only!r}")
    report = attacks.run(seeds=seeds, quick=quick, log=log, workers=workers, attacks=chosen)
    if json_out:
        print(json.dumps(attacks.to_json(report), indent=1))
    else:
        print(attacks.markdown(report))
    if markdown is not None:
        markdown.write_text(attacks.markdown(report) + "\n")
        log(f"markdown: {markdown}")


@app.command("secure")
def bench_secure(
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON list of records.")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds; medians in the summary.")] = 3,
    quick: Annotated[bool, typer.Option(help="Same fleet, 100 simulated s (for CI).")] = False,
    markdown: Annotated[
        Path | None, typer.Option(help="Also write the markdown report here.")
    ] = None,
) -> None:
    """Secure aggregation against plain int8 FedBuff in the convergence report's standard
    setting: accuracy and time to target, bytes per device job, device CPU per update, and
    aggregator updates per CPU second (both aggregators, every protocol message encoded).

    \b
    Example: fedbus bench secure --quick --json
    """
    from fedbus.bench import secure

    rows = secure.run(seeds=seeds, quick=quick, log=log)
    if json_out:
        print(json.dumps(rows, indent=1))
    else:
        print(secure.markdown(rows))
    if markdown is not None:
        markdown.write_text(secure.markdown(rows) + "\n")
        log(f"markdown: {markdown}")
