"""The convergence report (``fedbus bench convergence``): a fixed setting, a fair rule.

:mod:`.setting` fixes the simulated worlds and runs one task; :mod:`.selection` is the
selection rule as pure functions; :mod:`.study` grows the grid runs; :mod:`.report`
tunes, compares and summarises; :mod:`.output` prints and plots. The names below are the
package's public surface (other benchmarks import the setting and the adapters).
"""

from __future__ import annotations

from fedbus.bench.convergence.output import markdown, plot, to_json
from fedbus.bench.convergence.report import Report, run
from fedbus.bench.convergence.selection import CROSSING_WINDOW, PLATEAU_TOLERANCE
from fedbus.bench.convergence.setting import (
    ADAM_GRID,
    ALGORITHMS,
    ALPHA_GRID,
    BUFFER_K,
    CLIENT_LR,
    CODECS,
    CONCURRENCY,
    DEVICES,
    DIRICHLET_ALPHA,
    DOWN_CODECS,
    DURATION_S,
    EVAL_EVERY_S,
    LR_GRID,
    OPTIMISERS,
    OVER_SELECTION,
    SIGMA,
    STANDARD,
    TARGET_FRACTION,
    PolicyServer,
    Setting,
    Task,
    Trace,
    codec_hook,
    download_hook,
    run_one,
    world,
)

__all__ = [
    "ADAM_GRID",
    "ALGORITHMS",
    "ALPHA_GRID",
    "BUFFER_K",
    "CLIENT_LR",
    "CODECS",
    "CONCURRENCY",
    "CROSSING_WINDOW",
    "DEVICES",
    "DIRICHLET_ALPHA",
    "DOWN_CODECS",
    "DURATION_S",
    "EVAL_EVERY_S",
    "LR_GRID",
    "OPTIMISERS",
    "OVER_SELECTION",
    "PLATEAU_TOLERANCE",
    "SIGMA",
    "STANDARD",
    "TARGET_FRACTION",
    "PolicyServer",
    "Report",
    "Setting",
    "Task",
    "Trace",
    "codec_hook",
    "download_hook",
    "markdown",
    "plot",
    "run",
    "run_one",
    "to_json",
    "world",
]
