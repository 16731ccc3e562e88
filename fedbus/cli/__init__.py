"""The ``fedbus`` command: operators, device teams and benchmarks.

:func:`main` is the console script. It turns every user error into one line on stderr and
exit status 2 (see :mod:`fedbus.cli.errors`); tracebacks are for bugs, or ``--debug``.
The command line needs the ``cli`` extra (typer); a device install without it still gets a
``fedbus`` script that says so in one line.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence

from fedbus.cli.errors import EXIT_USAGE, UserError, one_line

__all__ = ["EXIT_USAGE", "UserError", "main"]


def _fail(message: str) -> int:
    print(f"fedbus: error: {one_line(message)}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        import click
        import typer  # noqa: F401
    except ImportError:
        return _fail("the fedbus command needs the cli extra: pip install 'fedbus[cli]'")
    from fedbus.cli.app import build

    try:
        result = build()(args=args, prog_name="fedbus", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else "fedbus"
        print(
            f"{where}: error: {one_line(exc.format_message())} (see {where} --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except (click.Abort, KeyboardInterrupt):
        return 130
    except UserError as exc:
        if debug:
            traceback.print_exc()
        return _fail(str(exc))
    except Exception:
        traceback.print_exc()
        print("fedbus: internal error: this is a bug; please report it with the traceback above",
              file=sys.stderr)  # fmt: skip
        return 1
    return int(result) if isinstance(result, int) else 0


def _console() -> None:  # pragma: no cover - the installed script
    sys.exit(main())
