"""Names a package exposes but imports only when first used (PEP 562), so importing the
package stays cheap and never pulls in what an install lacks."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(
    package: str, names: Mapping[str, str], exported: list[str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a name to the module that
    defines it (absolute, or relative to ``package`` when it starts with a dot). A name,
    once loaded, is stored in ``namespace`` so later lookups skip this."""

    def getattr_(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(exported)

    return getattr_, dir_
