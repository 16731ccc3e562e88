"""Logging an exception works in both formats (a worker logs internal errors with their
traceback), and JSON tracebacks carry no frame locals (they could hold payload bytes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
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
