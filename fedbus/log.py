"""structlog configuration shared by the CLI, workers, devices and the simulator.

JSON lines for machines (the default for services), a console renderer for people. Every
line goes through the same renderer, including those of the standard library's ``logging``
(fedbus's transports, aiomqtt, paho, aiokafka, asyncio's "Task exception was never
retrieved"): a log shipper that expects JSON lines never meets a plain-text one. Context such
as model, version, worker id and update id is bound with ``structlog.contextvars`` so every
line a message causes carries it; payload bytes and secrets are never logged.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LEVELS = ("debug", "info", "warning", "error")

# JSON carries a traceback as structured data; the console renderer formats the exception
# itself (and fails on the structured form). Neither shows frame locals: they would hold
# payload bytes.
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was configured:
    a test runner or a daemon manager may swap it (and close the old one) in between."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(fmt: Literal["json", "console"] = "json", level: str = "info") -> None:
    """Set up structlog and route the standard library's logging through the same renderer.

    Third-party loggers are capped at WARNING unless ``level`` is debug: paho and aiokafka log
    every reconnect attempt and group join at INFO, which would drown a worker's own lines.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    number = logging.getLevelNamesMapping()[level.upper()]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    tracebacks: list[structlog.typing.Processor] = [_DICT_TRACEBACKS] if fmt == "json" else []
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, *tracebacks, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        # One write() per line: ``print`` writes the text and its newline separately, so with
        # an unbuffered stderr (PYTHONUNBUFFERED) two processes sharing a log file could
        # splice their lines together and neither would parse as JSON.
        logger_factory=structlog.WriteLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *tracebacks,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(number)
    for name in ("mqtt", "paho", "aiokafka", "kafka"):
        logging.getLogger(name).setLevel(number if number <= logging.DEBUG else logging.WARNING)


def get(name: str = "fedbus") -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(name)
    return logger
