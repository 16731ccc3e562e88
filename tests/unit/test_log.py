"""Logging an exception works in both formats (a worker logs internal errors with their
traceback), and JSON tracebacks carry no frame locals (they could hold payload bytes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import structlog

from fedbus import log


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def _log_a_failure(secret: bytes) -> None:
    try:
        raise KeyError("a bug")
    except KeyError as exc:
        log.get("t").error("internal error", exc_info=exc)


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_exception_logged_with_its_traceback(
    fmt: Literal["console", "json"], capsys: pytest.CaptureFixture[str]
) -> None:
    log.configure(fmt, "info")
    _log_a_failure(b"payload-bytes-here")
    err = capsys.readouterr().err
    assert "KeyError" in err and "_log_a_failure" in err
    assert "payload-bytes-here" not in err
    if fmt == "json":
        record = json.loads(err.strip().splitlines()[-1])
        assert record["exception"][0]["exc_type"] == "KeyError"


def test_processes_sharing_a_log_file_never_splice_their_lines(tmp_path: Path) -> None:
    """Fault tests run several workers into one log file and parse it; with an unbuffered
    stderr (PYTHONUNBUFFERED, as CI sets) a line written in two calls (its text, then its
    newline) let another process's line land in between, and neither parsed: the secure
    crash test once "saw" no crash point fire that way."""
    script = (
        "from fedbus import log\n"
        "log.configure('json', 'info')\n"
        "for i in range(3000):\n"
        "    log.get('t').warning('crash point', point='p', nth=i)\n"
    )
    path = tmp_path / "shared.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with path.open("ab") as out:
        procs = [
            subprocess.Popen([sys.executable, "-c", script], stderr=out, env=env) for _ in range(3)
        ]
        assert [p.wait(60) for p in procs] == [0, 0, 0]
    lines = path.read_text().splitlines()
    assert len(lines) == 9000
    assert all(json.loads(line)["event"] == "crash point" for line in lines)
