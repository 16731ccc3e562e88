"""The ``fedbus`` command tree: the library's commands plus the services' (via plugins)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from fedbus.cli import bench, keys
from fedbus.cli.plugins import add_plugins


def package_version() -> str:
    try:
        return version("fedbus")
    except PackageNotFoundError:  # running from a source tree that was never installed
        from fedbus import __version__

        return __version__


def _version(value: bool) -> None:
    if value:
        print(f"fedbus {package_version()}")
        raise typer.Exit(0)


def build() -> typer.Typer:
    """A fresh command tree (tests build their own; the console script builds one)."""
    app = typer.Typer(
        help="fedbus: asynchronous federated learning over MQTT and Kafka.\n\nExample: fedbus demo",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
    )

    @app.callback()
    def root(
        _version_flag: Annotated[
            bool,
            typer.Option(
                "--version", callback=_version, is_eager=True, help="Print the version and exit."
            ),
        ] = False,
        _debug: Annotated[
            bool, typer.Option("--debug", help="Show tracebacks for user errors too.")
        ] = False,
    ) -> None:
        """fedbus: asynchronous federated learning over MQTT and Kafka."""

    app.add_typer(keys.app, name="keys")
    add_plugins(bench.app, "fedbus.bench")
    app.add_typer(bench.app, name="bench")
    add_plugins(app, "fedbus.commands")
    return app
