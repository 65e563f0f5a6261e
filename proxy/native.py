"""The compiled build's C functions, found by name.

`pip install .` builds small C extensions beside the mypyc-compiled modules (setup.py);
a pure build has none, and the caller runs its Python version of the same function. An
extension that is there but cannot be loaded is an error at start-up, not a quiet
fallback: `sluice serve` would report `build=compiled` for what runs in Python.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

_PACKAGE: Final = __name__.rpartition(".")[0]


def c_function(module: str, name: str) -> Any:
    """`name` from the C extension `module` of this package; None where it is not built."""
    qualified = f"{_PACKAGE}.{module}"
    try:
        extension = importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name != qualified:
            raise
        return None
    return getattr(extension, name)
