"""What ``fedbus demo`` shows a person: which broker, live progress per run, a summary table
that fits 80 columns, and the plot. On a terminal the progress is live (a spinner per run
that turns into a done mark with its frozen time); without one (a pipe, a CI log) every
finished run is one line, printed as it finishes."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fedbus.cli.errors import UserError


def _parse_list(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise UserError(f"{option}: {', '.join(bad) or 'nothing given'}; choose from "
                        f"{','.join(allowed)}")  # fmt: skip
    return items


class _Lines:
    """Progress for a pipe: one line per finished run."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def start(self, label: str) -> None:
        return None

    def tick(self, label: str, uploads: int) -> None:
        return None

    def finish(self, label: str, uploads: int, wall_s: float, accuracy: float) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {label}: {uploads} uploads, accuracy {accuracy:.3f},"
              f" {wall_s:.1f} s", flush=True)  # fmt: skip


class _Live:
    """Progress for a terminal: rich rows, a spinner while a run goes, a mark when done."""

    def __init__(self, console: Any, total: int) -> None:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.total = total
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]done"),
            TextColumn("{task.fields[k]}"),
            TextColumn("{task.description}"),
            TextColumn("{task.fields[uploads]:>6} uploads"),
            TimeElapsedColumn(),
            console=console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Live:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def start(self, label: str) -> None:
        k = f"[{len(self.tasks) + 1}/{self.total}]"
        self.tasks[label] = self.progress.add_task(label, total=1, uploads=0, k=k)

    def tick(self, label: str, uploads: int) -> None:
        if label in self.tasks:
            self.progress.update(self.tasks[label], uploads=uploads)

    def finish(self, label: str, uploads: int, wall_s: float, accuracy: float) -> None:
        self.progress.update(self.tasks[label], uploads=uploads, completed=1)


def run(
    *,
    out: Path,
    json_path: Path | None,
    devices: int,
    concurrency: int,
    duration: float,
    alpha: float,
    codecs: str,
    algorithms: str,
    broker: str,
    seed: int,
) -> None:
    from rich.console import Console
    from rich.table import Table

    from fedbus import log as fedlog
    from workers import demo as d

    if broker not in ("auto", "mosquitto", "amqtt", "tansu"):
        raise UserError(f"--broker {broker!r}: choose auto, mosquitto, amqtt or tansu")
    cfg = d.DemoConfig(
        devices=devices,
        concurrency=min(concurrency, devices),
        duration=duration,
        dirichlet_alpha=alpha,
        seed=seed,
        codecs=_parse_list(codecs, tuple(d.CODECS), "--codecs"),
        algorithms=_parse_list(algorithms, d.ALGORITHMS, "--algorithms"),
        broker=broker,
    )
    fedlog.configure("console", "warning")
    console = Console()
    runs = len(cfg.codecs) * len(cfg.algorithms)
    t0 = time.perf_counter()
    view: _Live | _Lines = _Live(console, runs) if console.is_terminal else _Lines(runs)

    def announce(text: str) -> None:
        console.print(text) if console.is_terminal else print(text, flush=True)

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await d.run_demo(cfg, view, announce=announce, stop=stop)

    with view:
        try:
            results = asyncio.run(main())
        except d.DemoStopped:
            print("fedbus demo: stopped", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
    table = Table(title=f"fedbus demo: {cfg.devices} digits devices, {cfg.duration:g} simulated s")
    for col in ("algorithm", "codec", "transport", "accuracy", "uploads", "MB up", "versions", "wall s"):  # fmt: skip # noqa: E501
        table.add_column(col, no_wrap=True)
    for r in results:
        table.add_row(
            r.algorithm, r.codec, r.transport, f"{r.final_accuracy:.3f}", str(r.uploads),
            f"{r.bytes_uploaded / 1e6:.2f}", str(r.versions), f"{r.wall_s:.1f}",
        )  # fmt: skip
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    d.plot(results, cfg, out / "accuracy.png")
    announce(f"plot: {out / 'accuracy.png'}")
    if json_path is not None:
        d.write_json(results, cfg, json_path)
        announce(f"figures: {json_path}")
    announce(f"total {time.perf_counter() - t0:.1f} s")
