"""The names a user imports from the top of the package: every one resolves (an import
error fails here, never skips), and `import fedbus` alone loads none of the extras."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fedbus
import fedbus.aggregation


@pytest.mark.parametrize("name", fedbus.__all__)
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(fedbus, name) is not None


@pytest.mark.parametrize("name", fedbus.aggregation.__all__)
def test_every_aggregation_name_resolves(name: str) -> None:
    assert getattr(fedbus.aggregation, name) is not None


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = fedbus.Nope  # type: ignore[attr-defined]


def test_import_fedbus_is_light() -> None:
    code = (
        "import sys, fedbus, fedbus.aggregation\n"
        "heavy = {'numba', 'aiokafka', 'aiomqtt', 'pydantic', 'typer', 'sklearn',\n"
        "         'dp_accounting', 'fedbus.aggregation.fedbuff', 'fedbus.kernels'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
