"""Install footprint by role: site-packages size and import time of a device install
(``pip install fedbus``) against a worker install (``pip install 'fedbus[worker]'``), each in a
fresh virtual environment built from this tree.

    python benchmarks/footprint.py            # prints a markdown table (takes a few minutes)

Import times are medians of 7 fresh interpreters, each importing what that role runs: the
device SDK and its MQTT client (``from fedbus import Device, MqttTransport, UpdateEncoder``),
or the worker (``import workers.aggregator``, which loads Numba's cached kernels).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = {
    "device: `pip install fedbus`": (
        "",
        "from fedbus import Device, MqttTransport, UpdateEncoder; import fedbus.wire.codecs",
    ),
    "worker: `pip install 'fedbus[worker]'`": ("[worker]", "import workers.aggregator"),
}


def size_mb(path: Path) -> float:
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1024


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (extra, statement) in ROLES.items():
            env_dir = Path(tmp) / f"venv{len(rows)}"
            venv.EnvBuilder(with_pip=True).create(env_dir)
            py = env_dir / "bin" / "python"
            base = size_mb(next(env_dir.glob("lib/python*/site-packages")))
            subprocess.run([py, "-m", "pip", "install", "-q", f"{ROOT}{extra}"], check=True)
            site = next(env_dir.glob("lib/python*/site-packages"))
            subprocess.run([py, "-c", statement], check=True)  # warm caches (Numba, .pyc)
            times = []
            for _ in range(7):
                t0 = time.perf_counter()
                subprocess.run([py, "-c", statement], check=True)
                times.append(time.perf_counter() - t0)
            freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True)
            n = len([x for x in freeze.stdout.splitlines() if x and not x.startswith("fedbus")])
            rows.append((label, size_mb(site) - base, n, statistics.median(times)))
    print("| install | site-packages MB | packages | import s (median of 7) |")
    print("|---|---|---|---|")
    for label, mb, n, s in rows:
        print(f"| {label} | {mb:.0f} | {n} | {s:.2f} |")
    print(f"\npython {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
