"""structlog configuration shared by the CLI, workers and the simulator.

JSON lines for machines (the default for services), a console renderer for people. Context
such as model, version, worker id and update id is bound with ``structlog.contextvars`` so
every line a message causes carries it; payload bytes and secrets are never logged.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


def configure(fmt: Literal["json", "console"] = "json", level: str = "info") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # JSON carries a traceback as structured data; the console renderer formats the
            # exception itself (and fails on the structured form). Neither shows frame
            # locals: they would hold payload bytes.
            *([_DICT_TRACEBACKS] if fmt == "json" else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str = "fedbus") -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
