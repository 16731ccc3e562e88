"""Kernels on plain arrays: quantisation, fused fold-in, server optimizer steps.

Two backends with the same functions: :mod:`fedbus.kernels.jit` (Numba, installed with the
``worker`` extra: fused loops that never materialise a decoded update) and
:mod:`fedbus.kernels.plain` (NumPy only, what a device install has). Callers import
``blockwise``, ``fold`` and ``optim`` from here and get Numba when it is importable.
``FEDBUS_KERNELS=plain`` forces NumPy (to compare the two, or on a platform where Numba's
compiler misbehaves); ``FEDBUS_KERNELS=jit`` makes a missing Numba an error.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from typing import TYPE_CHECKING

__all__ = ["BACKEND", "blockwise", "fold", "optim"]


def _choose() -> str:
    wanted = os.environ.get("FEDBUS_KERNELS", "auto").strip().lower()
    if wanted not in ("auto", "jit", "plain"):
        raise ImportError(f"FEDBUS_KERNELS={wanted!r}: use auto, jit or plain")
    if wanted == "auto":
        return "jit" if find_spec("numba") is not None else "plain"
    return wanted


BACKEND = _choose()
"""``"jit"`` (Numba) or ``"plain"`` (NumPy): which backend this process uses."""

if TYPE_CHECKING or BACKEND == "jit":
    from fedbus.kernels.jit import blockwise, fold, optim
else:
    from fedbus.kernels.plain import blockwise, fold, optim  # type: ignore[no-redef]
