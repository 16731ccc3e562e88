"""The seam between the library's command line and the deployable services.

``fedbus`` (the library) never imports ``workers`` (the services). The services announce
their commands as entry points of the installed distribution, group ``fedbus.commands`` for
top-level commands and ``fedbus.bench`` for benchmarks; the CLI adds whatever it finds.
When a command's code cannot be imported because an extra is not installed (a device
install has no worker), the command still appears and says in one line what to install.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

import typer

from fedbus.cli.errors import UserError

GROUPS = ("fedbus.commands", "fedbus.bench")


def _install_hint(ep: EntryPoint) -> str:
    extra = ep.extras[0] if ep.extras else "worker"
    return f"pip install 'fedbus[{extra}]'"


def _unavailable(ep: EntryPoint, exc: ImportError) -> Any:
    missing = exc.name or str(exc)

    def command(ctx: typer.Context) -> None:
        raise UserError(
            f"`{ctx.command_path}` needs the {ep.extras[0] if ep.extras else 'worker'} extra "
            f"({missing} is not installed): {_install_hint(ep)}"
        )

    command.__doc__ = f"(Not installed here: {_install_hint(ep)}.)"
    return command


def add_plugins(app: typer.Typer, group: str) -> None:
    """Add every command of ``group`` to ``app``: a ``typer.Typer`` becomes a sub-command
    group, a function a command."""
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        try:
            obj = ep.load()
        except ImportError as exc:
            app.command(
                ep.name,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
                add_help_option=False,
            )(_unavailable(ep, exc))
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=ep.name)
        else:
            app.command(ep.name)(obj)
