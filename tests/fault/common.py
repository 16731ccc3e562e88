"""What the fault tests share about the worker processes they start and kill: how many
updates one has received (its metrics endpoint), its JSON log records, and a stop that never
leaves a process behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["log_records", "stop_all", "updates_received"]


def updates_received(port: int) -> float:
    """The worker's ``fedbus_updates_received_total`` over every model it serves (one line
    per model and transport), 0 while it does not answer (starting, or killed): tests poll
    it to kill a worker once it is mid-stream."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
            body = r.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("fedbus_updates_received_total{")
    )


def log_records(log: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON records of a log several processes append to (``event``: only those);
    anything else in it (a traceback's lines) is skipped."""
    out = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if isinstance(rec, dict) and (event is None or rec.get("event") == event):
                out.append(rec)
    return out


def log_digest(log: Path, last: int = 12) -> str:
    """For a failure message: every warning and error, then each process's last ``last``
    records (a plain tail of a log four processes share shows only the busiest one)."""
    records = log_records(log)
    by_process: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        who = str(rec.get("reducer") or rec.get("worker") or rec.get("worker_id") or "?")
        by_process.setdefault(who, []).append(rec)
    lines = ["-- warnings and errors"]
    lines += [json.dumps(r) for r in records if r.get("level") in ("warning", "error")][-40:]
    for who, recs in by_process.items():
        lines.append(f"-- last records of {who}")
        lines += [json.dumps(r)[:400] for r in recs[-last:]]
    return "\n".join(lines)


async def stop_all(procs: Iterable[Any], timeout: float = 30.0) -> None:
    """SIGTERM every live process (a graceful stop commits), then SIGKILL whichever has not
    exited within ``timeout``, so no test leaves a worker running."""
    procs = list(procs)
    for p in procs:
        if p.returncode is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(p.wait(), timeout)
        if p.returncode is None:
            p.kill()
