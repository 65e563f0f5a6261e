"""Which build of the data plane this process runs: mypyc's C extensions or pure Python.

setup.py compiles every module of `sluice.proxy` or none, so one module's file says which.
"""

from __future__ import annotations

import sys


def build_kind() -> str:
    """ "compiled" when the data plane's modules are C extensions, else "pure"."""
    path = getattr(sys.modules[__name__], "__file__", None) or ""
    return "pure" if path.endswith(".py") else "compiled"
