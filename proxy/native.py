"""The compiled build's C functions, found by name.

`pip install .` builds small C extensions beside the mypyc-compiled modules (setup.py);
a pure build, or a compiled one whose extension did not build, has none, and the caller
runs its Python version of the same function.
"""

from __future__ import annotations

import importlib
from typing import Any, Final

_PACKAGE: Final = __name__.rpartition(".")[0]


def c_function(module: str, name: str) -> Any:
    """`name` from the C extension `module` of this package; None where it is not built."""
    try:
        return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), name)
    except ImportError:
        return None
